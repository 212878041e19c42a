// Experiment (issue 5): Dawid-Skene's fused E+M pass over a dense int8 panel as a hand-written
// XLA FFI CPU kernel, to measure how far a scalar C++ loop gets beyond XLA's generated code.
// Not used by the library. Built and timed by benchmarks/ffi_ds.py (needs g++).
// Classes are padded to 8 (pad entries -1e30, so exp gives 0) so the per-class loops are one
// AVX vector; counts and class sums are accumulated in double per thread.
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#include <algorithm>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static void rows8(const int8_t* lab, int64_t t0, int64_t t1, int64_t W, int64_t L, const float* tab,
                  const float* prior, const float* mask, double* counts, double* csum, double* ll) {
  double l_acc = 0;
  alignas(32) float acc[8];
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* y = lab + t * W;
    for (int k = 0; k < 8; ++k) acc[k] = prior[k];
    for (int64_t w = 0; w < W; ++w) {
      int l = y[w];
      if (l >= 0) { const float* r = tab + (w * L + l) * 8; for (int k = 0; k < 8; ++k) acc[k] += r[k]; }
    }
    float m = acc[0];
    for (int k = 1; k < 8; ++k) m = std::max(m, acc[k]);
    float s = 0;
    for (int k = 0; k < 8; ++k) { acc[k] = expf(acc[k] - m); }
    for (int k = 0; k < 8; ++k) s += acc[k];
    float wt = mask[t], inv = wt / s;
    l_acc += wt * (m + std::log(s));
    for (int k = 0; k < 8; ++k) { acc[k] *= inv; csum[k] += acc[k]; }
    for (int64_t w = 0; w < W; ++w) {
      int l = y[w];
      if (l >= 0) { double* c = counts + (w * L + l) * 8; for (int k = 0; k < 8; ++k) c[k] += acc[k]; }
    }
  }
  *ll = l_acc;
}

static ffi::Error Impl8(ffi::Buffer<ffi::S8> labels, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> prior,
                       ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> counts,
                       ffi::ResultBuffer<ffi::F32> csum, ffi::ResultBuffer<ffi::F32> ll, int64_t threads) {
  auto d = labels.dimensions();
  int64_t T = d[0], W = d[1], L = table.dimensions()[1], K = 8;
  int n = (int)std::max<int64_t>(1, threads);
  std::vector<std::vector<double>> cs(n, std::vector<double>(W * L * K, 0.0)), ks(n, std::vector<double>(K, 0.0));
  std::vector<double> lls(n, 0.0);
  std::vector<std::thread> pool;
  for (int i = 0; i < n; ++i) {
    int64_t a = T * i / n, b = T * (i + 1) / n;
    pool.emplace_back([&, i, a, b] { rows8(labels.typed_data(), a, b, W, L, table.typed_data(), prior.typed_data(),
                                           mask.typed_data(), cs[i].data(), ks[i].data(), &lls[i]); });
  }
  for (auto& th : pool) th.join();
  float* c = counts->typed_data(); float* k = csum->typed_data();
  double tot = 0;
  for (int64_t j = 0; j < W * L * K; ++j) { double a = 0; for (int i = 0; i < n; ++i) a += cs[i][j]; c[j] = (float)a; }
  for (int j = 0; j < K; ++j) { double a = 0; for (int i = 0; i < n; ++i) a += ks[i][j]; k[j] = (float)a; }
  for (int i = 0; i < n; ++i) tot += lls[i];
  ll->typed_data()[0] = (float)tot;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsStep8, Impl8,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S8>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("threads"));
