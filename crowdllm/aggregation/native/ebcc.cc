// EBCC's VB sweep over a dense panel's rows, by groups of annotators (AVX2, CPU).
//
// Built with ds_grouped.cc by crowdllm/aggregation/_native.py and called from JAX as an XLA FFI
// custom call (crowdllm_ebcc_sweep). EBCC's latent state of a task is a (class k, subtype m) pair,
// column c = k M + m (K M columns, padded to KMp, a multiple of 8). The annotators are grouped and
// each row encoded as ds_grouped.cc does (one uint16 combination code per group); `table[code, c]`
// is the sum of the group's members' E log V entries for their answers (E log tau + E log pi
// folded into the first group), built in JAX. Per row t (weight w_t, gold g_t or -1):
//
//   s_c = sum_g table[code_tg, c]        (gold rows: columns of other classes ruled out)
//   p = softmax(s), log Z_t;  z_t(k) = sum_m p_{kM+m};  dz = max |z_t - zprev_t| over w_t > 0
//   ll += w_t log Z_t;  C[code_tg, c] += w_t p_c            (per-combination sums)
//
// so a row costs G loads and G read-add-writes of KMp / 8 vectors. The per-annotator counts
// sum_t w_t [y_tw = l] p_tc are C summed over the other members' digits, and the column sums
// sum_t w_t p_tc the first group's C summed over its combinations (in JAX, tiny). Each thread
// sums chunks of CHUNK rows in float lanes and carries the chunks' sums in double.
//
// Tiny posteriors (a subtype whose E log pi is far below the others') are denormal floats, and
// each operation on one costs ~100 cycles: the pass flushes them to zero (FTZ / DAZ) in every
// thread it runs on, and restores the calling thread's setting when it is done.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using crowdllm_simd::exp256;

constexpr int MAXV = 32;         // at most 256 columns (K M)
constexpr int64_t CHUNK = 16384;  // rows summed in float lanes before the sums go to double

struct Inputs {
  const uint16_t* codes;
  int64_t G;
  const int8_t* flags;
  const float* wts;
  const float* tab;  // [NC, KMp]
  int64_t NC, K, M, KMp;
  const float* zprev;  // [T, K]
  float* z;            // [T, K]
};

struct Part {  // one thread's share
  std::vector<float> C;   // [NC, KMp]: the current chunk's sums
  std::vector<double> D;  // [NC, KMp]: the chunks' sums
  double ll = 0;
  float dz = 0;
  void flush() {
    for (size_t j = 0; j < C.size(); ++j) D[j] += C[j];
    std::fill(C.begin(), C.end(), 0.f);
  }
};

inline float hmax(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_cvtss_f32(v);
}

inline float hsum(__m256 v) {
  v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_cvtss_f32(v);
}

// lanes of vector v whose column lies in [lo, hi)
inline __m256 live_mask(int v, int64_t lo, int64_t hi) {
  __m256i c = _mm256_add_epi32(_mm256_set1_epi32(8 * v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i ge = _mm256_cmpgt_epi32(c, _mm256_set1_epi32((int)lo - 1));
  __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), c);
  return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
}

