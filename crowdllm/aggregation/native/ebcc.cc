// EBCC's VB sweep over a dense panel's rows, by groups of annotators (AVX2, CPU).
//
// Built with ds_grouped.cc by crowdllm/aggregation/_native.py and called from JAX as XLA FFI
// custom calls (crowdllm_ebcc_sweep; _post and _given for the other modes, see Mode). EBCC's
// latent state of a task is a (class k, subtype m) pair, column c = k M + m (K M columns, padded
// to KMp, a multiple of 8). The annotators are grouped and
// each row encoded as ds_grouped.cc does (one uint16 combination code per group); `table[code, c]`
// is the sum of the group's members' E log V entries for their answers (E log tau + E log pi
// folded into the first group), built in JAX. Per row t (weight w_t, gold g_t or -1):
//
//   s_c = sum_g table[code_tg, c]        (gold rows: columns of other classes ruled out)
//   p = softmax(s), log Z_t;  z_t(k) = sum_m p_{kM+m};  dz = max |z_t - zprev_t| over w_t > 0
//   ll += w_t log Z_t;  C[code_tg, c] += w_t p_c            (per-combination sums)
//
// so a row costs G loads and G read-add-writes of KMp / 8 vectors. The softmax needs no exp per
// column: exp(s_c) is the product over groups of exp(table[code, c] - m_code), from a table of
// those exps made once a call (m_code the table row's largest, kept in column KMp - 1, which
// _width in _native.py leaves free; log Z_t = sum_g m_code + log sum_c prod). A row whose
// products are all tiny (their sum below 1e-30) is computed the other way instead: the log
// table summed, its largest subtracted, an exp per column (the "log path"; also every row when
// the environment has CROWDLLM_EBCC_LOGPATH set, which benchmarks/ebcc_sweep_native.py uses to
// time both; 1,000,000 x 12 x 5, 10 subtypes on the 2-core AMD VM, session 27: 11-17 ms a
// sweep, and 14-21 by the log path). The per-annotator counts sum_t w_t [y_tw = l] p_tc are C summed
// over the other members' digits, and the column sums sum_t w_t p_tc the first group's C summed
// over its combinations (in JAX, tiny). A sparse
// crowd's task is a row of the same kind with one code per answer (a table row per annotator and
// label) after a bias code, padded with the code of a zero row (ebcc_coo_rows in _native.py):
// its counts are C's rows as they are, its column sums the bias row's. Each thread
// sums chunks of CHUNK rows in float lanes and carries the chunks' sums in double.
//
// Tiny posteriors (a subtype whose E log pi is far below the others') are denormal floats, and
// each operation on one costs ~100 cycles: the pass flushes them to zero (FTZ / DAZ) in every
// thread it runs on, and restores the calling thread's setting when it is done.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using crowdllm_simd::AlignedVector;
using crowdllm_simd::exp256;
using crowdllm_simd::hash23;
using crowdllm_simd::log256;
using crowdllm_simd::transpose8;
using crowdllm_simd::Workers;

constexpr int MAXV = 32;         // at most 256 columns (K M)
constexpr int64_t CHUNK = 16384;  // rows summed in float lanes before the sums go to double

struct Inputs {
  const uint16_t* codes;
  int64_t G;
  const int8_t* flags;
  const float* wts;
  const float* tab;  // [NC, KMp]
  const float* etab;  // [NC, KMp] or null: exp(tab - its row's max), the max in column KMp - 1
  int64_t NC, K, M, KMp;
  const float* zprev;  // [T, K]
  float* z;            // [T, K]
  const float* q;      // GIVEN: [T, K M] the posteriors to sum
  float* post;         // POST: [T, K M] the posteriors out
  const float* zvote;     // START: [T, K] the class fractions to split over subtypes
  const int32_t* rowid;   // START: [T] the row whose draws each row takes
  uint32_t seed0, seed1;  // START: the draws' two words
};

struct Part {  // one thread's share
  AlignedVector<float> C;    // [NC, KMp]: the current chunk's sums
  AlignedVector<double> D;  // [NC, KMp]: the chunks' sums (made at the first carry: a share
                            // of at most CHUNK rows keeps its sums in C alone)
  __m256d ll = _mm256_setzero_pd();
  __m256 dz = _mm256_setzero_ps();
  void flush(size_t n = SIZE_MAX) {  // the first n sums (all by default) carried into double
    if (D.empty()) D.assign(C.size(), 0.0);
    n = std::min(n, C.size());
    for (size_t j = 0; j < n; ++j) D[j] += C[j];
    std::fill(C.begin(), C.begin() + n, 0.f);
  }
};

