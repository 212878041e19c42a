// Experiment (issue 5): Dawid-Skene's fused E+M pass as an XLA FFI CPU kernel, AVX2 across 8 rows.
// K = L = 5 (the benchmark panel); no gold; task weights 0/1. The table row of each (worker,
// class) sits in a register and is looked up by label with permutevar (no gathers); counts are
// masked adds; exp is a Cephes-style polynomial; the log-likelihood keeps the product of the
// normalisers as mantissa and exponent. Not used by the library; built and timed by
// benchmarks/ffi_ds.py, which checks its results against the XLA pass.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

constexpr int K = 5, L = 5, MAXW = 64;

struct Acc {
  std::vector<__m256> cnt;  // [W][L][K] lanes, flushed into dcnt every FLUSH blocks
  std::vector<double> dcnt;
  double dcs[K] = {0};
  __m256 csum[K];
  __m256 msum, prod;
  __m256i ex;
  double dmsum = 0;
  double tail_ll = 0; double tail_cnt[MAXW * L * K] = {0}; double tail_cs[K] = {0};
};

static void run(const int8_t* lab, int64_t t0, int64_t t1, int64_t W, const float* tab /*[W,L,K]*/,
                const float* prior, const float* mask, Acc& A) {
  __m256 T[MAXW][K];  // T[w][k] lane l = tab[w, l, k] (l < 5), lanes 5-7 = 0 (no answer -> index 7)
  for (int64_t w = 0; w < W; ++w)
    for (int k = 0; k < K; ++k) {
      alignas(32) float v[8] = {0};
      for (int l = 0; l < L; ++l) v[l] = tab[(w * L + l) * K + k];
      T[w][k] = _mm256_load_ps(v);
    }
  A.cnt.assign(W * L * K, _mm256_setzero_ps());
  A.dcnt.assign(W * L * K, 0.0);
  for (int k = 0; k < K; ++k) A.csum[k] = _mm256_setzero_ps();
  A.msum = _mm256_setzero_ps(); A.prod = _mm256_set1_ps(1.f); A.ex = _mm256_setzero_si256();
  const __m256i seven = _mm256_set1_epi32(7);
  int64_t nb = (t1 - t0) / 8;
  alignas(32) int32_t idx[MAXW][8];
  auto flush = [&] {  // float lanes sum at most FLUSH values each; the totals are kept in double
    alignas(32) float a[8];
    for (int64_t j = 0; j < W * L * K; ++j) {
      _mm256_store_ps(a, A.cnt[j]);
      for (float x : a) A.dcnt[j] += x;
      A.cnt[j] = _mm256_setzero_ps();
    }
    _mm256_store_ps(a, A.msum);
    for (float x : a) A.dmsum += x;
    A.msum = _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) {
      _mm256_store_ps(a, A.csum[k]);
      for (float x : a) A.dcs[k] += x;
      A.csum[k] = _mm256_setzero_ps();
    }
  };
  constexpr int64_t FLUSH = 256;
  for (int64_t b = 0; b < nb; ++b) {
    if (b % FLUSH == FLUSH - 1) flush();
    int64_t base = t0 + b * 8;
    for (int i = 0; i < 8; ++i) {
      const int8_t* y = lab + (base + i) * W;
      for (int64_t w = 0; w < W; ++w) idx[w][i] = y[w] < 0 ? 7 : y[w];
    }
    __m256 s[K];
    for (int k = 0; k < K; ++k) s[k] = _mm256_set1_ps(prior[k]);
    __m256i iv[MAXW];
    for (int64_t w = 0; w < W; ++w) {
      iv[w] = _mm256_load_si256((const __m256i*)idx[w]);
      for (int k = 0; k < K; ++k) s[k] = _mm256_add_ps(s[k], _mm256_permutevar8x32_ps(T[w][k], iv[w]));
    }
    __m256 m = s[0];
    for (int k = 1; k < K; ++k) m = _mm256_max_ps(m, s[k]);
    __m256 z = _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) { s[k] = exp256(_mm256_sub_ps(s[k], m)); z = _mm256_add_ps(z, s[k]); }
    __m256 wt = _mm256_loadu_ps(mask + base);
    __m256 inv = _mm256_div_ps(wt, z);
    // log-likelihood: sum of m (weighted) + log of the product of z (mantissa/exponent kept apart)
    A.msum = _mm256_fmadd_ps(wt, m, A.msum);
    __m256 zz = _mm256_blendv_ps(_mm256_set1_ps(1.f), z, _mm256_cmp_ps(wt, _mm256_setzero_ps(), _CMP_GT_OQ));
    __m256i bits = _mm256_castps_si256(_mm256_mul_ps(A.prod, zz));
    A.ex = _mm256_add_epi32(A.ex, _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
    A.prod = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f800000)));
    for (int k = 0; k < K; ++k) { s[k] = _mm256_mul_ps(s[k], inv); A.csum[k] = _mm256_add_ps(A.csum[k], s[k]); }
    for (int64_t w = 0; w < W; ++w) {
      __m256* c = &A.cnt[w * L * K];
      for (int l = 0; l < L; ++l) {
        __m256 msk = _mm256_castsi256_ps(_mm256_cmpeq_epi32(iv[w], _mm256_set1_epi32(l)));
        for (int k = 0; k < K; ++k) c[l * K + k] = _mm256_add_ps(c[l * K + k], _mm256_and_ps(msk, s[k]));
      }
    }
  }
  flush();
  // tail rows (scalar)
  for (int64_t t = t0 + nb * 8; t < t1; ++t) {
    const int8_t* y = lab + t * W;
    float acc[K];
    for (int k = 0; k < K; ++k) acc[k] = prior[k];
    for (int64_t w = 0; w < W; ++w) if (y[w] >= 0) for (int k = 0; k < K; ++k) acc[k] += tab[(w * L + y[w]) * K + k];
    float mx = *std::max_element(acc, acc + K), zs = 0;
    for (int k = 0; k < K; ++k) { acc[k] = std::exp(acc[k] - mx); zs += acc[k]; }
    A.tail_ll += mask[t] * (mx + std::log(zs));
    for (int k = 0; k < K; ++k) { acc[k] *= mask[t] / zs; A.tail_cs[k] += acc[k]; }
    for (int64_t w = 0; w < W; ++w) if (y[w] >= 0) for (int k = 0; k < K; ++k) A.tail_cnt[(w * L + y[w]) * K + k] += acc[k];
  }
}

