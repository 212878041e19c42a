// M-MSR's annotator pair statistics on a sparse crowd (CPU): for every ordered pair (w, v),
// w != v, of annotators who share a task, common[w, v] (the tasks both answered) and
// agree[w, v] (summed over those tasks: the labels both gave there; at most common[w, v]).
// mmsr.sparse_pair_statistics computes the same with scipy's sparse products (one for the
// answered mask and one a class), the reference this is tested against.
//
// Plain C functions called with ctypes on numpy arrays (built with the other kernels by
// crowdllm/aggregation/_native.py: pair_statistics there). The answers come sorted by task
// (tptr[t] .. tptr[t + 1] are task t's):
//   1. crowdllm_pairs_groups: each answer packed as annotator << 32 | label into ent [A], each
//      task's sorted (by annotator, then label), a repeat of an (annotator, label) answer marked
//      label -1 (repeats count once). Each annotator's answers on a task are then a group; its
//      task's place (gstart, glen: where its answers start, how many) is listed under the
//      annotator (wptr [W + 1]; each list in task order): a counting sort by annotator, each
//      thread over a share of the tasks;
//   2. crowdllm_pairs_count: the number of distinct partners of each annotator v (nnz [W]);
//   3. crowdllm_pairs_fill: with colptr (nnz's cumulative sums), v's partners w in increasing
//      order at colptr[v] ..: row = w, col = v, agree, common (the pairs sorted by (v, w)).
// Steps 2 and 3 walk, for each v, the tasks v answered and their other answers (Gustavson's
// sparse product of the task-by-annotator matrix with itself, all classes in one walk), with
// per-thread stamps and counts of W entries; the threads take annotators in chunks from a
// shared counter. A task visited is one random read (its packed answers, prefetched 4 tasks
// ahead): 10M tasks x 3 answers of 10,000 annotators, ~0.4 s a walk on 2 threads. An
// annotator with many partners lists them by a scan of its stamps, not a sort.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using crowdllm_simd::Workers;

inline int32_t who(int64_t e) { return (int32_t)(e >> 32); }
inline int32_t what(int64_t e) { return (int32_t)(uint32_t)e; }  // -1: a repeat

// the packed answers e[0, n) sorted; repeats of an (annotator, label) pair marked label -1
void sort_task(int64_t* e, int64_t n) {
  if (n <= 1) return;
  bool sorted = true;
  for (int64_t j = 1; j < n && sorted; ++j) sorted = e[j - 1] <= e[j];
  if (!sorted) {
    if (n <= 32) {  // insertion sort: most tasks have a few answers
      for (int64_t j = 1; j < n; ++j) {
        const int64_t a = e[j];
        int64_t i = j;
        for (; i > 0 && e[i - 1] > a; --i) e[i] = e[i - 1];
        e[i] = a;
      }
    } else {
      std::sort(e, e + n);
    }
  }
  for (int64_t j = n - 1; j > 0; --j)  // from the end: a run keeps its first answer
    if (e[j] == e[j - 1]) e[j] = (int64_t)who(e[j]) << 32 | 0xffffffffLL;
}

// For annotator v: visit(w, matches) once for each other annotator w on each task v answered,
// matches = the labels the two both gave there.
template <class F>
inline void walk(int64_t v, const int64_t* ent, const int64_t* wptr, const uint32_t* gstart,
                 const uint32_t* glen, F&& visit) {
  const int64_t g1 = wptr[v + 1];
  for (int64_t g = wptr[v]; g < g1; ++g) {
    if (g + 4 < g1) __builtin_prefetch(&ent[gstart[g + 4]]);
    const int64_t* e = ent + gstart[g];
    const int64_t n = glen[g];
    int64_t vs = 0;
    while (who(e[vs]) != v) ++vs;  // v's answers there: [vs, ve)
    int64_t ve = vs;
    while (ve < n && who(e[ve]) == v) ++ve;
    for (int64_t j = 0; j < n;) {
      const int32_t u = who(e[j]);
      if (u == v) {  // (one at a time: a walk that cannot loop, whatever the order)
        ++j;
        continue;
      }
      int32_t matches = 0;
      for (; j < n && who(e[j]) == u; ++j) {
        const int32_t lab = what(e[j]);
        if (lab < 0) continue;
        for (int64_t m = vs; m < ve; ++m) matches += (what(e[m]) == lab);
      }
      visit(u, matches);
    }
  }
}

constexpr int64_t CHUNK = 64;  // annotators a thread takes at a time

}  // namespace