// SWEEP: the E-step and its sums (z, dz, log-likelihood, C); POST: the E-step's posteriors
// written out (nothing summed); GIVEN: the sums C of given posteriors; START: the sums C of
// EBCC's random start, drawn here (start_rows), never stored; RATIO: BWA's truths of a sparse
// crowd's tasks and their sums C (ratio_block); RATIO_POST: those truths written out z [T, K]
enum Mode { SWEEP = 0, POST = 1, GIVEN = 2, START = 3, RATIO = 4, RATIO_POST = 5 };
constexpr bool summed(int mode) { return mode != POST && mode != RATIO_POST; }

// the lanes of a row's columns [8 v, 8 v + 8) that are below KM (its last vector's tail is not)
inline __m256i tail_mask(int v, int KM) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(KM - 8 * v),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The M-step's read-add-writes: row i's weighted posteriors of columns [8 v, 8 v + 8) (r[i])
// added to its G combinations' sums. Adjacent rows with the same combination in a group are
// summed in a register first, and their combination's sums read and written once (rows sorted
// by their answers, as EBCC's merge leaves them, share the last group's combination over long
// runs).
inline void add_rows(const Inputs& a, const uint16_t* codes, int64_t G, int v, const __m256 r[8],
                     Part& part) {
  for (int64_t g = 0; g < G; ++g) {
    __m256 run = r[0];
    for (int i = 1; i <= 8; ++i) {
      const uint16_t prev = codes[(i - 1) * G + g];
      if (i < 8 && codes[i * G + g] == prev) {
        run = _mm256_add_ps(run, r[i]);
        continue;
      }
      float* acc = part.C.data() + (int64_t)prev * a.KMp + 8 * v;
      _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), run));
      if (i < 8) run = r[i];
    }
  }
}

// GIVEN: 8 rows' posteriors q [8, K M], weighted, added to their combinations' sums.
template <int GT>
inline void given_block(const Inputs& a, const uint16_t* codes, const float* wts, const float* q,
                        Part& part) {
  const int64_t G = GT > 0 ? GT : a.G;
  const int NV = (int)(a.KMp / 8), KM = (int)(a.K * a.M);
  __m256 r[8];
  for (int v = 0; v < NV; ++v) {
    const __m256i tail = tail_mask(v, KM);
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_mul_ps(_mm256_maskload_ps(q + i * KM + 8 * v, tail), _mm256_set1_ps(wts[i]));
    add_rows(a, codes, G, v, r, part);
  }
}

// START: rows [t, t + n) of EBCC's random start q [n, K M] (ebcc.start in JAX, the same draws):
// q_t(k, m) = e_km zvote_t(k) / sum_m' e_km', e = -log u, u the counter hash of element
// rowid_t K M + k M + m (_core.hash_uniform: fmix32(fmix32(i * 0x9E3779B9 + s0) ^ s1), its top
// 23 bits + 1/2, over 2^23). Rows past n: zeros.
inline void start_rows(const Inputs& a, int64_t t, int n, float* q) {
  const int K = (int)a.K, M = (int)a.M, KM = K * M, NV = (KM + 7) / 8;
  alignas(32) float e[8 * MAXV];
  std::fill(q + n * KM, q + 8 * KM, 0.f);
  for (int i = 0; i < n; ++i) {
    const uint32_t base = (uint32_t)a.rowid[t + i] * (uint32_t)KM;
    for (int v = 0; v < NV; ++v) {
      __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(base + 8 * v)),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 u = _mm256_mul_ps(
          _mm256_add_ps(_mm256_cvtepi32_ps(hash23(idx, a.seed0, a.seed1)), _mm256_set1_ps(0.5f)),
          _mm256_set1_ps(1.f / (1 << 23)));
      _mm256_store_ps(e + 8 * v, _mm256_sub_ps(_mm256_setzero_ps(), log256(u)));
    }
    const float* zv = a.zvote + (t + i) * K;
    for (int k = 0; k < K; ++k) {  // one division a class, not one a column
      float sum = 0.f;
      for (int m = 0; m < M; ++m) sum += e[k * M + m];
      const float f = zv[k] / sum;
      for (int m = 0; m < M; ++m) q[i * KM + k * M + m] = e[k * M + m] * f;
    }
  }
}

