// Prototype (not in the package): one EBCC sweep over merged answer rows with AVX2 gathers
// instead of the one-hot matrix products of _fast.subtype_sweep. Built and timed against that
// XLA sweep by benchmarks/ebcc_sweep_native.py, to measure what a native EBCC kernel would gain.
//
// Row t (weight w_t, gold g_t or -1), columns c = k * M + m padded to KMp (a multiple of 8):
//   s_c = bias_c + sum_w table[w, y_tw, c]   (gold rows: columns of other classes ruled out)
//   p = softmax(s), log Z_t; z_t(k) = sum_m p_{kM+m}; dz = max |z_t - z_prev_t| over w_t > 0
//   ll += w_t log Z_t; counts[w, y_tw, c] += w_t p_c; csum_c += w_t p_c
#include <immintrin.h>
#include <pmmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "../crowdllm/aggregation/native/simd.h"

using crowdllm_simd::exp256;

namespace {
constexpr int MAXV = 16;  // up to 128 columns

struct Part {
  std::vector<float> counts, csum;     // this chunk's sums
  std::vector<double> dcounts, dcsum;  // the thread's
  double ll = 0;
  float dz = 0;
  void flush_csum() {  // every row adds to every column sum: flushed more often
    for (size_t i = 0; i < csum.size(); ++i) dcsum[i] += csum[i], csum[i] = 0.f;
  }
  void flush() {
    for (size_t i = 0; i < counts.size(); ++i) dcounts[i] += counts[i], counts[i] = 0.f;
    flush_csum();
  }
};

// Rows [r0, r1): `offsets(t, off)` writes the table rows row t adds (one per answer, or one
// per annotator group) as offsets into `tab`, which are also its rows of the counts. The sums
// run in float lanes for `flush_every` rows (the column sums for 512), then go to double.
template <class Offsets>
void sweep_rows(Offsets offsets, const float* weight, const int32_t* gold, const float* bias,
                const float* tab, int64_t K, int64_t M, int64_t KMp, int64_t flush_every,
                const float* zprev, float* z, int64_t r0, int64_t r1, Part* part) {
#ifndef KEEP_DENORMALS
  // tiny posteriors (ruled-out and padding columns: exp(-87) / Z) are denormal floats, and each
  // operation on one costs ~100 cycles: flush them to zero in this thread
  _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON);
  _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);
#endif
  const int NV = (int)(KMp / 8);
  const __m256 ruled = _mm256_set1_ps(-1e30f);
  alignas(32) float p[8 * MAXV];
  int64_t off[64];
  for (int64_t t = r0; t < r1; ++t) {
    if ((t - r0) % flush_every == 0 && t > r0) part->flush();
    const int n = offsets(t, off);
    __m256 s[MAXV];
    for (int v = 0; v < NV; ++v) s[v] = _mm256_loadu_ps(bias + 8 * v);
    for (int i = 0; i < n; ++i) {
      const float* row = tab + off[i];
      for (int v = 0; v < NV; ++v) s[v] = _mm256_add_ps(s[v], _mm256_loadu_ps(row + 8 * v));
    }
    const int32_t g = gold[t];
    if (g >= 0) {  // keep columns [g M, (g + 1) M)
      for (int v = 0; v < NV; ++v) {
        __m256i c = _mm256_add_epi32(_mm256_set1_epi32(8 * v),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256i lo = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(g * M)), c);
        __m256i hi = _mm256_cmpgt_epi32(c, _mm256_set1_epi32((int)((g + 1) * M - 1)));
        s[v] = _mm256_blendv_ps(s[v], ruled, _mm256_castsi256_ps(_mm256_or_si256(lo, hi)));
      }
    }
    __m256 mx = s[0];
    for (int v = 1; v < NV; ++v) mx = _mm256_max_ps(mx, s[v]);
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, _MM_SHUFFLE(1, 0, 3, 2)));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, _MM_SHUFFLE(2, 3, 0, 1)));
    __m256 sum = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