template <int GT>
void rows(const Inputs& a, int64_t r0, int64_t r1, Part& part) {
  const int64_t G = GT > 0 ? GT : a.G;  // 3 groups (12 annotators, 4-8 classes): unrolled
  const int NV = (int)(a.KMp / 8), K = (int)a.K, M = (int)a.M;
  const __m256 ruled = _mm256_set1_ps(-1e30f);
  __m256 all[MAXV];  // the live columns of a row without gold
  for (int v = 0; v < NV; ++v) all[v] = live_mask(v, 0, a.K * a.M);
  alignas(32) float p[8 * MAXV];
  for (int64_t t = r0; t < r1; ++t) {
    if (t > r0 && (t - r0) % CHUNK == 0) part.flush();
    const uint16_t* c = a.codes + t * G;
    __m256 s[MAXV], live[MAXV];
    {
      const float* row = a.tab + (int64_t)c[0] * a.KMp;
      for (int v = 0; v < NV; ++v) s[v] = _mm256_loadu_ps(row + 8 * v);
    }
    for (int64_t g = 1; g < G; ++g) {
      const float* row = a.tab + (int64_t)c[g] * a.KMp;
      for (int v = 0; v < NV; ++v) s[v] = _mm256_add_ps(s[v], _mm256_loadu_ps(row + 8 * v));
    }
    const int gold = a.flags[t];
    for (int v = 0; v < NV; ++v)
      live[v] = gold >= 0 ? live_mask(v, (int64_t)gold * M, (int64_t)(gold + 1) * M) : all[v];
    __m256 mx = ruled;
    for (int v = 0; v < NV; ++v) {
      s[v] = _mm256_blendv_ps(ruled, s[v], live[v]);
      mx = _mm256_max_ps(mx, s[v]);
    }
    const float m = hmax(mx);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      s[v] = _mm256_and_ps(exp256(_mm256_sub_ps(s[v], mv)), live[v]);  // ruled out: exactly 0
      sum = _mm256_add_ps(sum, s[v]);
    }
    const float tot = hsum(sum);
    const __m256 inv = _mm256_set1_ps(1.f / tot);
    for (int v = 0; v < NV; ++v) _mm256_store_ps(p + 8 * v, _mm256_mul_ps(s[v], inv));
    const float wt = a.wts[t];
    const float* zp = a.zprev + t * K;
    float* zt = a.z + t * K;
    for (int k = 0; k < K; ++k) {
      float zk = 0;
      for (int j = 0; j < M; ++j) zk += p[k * M + j];
      zt[k] = zk;
      if (wt > 0) part.dz = std::max(part.dz, std::fabs(zk - zp[k]));
    }
    if (wt == 0) continue;  // padding: no sums
    part.ll += (double)wt * ((double)m + std::log((double)tot));
    const __m256 wv = _mm256_set1_ps(wt / tot);
    for (int v = 0; v < NV; ++v) s[v] = _mm256_mul_ps(s[v], wv);  // w_t p
    for (int64_t g = 0; g < G; ++g) {
      float* acc = part.C.data() + (int64_t)c[g] * a.KMp;
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(acc + 8 * v, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * v), s[v]));
    }
  }
  part.flush();
}

ffi::Error SweepImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> table,
                     ffi::Buffer<ffi::F32> zprev, ffi::ResultBuffer<ffi::F32> z,
                     ffi::ResultBuffer<ffi::F32> sums, ffi::ResultBuffer<ffi::F32> stats,
                     int64_t K, int64_t M, int64_t threads) {
  auto cd = codes.dimensions();
  auto td = table.dimensions();
  if (cd.size() != 2 || td.size() != 2 || cd[1] < 1)
    return ffi::Error::InvalidArgument("ebcc: codes [T, G >= 1] and table [NC, KMp] expected");
  const int64_t T = cd[0], KMp = td[1];
  if (K < 1 || M < 1 || KMp % 8 || KMp / 8 > MAXV || K * M > KMp)
    return ffi::Error::InvalidArgument("ebcc: K M <= KMp <= 256 columns, KMp a multiple of 8");
  if (flags.dimensions()[0] != T || weights.dimensions()[0] != T ||
      zprev.element_count() != T * K || z->element_count() != T * K ||
      sums->element_count() != td[0] * KMp)
    return ffi::Error::InvalidArgument("ebcc: flags, weights [T], zprev, z [T, K], sums like table");
  Inputs a{codes.typed_data(), cd[1], flags.typed_data(), weights.typed_data(),
           table.typed_data(), td[0], K, M, KMp, zprev.typed_data(), z->typed_data()};
  auto fn = cd[1] == 3 ? rows<3> : rows<0>;
  const int n = (int)std::max<int64_t>(1, std::min<int64_t>(threads, (T + 4095) / 4096));
  std::vector<Part> parts(n);
  auto work = [&](int i) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero
    Part& part = parts[i];
    part.C.assign(a.NC * KMp, 0.f);
    part.D.assign(a.NC * KMp, 0.0);
    fn(a, T * i / n, T * (i + 1) / n, part);
    _mm_setcsr(csr);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < n; ++i) pool.emplace_back(work, i);
  work(0);
  for (auto& th : pool) th.join();
  float* out = sums->typed_data();
  for (int64_t j = 0; j < a.NC * KMp; ++j) {
    double acc = 0;
    for (auto& part : parts) acc += part.D[j];
    out[j] = (float)acc;
  }
  double ll = 0;
  float dz = 0;
  for (auto& part : parts) ll += part.ll, dz = std::max(dz, part.dz);
  stats->typed_data()[0] = (float)ll;
  stats->typed_data()[1] = dz;
  return ffi::Error::Success();
}

}  // namespace

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