// RATIO, RATIO_POST: BWA on a sparse crowd (bwa_fit in _native.py). A table row holds two halves
// of KMp / 2 columns: the numerators of the K classes, then their denominators. A row's truth of
// class k is the ratio of its codes' summed numerators to their summed denominators (gold rows:
// their class's indicator; columns past K: 0). RATIO adds the 8 rows' weighted truths and their
// squares to their codes' sums (the two halves of C); RATIO_POST writes the truths to z [n_out, K].
template <int GT, int MODE>
inline void ratio_block(const Inputs& a, const uint16_t* codes, const int8_t* flags,
                        const float* wts, float* z, int n_out, Part& part) {
  const int64_t G = GT > 0 ? GT : a.G, half = a.KMp / 2;
  const int K = (int)a.K, H = (int)(half / 8);
  __m256 r[8], r2[8];
  for (int v = 0; v < H; ++v) {
    const __m256i tail = tail_mask(v, K);
    for (int i = 0; i < 8; ++i) {
      const uint16_t* c = codes + i * G;
      const float* t0 = a.tab + (int64_t)c[0] * a.KMp + 8 * v;
      __m256 num = _mm256_loadu_ps(t0), den = _mm256_loadu_ps(t0 + half);
      for (int64_t g = 1; g < G; ++g) {
        const float* tg = a.tab + (int64_t)c[g] * a.KMp + 8 * v;
        num = _mm256_add_ps(num, _mm256_loadu_ps(tg));
        den = _mm256_add_ps(den, _mm256_loadu_ps(tg + half));
      }
      __m256 x = _mm256_and_ps(_mm256_div_ps(num, den), _mm256_castsi256_ps(tail));
      if (flags[i] >= 0) {
        const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(8 * v),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        x = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(col, _mm256_set1_epi32(flags[i]))),
                          _mm256_set1_ps(1.f));
      }
      if constexpr (MODE == RATIO_POST) {
        if (i < n_out) _mm256_maskstore_ps(z + i * K + 8 * v, tail, x);
      } else {
        r[i] = _mm256_mul_ps(x, _mm256_set1_ps(wts[i]));
        r2[i] = _mm256_mul_ps(r[i], x);
      }
    }
    if constexpr (MODE == RATIO) {
      add_rows(a, codes, G, v, r, part);
      add_rows(a, codes, G, H + v, r2, part);
    }
  }
}

// r[i] = row i's columns [8 v, 8 v + 8) of the lane-major S times `factor` (zeros past KM).
inline void to_rows(const float* S, int v, int KM, __m256 factor, __m256 r[8]) {
  for (int j = 0; j < 8; ++j)
    r[j] = 8 * v + j < KM ? _mm256_mul_ps(_mm256_load_ps(S + (8 * v + j) * 8), factor)
                          : _mm256_setzero_ps();
  transpose8(r);
}