static double hsum(__m256 v) { alignas(32) float a[8]; _mm256_store_ps(a, v); double s = 0; for (float x : a) s += x; return s; }

static ffi::Error Impl(ffi::Buffer<ffi::S8> labels, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> prior,
                       ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> counts,
                       ffi::ResultBuffer<ffi::F32> csum, ffi::ResultBuffer<ffi::F32> ll, int64_t threads) {
  auto d = labels.dimensions();
  int64_t T = d[0], W = d[1];
  if (W > MAXW || prior.dimensions()[0] != K) return ffi::Error::InvalidArgument("experiment: K = 5, W <= 64");
  int n = (int)std::max<int64_t>(1, threads);
  std::vector<Acc> acc(n);
  std::vector<std::thread> pool;
  for (int i = 0; i < n; ++i) {
    int64_t a = T * i / n / 8 * 8, b = i + 1 == n ? T : T * (i + 1) / n / 8 * 8;
    pool.emplace_back([&, i, a, b] { run(labels.typed_data(), a, b, W, table.typed_data(), prior.typed_data(),
                                         mask.typed_data(), acc[i]); });
  }
  for (auto& th : pool) th.join();
  float* c = counts->typed_data(); float* k = csum->typed_data();
  double tot = 0;
  for (int64_t j = 0; j < W * L * K; ++j) { double s = 0; for (auto& A : acc) s += A.dcnt[j] + A.tail_cnt[j]; c[j] = (float)s; }
  for (int j = 0; j < K; ++j) { double s = 0; for (auto& A : acc) s += A.dcs[j] + A.tail_cs[j]; k[j] = (float)s; }
  for (auto& A : acc) {
    alignas(32) float p[8]; alignas(32) int32_t e[8];
    _mm256_store_ps(p, A.prod); _mm256_store_si256((__m256i*)e, A.ex);
    double lz = 0; for (int i = 0; i < 8; ++i) lz += (e[i] + std::log2((double)p[i])) * 0.6931471805599453;
    tot += A.dmsum + lz + A.tail_ll;
  }
  ll->typed_data()[0] = (float)tot;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsStepAvx2, Impl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S8>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("threads"));