#ifndef ABLATE_EXP
      s[v] = exp256(_mm256_sub_ps(s[v], mx));
#else
      s[v] = _mm256_sub_ps(s[v], mx);
#endif
      sum = _mm256_add_ps(sum, s[v]);
    }
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(sum, sum, 1));
    sum = _mm256_add_ps(sum, _mm256_shuffle_ps(sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm256_add_ps(sum, _mm256_shuffle_ps(sum, sum, _MM_SHUFFLE(2, 3, 0, 1)));
    const float tot = _mm256_cvtss_f32(sum);
    const __m256 inv = _mm256_set1_ps(1.f / tot);
    const float wt = weight[t];
    const __m256 wv = _mm256_set1_ps(wt * (1.f / tot));
    for (int v = 0; v < NV; ++v) _mm256_store_ps(p + 8 * v, _mm256_mul_ps(s[v], inv));
#ifndef ABLATE_Z
    for (int64_t k = 0; k < K; ++k) {
      float zk = 0;
      for (int64_t m = 0; m < M; ++m) zk += p[k * M + m];
      z[t * K + k] = zk;
      if (wt > 0) part->dz = std::max(part->dz, std::fabs(zk - zprev[t * K + k]));
    }
#endif
    part->ll += (double)wt * ((double)_mm256_cvtss_f32(mx) + std::log((double)tot));
    if (wt == 0) continue;
    if (((t - r0) & 511) == 511) part->flush_csum();
    float* cs = part->csum.data();
    for (int v = 0; v < NV; ++v) {
      s[v] = _mm256_mul_ps(s[v], wv);  // w_t p
      _mm256_storeu_ps(cs + 8 * v, _mm256_add_ps(_mm256_loadu_ps(cs + 8 * v), s[v]));
    }
#ifndef ABLATE_M
    for (int i = 0; i < n; ++i) {
      float* acc = part->counts.data() + off[i];
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(acc + 8 * v, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * v), s[v]));
    }
#endif
  }
  part->flush();
}

// The threads' parts summed (counts over `rows` table rows), after the rows are done.
void reduce(std::vector<Part>& parts, int64_t KMp, double* ll, float* dz, float* csum) {
  *ll = 0;
  *dz = 0;
  for (int64_t i = 0; i < KMp; ++i) {
    double a = 0;
    for (auto& pt : parts) a += pt.dcsum[i];
    csum[i] = (float)a;
  }
  for (auto& pt : parts) {
    *ll += pt.ll;
    *dz = std::max(*dz, pt.dz);
  }
}

// Runs sweep_rows over [0, T) on up to `threads` threads, each with `n_rows` count rows.
template <class Offsets>
std::vector<Part> run(Offsets offsets, int64_t T, int64_t n_rows, const float* weight,
                      const int32_t* gold, const float* bias, const float* tab, int64_t K,
                      int64_t M, int64_t KMp, int64_t flush_every, const float* zprev, float* z,
                      int64_t threads) {
  int n = (int)std::max<int64_t>(1, std::min<int64_t>(threads, (T + 1023) / 1024));
  std::vector<Part> parts(n);
  std::vector<std::thread> pool;
  for (int i = 0; i < n; ++i) {
    parts[i].counts.assign(n_rows * KMp, 0.f);
    parts[i].csum.assign(KMp, 0.f);
    parts[i].dcounts.assign(n_rows * KMp, 0.0);
    parts[i].dcsum.assign(KMp, 0.0);
    int64_t r0 = T * i / n, r1 = T * (i + 1) / n;
    pool.emplace_back(sweep_rows<Offsets>, offsets, weight, gold, bias, tab, K, M, KMp,
                      flush_every, zprev, z, r0, r1, &parts[i]);
  }
  for (auto& th : pool) th.join();
  return parts;
}
}  // namespace