// One block of 8 rows: codes [8, G], flags [8], weights [8], zprev and z [8, K] (z: the first
// n_out rows written). The scores are gathered row by row (G table rows of KMp floats each) and
// transposed 8 x 8 at a time into S[c] = column c of the 8 rows (one row per lane), so the
// softmax, the class sums over subtypes and the log-likelihood are lane-wise vector operations
// over the columns (no horizontal reductions, no scalar sums); the weighted posteriors are
// transposed back to rows for the M-step's read-add-writes.
template <int GT, int MODE>
inline void block(const Inputs& a, const uint16_t* codes, const int8_t* flags, const float* wts,
                  const float* zprev, float* z, float* post, int n_out, Part& part) {
  const int64_t G = GT > 0 ? GT : a.G;  // 3 groups (12 annotators, 4-8 classes): unrolled
  const int NV = (int)(a.KMp / 8), K = (int)a.K, M = (int)a.M, KM = K * M;
  alignas(32) float S[8 * MAXV * 8];  // [KMp columns][8 lanes]
  __m256 r[8];
  int64_t fl8;
  std::memcpy(&fl8, flags, 8);
  const bool any_gold = fl8 != -1;
  const __m256i f = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(fl8));
  const __m256 gold = _mm256_castsi256_ps(_mm256_cmpgt_epi32(f, _mm256_set1_epi32(-1)));
  // lanes where class k is allowed: rows without gold, and rows whose gold is k
  auto live = [&](int k) {
    return any_gold ? _mm256_or_ps(_mm256_xor_ps(gold, _mm256_castsi256_ps(_mm256_set1_epi32(-1))),
                                   _mm256_castsi256_ps(_mm256_cmpeq_epi32(f, _mm256_set1_epi32(k))))
                    : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  };
  // S[c] = exp(s_c - lz) and sum = sum_c S[c] per lane (row), so that log Z = lz + log(sum)
  __m256 sum = _mm256_setzero_ps(), lz = _mm256_setzero_ps();
  __m256 redo = _mm256_castsi256_ps(_mm256_set1_epi32(-1));  // the lanes the log path computes
  if (a.etab != nullptr) {
    // exp(s_c) = prod_g exp(table[code_g, c]): each group's factor from the exp table
    // (exp(table - its row's max m), in [0, 1]), lz = sum_g m[code_g] (summed in the last
    // column): no exp per column. A row whose factors disagree so much that even its largest
    // product is tiny (sum < 1e-30: the float range is near) takes the log path below instead,
    // so that no column the log path keeps (above 1e-8 of the row's largest) is lost; each row
    // (lane) on its own, so that its result does not depend on the rows beside it.
    const int last = NV - 1;
    for (int v = 0; v < NV; ++v) {
      for (int i = 0; i < 8; ++i) {
        const uint16_t* c = codes + i * G;
        __m256 x = _mm256_loadu_ps(a.etab + (int64_t)c[0] * a.KMp + 8 * v);
        if (v == last) {
          __m256 xs = x;
          for (int64_t g = 1; g < G; ++g) {
            const __m256 y = _mm256_loadu_ps(a.etab + (int64_t)c[g] * a.KMp + 8 * v);
            x = _mm256_mul_ps(x, y);
            xs = _mm256_add_ps(xs, y);
          }
          x = _mm256_blend_ps(x, xs, 0x80);  // column KMp - 1: the sum of the maxima
        } else {
          for (int64_t g = 1; g < G; ++g)
            x = _mm256_mul_ps(x, _mm256_loadu_ps(a.etab + (int64_t)c[g] * a.KMp + 8 * v));
        }
        r[i] = x;
      }
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(S + (8 * v + j) * 8, r[j]);
    }
    lz = _mm256_load_ps(S + (a.KMp - 1) * 8);
    for (int k = 0; k < K; ++k) {
      const __m256 lv = live(k);
      for (int m = 0; m < M; ++m) {
        float* col = S + (k * M + m) * 8;
        __m256 x = _mm256_load_ps(col);
        if (any_gold) {
          x = _mm256_and_ps(x, lv);
          _mm256_store_ps(col, x);
        }
        sum = _mm256_add_ps(sum, x);
      }
    }
    redo = _mm256_cmp_ps(sum, _mm256_set1_ps(1e-30f), _CMP_LT_OQ);
  }
  if (_mm256_movemask_ps(redo) != 0) {
    // the log path: scores summed from the log table, the row's max subtracted before the exp
    // (into S itself where there is no exp table, else into L and blended into S)
    alignas(32) float L[8 * MAXV * 8];
    float* D = a.etab != nullptr ? L : S;
    for (int v = 0; v < NV; ++v) {
      for (int i = 0; i < 8; ++i) {
        const uint16_t* c = codes + i * G;
        __m256 x = _mm256_loadu_ps(a.tab + (int64_t)c[0] * a.KMp + 8 * v);
        for (int64_t g = 1; g < G; ++g)
          x = _mm256_add_ps(x, _mm256_loadu_ps(a.tab + (int64_t)c[g] * a.KMp + 8 * v));
        r[i] = x;
      }
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(D + (8 * v + j) * 8, r[j]);
    }
    const __m256 ruled = _mm256_set1_ps(-1e30f);
    __m256 mx = ruled;
    for (int k = 0; k < K; ++k) {
      const __m256 lv = live(k);
      for (int m = 0; m < M; ++m) {
        float* col = D + (k * M + m) * 8;
        __m256 x = _mm256_load_ps(col);
        if (any_gold) {
          x = _mm256_blendv_ps(ruled, x, lv);
          _mm256_store_ps(col, x);
        }
        mx = _mm256_max_ps(mx, x);
      }
    }
    __m256 sum2 = _mm256_setzero_ps();
    for (int c = 0; c < KM; ++c) {
      // ruled-out columns: exp256 clamps at exp(-87), so they are zeroed by their score's mask
      __m256 x = _mm256_load_ps(D + c * 8);
      __m256 e = exp256(_mm256_sub_ps(x, mx));
      if (any_gold) e = _mm256_and_ps(e, _mm256_cmp_ps(x, ruled, _CMP_GT_OQ));
      if (D != S) e = _mm256_blendv_ps(_mm256_load_ps(S + c * 8), e, redo);
      _mm256_store_ps(S + c * 8, e);
      sum2 = _mm256_add_ps(sum2, e);
    }
    sum = sum2;  // (the kept lanes' sums again, over the same columns in the same order)
    lz = _mm256_blendv_ps(lz, mx, redo);
  }
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), sum);
  if (MODE == POST) {  // the rows' posteriors, transposed back to rows, stored (n_out rows)
    for (int v = 0; v < NV; ++v) {
      to_rows(S, v, KM, inv, r);
      const __m256i tail = tail_mask(v, KM);
      for (int i = 0; i < n_out; ++i) _mm256_maskstore_ps(post + i * KM + 8 * v, tail, r[i]);
    }
    return;
  }
  const __m256 wt = _mm256_loadu_ps(wts);
  // log Z of each row, weighted (padding rows weigh 0), carried in double
  const __m256 ll = _mm256_mul_ps(_mm256_add_ps(lz, log256(sum)), wt);
  part.ll += _mm256_cvtps_pd(_mm256_castps256_ps128(ll));
  part.ll += _mm256_cvtps_pd(_mm256_extractf128_ps(ll, 1));
  alignas(32) float zt[8];
  const __m256 live_row = _mm256_cmp_ps(wt, _mm256_setzero_ps(), _CMP_GT_OQ);
  for (int k = 0; k < K; ++k) {
    __m256 zk = _mm256_load_ps(S + k * M * 8);
    for (int m = 1; m < M; ++m) zk = _mm256_add_ps(zk, _mm256_load_ps(S + (k * M + m) * 8));
    zk = _mm256_mul_ps(zk, inv);
    __m256 zp = _mm256_i32gather_ps(zprev + k, _mm256_mullo_epi32(
        _mm256_set1_epi32(K), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 4);
    __m256 d = _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_sub_ps(zk, zp));
    part.dz = _mm256_max_ps(part.dz, _mm256_and_ps(d, live_row));
    _mm256_store_ps(zt, zk);
    for (int i = 0; i < n_out; ++i) z[i * K + k] = zt[i];
  }
  const __m256 scale = _mm256_mul_ps(inv, wt);  // w_t / Z_t
  for (int v = 0; v < NV; ++v) {
    to_rows(S, v, KM, scale, r);  // r[i]: row i's weighted posteriors of columns 8v .. 8v + 7
    add_rows(a, codes, G, v, r, part);
  }
}