extern "C" {

// Step 1. worker, label [A]: the answers, sorted by task (tptr [T + 1]); ent [A], wptr [W + 1],
// gstart and glen [A] (the first wptr[W] used) out; count [threads * W] scratch. Returns the
// number of groups.
int64_t crowdllm_pairs_groups(int64_t T, int64_t W, const int64_t* tptr, const int32_t* worker,
                              const int32_t* label, int64_t* ent, int64_t* wptr,
                              uint32_t* gstart, uint32_t* glen, int64_t* count,
                              int64_t threads) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, T / 1024 + 1));
  auto t0 = [&](int64_t i) { return T * i / n; };
  auto first = [&](int64_t t, int64_t j) { return j == tptr[t] || who(ent[j - 1]) != who(ent[j]); };
  Workers::run(n, [&](int64_t i) {
    int64_t* c = count + i * W;
    std::fill(c, c + W, 0);
    for (int64_t t = t0(i); t < t0(i + 1); ++t) {
      for (int64_t j = tptr[t]; j < tptr[t + 1]; ++j)
        ent[j] = (int64_t)worker[j] << 32 | (uint32_t)label[j];
      sort_task(ent + tptr[t], tptr[t + 1] - tptr[t]);
      for (int64_t j = tptr[t]; j < tptr[t + 1]; ++j)
        if (first(t, j)) ++c[who(ent[j])];
    }
  });
  int64_t total = 0;  // each annotator's list: thread 0's share of the tasks first, and so on
  for (int64_t v = 0; v < W; ++v) {
    wptr[v] = total;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = count[i * W + v];
      count[i * W + v] = total;
      total += c;
    }
  }
  wptr[W] = total;
  Workers::run(n, [&](int64_t i) {
    int64_t* c = count + i * W;
    for (int64_t t = t0(i); t < t0(i + 1); ++t)
      for (int64_t j = tptr[t]; j < tptr[t + 1]; ++j)
        if (first(t, j)) {
          const int64_t g = c[who(ent[j])]++;
          gstart[g] = (uint32_t)tptr[t];
          glen[g] = (uint32_t)(tptr[t + 1] - tptr[t]);
        }
  });
  return total;
}

// Step 2: nnz [W] out. Returns their sum.
int64_t crowdllm_pairs_count(int64_t W, const int64_t* ent, const int64_t* wptr,
                             const uint32_t* gstart, const uint32_t* glen, int64_t* nnz,
                             int64_t threads) {
  std::atomic<int64_t> next{0};
  Workers::run(std::max<int64_t>(1, threads), [&](int64_t) {
    std::vector<int32_t> stamp(W, -1);
    for (int64_t v0; (v0 = next.fetch_add(CHUNK)) < W;)
      for (int64_t v = v0; v < std::min(W, v0 + CHUNK); ++v) {
        int64_t n = 0;
        walk(v, ent, wptr, gstart, glen, [&](int32_t u, int32_t) {
          if (stamp[u] != (int32_t)v) {
            stamp[u] = (int32_t)v;
            ++n;
          }
        });
        nnz[v] = n;
      }
  });
  int64_t total = 0;
  for (int64_t v = 0; v < W; ++v) total += nnz[v];
  return total;
}

// Step 3: colptr [W + 1] (nnz's cumulative sums); row, col, agree, common [colptr[W]] out.
void crowdllm_pairs_fill(int64_t W, const int64_t* ent, const int64_t* wptr,
                         const uint32_t* gstart, const uint32_t* glen, const int64_t* colptr,
                         int32_t* row, int32_t* col, int32_t* agree, int32_t* common,
                         int64_t threads) {
  std::atomic<int64_t> next{0};
  Workers::run(std::max<int64_t>(1, threads), [&](int64_t) {
    std::vector<int32_t> stamp(W, -1), nc(W), na(W), touched;
    for (int64_t v0; (v0 = next.fetch_add(CHUNK)) < W;)
      for (int64_t v = v0; v < std::min(W, v0 + CHUNK); ++v) {
        touched.clear();
        walk(v, ent, wptr, gstart, glen, [&](int32_t u, int32_t m) {
          if (stamp[u] != (int32_t)v) {
            stamp[u] = (int32_t)v;
            nc[u] = na[u] = 0;
            touched.push_back(u);
          }
          ++nc[u];
          na[u] += m;
        });
        int64_t p = colptr[v];
        auto put = [&](int32_t u) {
          row[p] = u;
          col[p] = (int32_t)v;
          common[p] = nc[u];
          agree[p] = std::min(na[u], nc[u]);
          ++p;
        };
        if ((int64_t)touched.size() * 16 > W) {  // many partners: a scan costs less than a sort
          for (int32_t u = 0; u < (int32_t)W; ++u)
            if (stamp[u] == (int32_t)v) put(u);
        } else {
          std::sort(touched.begin(), touched.end());
          for (const int32_t u : touched) put(u);
        }
      }
  });
}

}  // extern "C"