extern "C" int ebcc_sweep(const int8_t* labels, int64_t T, int64_t W, int64_t L,
                          const float* weight, const int32_t* gold, const float* bias,
                          const float* table, int64_t K, int64_t M, int64_t KMp,
                          const float* zprev, float* z, double* ll, float* dz, float* counts,
                          float* csum, int64_t threads) {
  if (KMp % 8 || KMp / 8 > MAXV || K * M > KMp || W > 64) return 1;
  auto offsets = [=](int64_t t, int64_t* off) {
    const int8_t* y = labels + t * W;
    int n = 0;
    for (int64_t w = 0; w < W; ++w)
      if (y[w] >= 0) off[n++] = (w * L + y[w]) * KMp;
    return n;
  };
  auto parts = run(offsets, T, W * L, weight, gold, bias, table, K, M, KMp, 4096, zprev, z,
                   threads);
  for (int64_t i = 0; i < W * L * KMp; ++i) {
    double a = 0;
    for (auto& pt : parts) a += pt.dcounts[i];
    counts[i] = (float)a;
  }
  reduce(parts, KMp, ll, dz, csum);
  return 0;
}

// The same sweep with annotators grouped as the DS kernel groups them (`_native.plan`): each
// row's answers of a group are one combination code, the E-step adds G table rows per row
// instead of W, and the M-step adds into G combination rows, which are spread back to
// [W, L, KMp] once at the end.
// codes [T, G]: `_native.encode`'s combination rows (the group's offset plus the code); group g
// holds annotators [S g, min(S g + S, W)), and digit j of its code (base L + 1) is the answer of
// annotator S g + j plus one (0: none). table [W, L, KMp] as in ebcc_sweep.
extern "C" int ebcc_sweep_grouped(const uint16_t* codes, int64_t T, int64_t W, int64_t L,
                                  int64_t S, const float* weight, const int32_t* gold,
                                  const float* bias, const float* table, int64_t K, int64_t M,
                                  int64_t KMp, const float* zprev, float* z, double* ll,
                                  float* dz, float* counts, float* csum, int64_t threads) {
  if (KMp % 8 || KMp / 8 > MAXV || K * M > KMp || S < 1 || (W + S - 1) / S > 64) return 1;
  const int64_t G = (W + S - 1) / S, B = L + 1;
  // calls fn(combination row, table row of one member's answer) for every member answer of
  // every combination of every group: the rows _native.plan lays out
  auto each_answer = [&](auto fn) {
    int64_t first = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = std::min(S, W - S * g);
      int64_t NC = 1;
      for (int64_t j = 0; j < n; ++j) NC *= B;
      for (int64_t code = 0; code < NC; ++code) {
        int64_t rest = code;
        for (int64_t j = 0; j < n; ++j, rest /= B)
          if (rest % B) fn(first + code, (S * g + j) * L + rest % B - 1);
      }
      first += NC;
    }
    return first;
  };
  const int64_t rows = each_answer([](int64_t, int64_t) {});
  // the group tables: combination row = the sum of its members' table rows
  std::vector<float> gtab(rows * KMp, 0.f);
  each_answer([&](int64_t r, int64_t src) {
    for (int64_t i = 0; i < KMp; ++i) gtab[r * KMp + i] += table[src * KMp + i];
  });
  auto offsets = [=](int64_t t, int64_t* off) {
    for (int64_t g = 0; g < G; ++g) off[g] = codes[t * G + g] * KMp;
    return (int)G;
  };
  auto parts = run(offsets, T, rows, weight, gold, bias, gtab.data(), K, M, KMp, 16384, zprev,
                   z, threads);
  std::vector<double> acc(W * L * KMp, 0.0);
  each_answer([&](int64_t r, int64_t dst) {
    for (auto& pt : parts)
      for (int64_t i = 0; i < KMp; ++i) acc[dst * KMp + i] += pt.dcounts[r * KMp + i];
  });
  for (int64_t i = 0; i < W * L * KMp; ++i) counts[i] = (float)acc[i];
  reduce(parts, KMp, ll, dz, csum);
  return 0;
}