constexpr int PF = 4;  // blocks ahead

// the table rows and sums (their first 64 bytes: a sparse crowd's rows of 8 columns) of 8 rows
inline void prefetch_rows(const Inputs& a, const uint16_t* codes, int64_t G, const Part& part) {
  for (int64_t j = 0; j < 8 * G; ++j) {
    const int64_t off = (int64_t)codes[j] * a.KMp;
    _mm_prefetch(reinterpret_cast<const char*>((a.etab != nullptr ? a.etab : a.tab) + off),
                 _MM_HINT_T0);
    if (!part.C.empty())
      _mm_prefetch(reinterpret_cast<const char*>(part.C.data() + off), _MM_HINT_T0);
  }
}

// every cache line of n floats from p
inline void prefetch_span(const float* p, int64_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t b = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; b < end; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(b), _MM_HINT_T0);
}

template <int GT, int MODE>
void rows(const Inputs& a, int64_t r0, int64_t r1, Part& part) {
  const int64_t G = a.G, K = a.K, KM = a.K * a.M;
  const bool sums = summed(MODE);
  // The sums go to double every CHUNK rows. A table of many combinations (a sparse crowd's, one
  // row per annotator and label: ebcc_coo_rows in _native.py) would cost more to carry over than
  // to fill, so past its first row (the bias, which every row adds to) it is carried over every
  // `every` rows instead: a sum there still takes few rows' values in float.
  const int64_t every = std::max<int64_t>(1, 8 * a.NC / CHUNK) * CHUNK;
  // A table past L2 (a sparse crowd's) is read and summed into at random rows: each block fetches
  // the table rows (and sums) of the block PF blocks ahead, so that those misses overlap.
  const bool fetch = a.NC * a.KMp * 4 > (256 << 10);
  std::vector<float> qs(MODE == START ? 8 * KM : 0);  // START: a block's drawn posteriors
  int64_t t = r0;
  for (; t + 8 <= r1; t += 8) {
    if (sums && t > r0 && (t - r0) % CHUNK == 0)
      part.flush((t - r0) % every == 0 ? SIZE_MAX : a.KMp);
    if (t + 8 * (PF + 1) <= r1) {
      if (fetch) prefetch_rows(a, a.codes + (t + 8 * PF) * G, G, part);
      // the previous and new class posteriors of that block (gathered and stored lane by lane:
      // the hardware prefetcher does not follow those streams)
      if (MODE == SWEEP) {
        prefetch_span(a.zprev + (t + 8 * PF) * K, 8 * K);
        prefetch_span(a.z + (t + 8 * PF) * K, 8 * K);
      }
    }
    if constexpr (MODE == RATIO || MODE == RATIO_POST) {
      ratio_block<GT, MODE>(a, a.codes + t * G, a.flags + t, MODE == RATIO ? a.wts + t : nullptr,
                            MODE == RATIO_POST ? a.z + t * K : nullptr, 8, part);
    } else if (MODE == GIVEN) {
      given_block<GT>(a, a.codes + t * G, a.wts + t, a.q + t * KM, part);
    } else if (MODE == START) {
      start_rows(a, t, 8, qs.data());
      given_block<GT>(a, a.codes + t * G, a.wts + t, qs.data(), part);
    } else
      block<GT, MODE>(a, a.codes + t * G, a.flags + t, a.wts + t,
                      MODE == SWEEP ? a.zprev + t * K : nullptr, MODE == SWEEP ? a.z + t * K : nullptr,
                      MODE == POST ? a.post + t * KM : nullptr, 8, part);
  }
  if (t < r1) {  // the last rows, padded to a block with weightless copies of row r0
    const int n = (int)(r1 - t);
    std::vector<uint16_t> c(8 * G);
    std::vector<float> zp(8 * K, 0.f), qp(8 * KM, 0.f);
    int8_t f[8];
    float w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::fill(f, f + 8, int8_t(-1));
    for (int i = 0; i < 8; ++i) std::memcpy(&c[i * G], a.codes + (i < n ? t + i : r0) * G, G * 2);
    if (a.flags != nullptr) std::memcpy(f, a.flags + t, n);
    if (a.wts != nullptr) std::memcpy(w, a.wts + t, n * sizeof(float));
    if (MODE == SWEEP) std::memcpy(zp.data(), a.zprev + t * K, n * K * sizeof(float));
    if constexpr (MODE == RATIO || MODE == RATIO_POST) {
      ratio_block<GT, MODE>(a, c.data(), f, w, MODE == RATIO_POST ? a.z + t * K : nullptr, n,
                            part);
    } else if (MODE == GIVEN || MODE == START) {
      if (MODE == GIVEN) std::memcpy(qp.data(), a.q + t * KM, n * KM * sizeof(float));
      else start_rows(a, t, n, qp.data());
      given_block<GT>(a, c.data(), w, qp.data(), part);
    } else {
      block<GT, MODE>(a, c.data(), f, w, zp.data(), MODE == SWEEP ? a.z + t * K : nullptr,
                      MODE == POST ? a.post + t * KM : nullptr, n, part);
    }
  }
  if (sums && !part.D.empty()) part.flush();
}

// The exp table of the E-step's products (Inputs::etab) from the log table: each row's columns
// [0, K M) as exp(x - m), m the row's largest, m in column KMp - 1, zeros between.
void exp_rows(const Inputs& a, int64_t c0, int64_t c1, float* etab) {
  const int NV = (int)(a.KMp / 8), KM = (int)(a.K * a.M);
  for (int64_t c = c0; c < c1; ++c) {
    const float* x = a.tab + c * a.KMp;
    float m = x[0];
    for (int j = 1; j < KM; ++j) m = std::max(m, x[j]);
    float* e = etab + c * a.KMp;
    for (int v = 0; v < NV; ++v) {
      const __m256 y = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + 8 * v), _mm256_set1_ps(m)));
      _mm256_store_ps(e + 8 * v, _mm256_and_ps(y, _mm256_castsi256_ps(tail_mask(v, KM))));
    }
    e[a.KMp - 1] = m;
  }
}

// Rows [0, T) split over threads. SWEEP, GIVEN, START: the sums C into `sums` (and SWEEP: the
// summed log-likelihood and the largest move into stats[0], stats[1]).
template <int MODE>
void Run(const Inputs& a_in, int64_t T, int64_t threads, float* sums, float* stats) {
  Inputs a = a_in;
  AlignedVector<float> etab;
  // the E-step on products of the exp table (Inputs::etab) where a row has a column past K M
  // for its log offset (_width in _native.py leaves one). However many factors a row has: a row
  // padded with more slots (the zero row's factors, 1 and 0) computes the same.
  const char* logpath = std::getenv("CROWDLLM_EBCC_LOGPATH");  // set, not "" or "0": log path
  if ((MODE == SWEEP || MODE == POST) && a.KMp > a.K * a.M &&
      (logpath == nullptr || *logpath == 0 || std::strcmp(logpath, "0") == 0)) {
    etab.resize(a.NC * a.KMp);
    const int ne = (int)std::max<int64_t>(1, std::min<int64_t>(threads, a.NC / 4096));
    Workers::run(ne, [&](int64_t i) {
      exp_rows(a, a.NC * i / ne, a.NC * (i + 1) / ne, etab.data());
    });
    a.etab = etab.data();
  }
  auto fn = a.G == 3 ? rows<3, MODE> : a.G == 4 ? rows<4, MODE> : rows<0, MODE>;
  // Shares of the rows. With a small table (a dense panel's), about 8 fixed chunks that the
  // threads take in turn as each finishes one (a thread slowed by a neighbour on its core takes
  // fewer), each summed on its own: the sums, added in chunk order, do not depend on which
  // thread ran a chunk nor on how many threads there are. With a large table (a sparse crowd's,
  // whose sums per share would cost more than the rows), one share a thread.
  const int n = (int)std::max<int64_t>(1, std::min<int64_t>(threads, (T + 4095) / 4096));
  const bool chunked = a.NC * a.KMp * 4 <= (int64_t{1} << 20);
  const int64_t span = std::max<int64_t>(CHUNK, ((T + 7) / 8 + 7) / 8 * 8);
  // at least one share: with no rows, it still leaves zero sums for the reduction below
  const int64_t shares = std::max<int64_t>(1, chunked ? (T + span - 1) / span : n);
  std::vector<Part> parts(shares);
  std::atomic<int64_t> next{0};
  auto work = [&] {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < shares;) {
      Part& part = parts[i];
      if (summed(MODE)) part.C.assign(a.NC * a.KMp, 0.f);
      if (chunked) fn(a, i * span, std::min(T, (i + 1) * span), part);
      else fn(a, T * i / n, T * (i + 1) / n, part);
    }
    _mm_setcsr(csr);
  };
  Workers::run(std::min<int64_t>(n, shares), [&](int64_t) { work(); });
  if (!summed(MODE)) return;
  // the shares' sums added in double, 4 at a time (a sparse crowd's table has ~10^5 rows)
  const int64_t N = a.NC * a.KMp;  // a multiple of 8
  for (int64_t j = 0; j < N; j += 4) {
    __m256d acc = _mm256_setzero_pd();
    for (auto& part : parts)
      acc = _mm256_add_pd(acc, part.D.empty() ? _mm256_cvtps_pd(_mm_loadu_ps(part.C.data() + j))
                                              : _mm256_loadu_pd(part.D.data() + j));
    _mm_storeu_ps(sums + j, _mm256_cvtpd_ps(acc));
  }
  if (MODE != SWEEP) return;
  double ll = 0;
  float dz = 0;
  for (auto& part : parts) {
    alignas(32) double l[4];
    alignas(32) float d[8];
    _mm256_store_pd(l, part.ll);
    _mm256_store_ps(d, part.dz);
    for (double x : l) ll += x;
    for (float x : d) dz = std::max(dz, x);
  }
  stats[0] = (float)ll;
  stats[1] = dz;
}

// Asks for huge pages on a large output buffer that is about to be written for the first time
// (XLA's fresh buffers are not madvised; 77 MB of posteriors fault in 4 KiB pages otherwise).
// A hint: where huge pages are off, or the buffer was written before, nothing changes.
inline void huge_pages(void* p, size_t bytes) {
  constexpr uintptr_t HUGE = uintptr_t{1} << 21;
  if (bytes < 4 * HUGE) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(HUGE - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
}

// The checks every mode shares: codes [T, G], table (or sums) [NC, KMp], the column count.
ffi::Error Check(ffi::Buffer<ffi::U16>& codes, ffi::Span<const int64_t> td, int64_t K, int64_t M,
                 Inputs* a) {
  auto cd = codes.dimensions();
  if (cd.size() != 2 || td.size() != 2 || cd[1] < 1)
    return ffi::Error::InvalidArgument("ebcc: codes [T, G >= 1] and table [NC, KMp] expected");
  const int64_t KMp = td[1];
  if (K < 1 || M < 1 || KMp % 8 || KMp / 8 > MAXV || K * M > KMp)
    return ffi::Error::InvalidArgument("ebcc: K M <= KMp <= 256 columns, KMp a multiple of 8");
  *a = Inputs{codes.typed_data(), cd[1], nullptr, nullptr, nullptr, nullptr, td[0], K, M, KMp,
              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0};
  return ffi::Error::Success();
}

ffi::Error SweepImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> table,
                     ffi::Buffer<ffi::F32> zprev, ffi::ResultBuffer<ffi::F32> z,
                     ffi::ResultBuffer<ffi::F32> sums, ffi::ResultBuffer<ffi::F32> stats,
                     int64_t K, int64_t M, int64_t threads) {
  Inputs a;
  if (auto e = Check(codes, table.dimensions(), K, M, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (flags.dimensions()[0] != T || weights.dimensions()[0] != T ||
      zprev.element_count() != T * K || z->element_count() != T * K ||
      sums->element_count() != table.element_count())
    return ffi::Error::InvalidArgument("ebcc: flags, weights [T], zprev, z [T, K], sums like table");
  a.flags = flags.typed_data();
  a.wts = weights.typed_data();
  a.tab = table.typed_data();
  a.zprev = zprev.typed_data();
  a.z = z->typed_data();
  Run<SWEEP>(a, T, threads, sums->typed_data(), stats->typed_data());
  return ffi::Error::Success();
}

// The E-step's posteriors q(z, g) of every row, [T, K M] (gold rows: their class's columns).
ffi::Error PostImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                    ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> post, int64_t K,
                    int64_t M, int64_t threads) {
  Inputs a;
  if (auto e = Check(codes, table.dimensions(), K, M, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (flags.dimensions()[0] != T || post->element_count() != T * K * M)
    return ffi::Error::InvalidArgument("ebcc: flags [T] and posteriors [T, K M] expected");
  a.flags = flags.typed_data();
  a.tab = table.typed_data();
  a.post = post->typed_data();
  huge_pages(a.post, T * K * M * sizeof(float));
  Run<POST>(a, T, threads, nullptr, nullptr);
  return ffi::Error::Success();
}

// The per-combination sums of EBCC's random start, drawn here: rows' class fractions zvote
// [T, K], the row each takes its draws from [T], the draws' two words [2] (see start_rows).
ffi::Error StartImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::F32> weights,
                     ffi::Buffer<ffi::F32> zvote, ffi::Buffer<ffi::S32> rowid,
                     ffi::Buffer<ffi::U32> seeds, ffi::ResultBuffer<ffi::F32> sums, int64_t K,
                     int64_t M, int64_t threads) {
  Inputs a;
  if (auto e = Check(codes, sums->dimensions(), K, M, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (weights.dimensions()[0] != T || zvote.element_count() != T * K ||
      rowid.element_count() != T || seeds.element_count() != 2)
    return ffi::Error::InvalidArgument("ebcc: weights, row ids [T], fractions [T, K], 2 seeds");
  a.wts = weights.typed_data();
  a.zvote = zvote.typed_data();
  a.rowid = rowid.typed_data();
  a.seed0 = seeds.typed_data()[0];
  a.seed1 = seeds.typed_data()[1];
  Run<START>(a, T, threads, sums->typed_data(), nullptr);
  return ffi::Error::Success();
}

// The per-combination sums of given posteriors q [T, K M], each row weighted (EBCC's start).
ffi::Error GivenImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::F32> weights,
                     ffi::Buffer<ffi::F32> q, ffi::ResultBuffer<ffi::F32> sums, int64_t K,
                     int64_t M, int64_t threads) {
  Inputs a;
  if (auto e = Check(codes, sums->dimensions(), K, M, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (weights.dimensions()[0] != T || q.element_count() != T * K * M)
    return ffi::Error::InvalidArgument("ebcc: weights [T] and posteriors [T, K M] expected");
  a.wts = weights.typed_data();
  a.q = q.typed_data();
  Run<GIVEN>(a, T, threads, sums->typed_data(), nullptr);
  return ffi::Error::Success();
}

// BWA's ratio pass over a sparse crowd's rows (ratio_block): table [NC, KMp] (numerators in
// columns [0, KMp / 2), denominators in [KMp / 2, KMp)) -> sums [NC, KMp] (the rows' weighted
// truths, then their squares, per code).
ffi::Error CheckRatio(ffi::Buffer<ffi::U16>& codes, ffi::Span<const int64_t> td, int64_t K,
                      Inputs* a) {
  if (td.size() == 2 && (td[1] % 16 || K > td[1] / 2))
    return ffi::Error::InvalidArgument("ebcc: ratio table [NC, 2 x K padded to 8] expected");
  return Check(codes, td, K, 1, a);
}

ffi::Error RatioImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> table,
                     ffi::ResultBuffer<ffi::F32> sums, int64_t K, int64_t threads) {
  Inputs a;
  if (auto e = CheckRatio(codes, table.dimensions(), K, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (flags.dimensions()[0] != T || weights.dimensions()[0] != T ||
      sums->element_count() != table.element_count())
    return ffi::Error::InvalidArgument("ebcc: flags, weights [T] and sums like table expected");
  a.flags = flags.typed_data();
  a.wts = weights.typed_data();
  a.tab = table.typed_data();
  Run<RATIO>(a, T, threads, sums->typed_data(), nullptr);
  return ffi::Error::Success();
}

// BWA's truths of every row, z [T, K] (RatioImpl's table).
ffi::Error RatioPostImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                         ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> z, int64_t K,
                         int64_t threads) {
  Inputs a;
  if (auto e = CheckRatio(codes, table.dimensions(), K, &a); e.failure()) return e;
  const int64_t T = codes.dimensions()[0];
  if (flags.dimensions()[0] != T || z->element_count() != T * K)
    return ffi::Error::InvalidArgument("ebcc: flags [T] and truths [T, K] expected");
  a.flags = flags.typed_data();
  a.tab = table.typed_data();
  a.z = z->typed_data();
  Run<RATIO_POST>(a, T, threads, nullptr, nullptr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccRatio, RatioImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccRatioPost, RatioPostImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccSweep, SweepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("M")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccPost, PostImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("M")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccGiven, GivenImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("M")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmEbccStart, StartImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("M")
                                  .Attr<int64_t>("threads"));
