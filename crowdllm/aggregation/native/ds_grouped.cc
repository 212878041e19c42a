// Dawid-Skene's E-step and M-step sums over a dense panel, by groups of annotators (AVX2, CPU).
//
// Built on first use by crowdllm/aggregation/_native.py (g++ -O3 -mavx2 -mfma) and called from
// JAX as an XLA FFI custom call. The annotators are cut into groups of s (s as large as keeps
// (L+1)^s <= 2048); each task row is encoded once per fit as one code per group (uint16, the
// group's answers as digits in base L+1, 0 = no answer, plus the group's offset). Then
//
//   E-step:  score[t, k] = sum_g tab[code[t, g], k]      (tab = the group's summed log-confusion
//                                                          entries, log prior folded into group 0)
//   M-step:  C[code[t, g], k] += q_t(k)                   (per-combination sums of posteriors)
//
// so a row costs G loads and G read-add-writes of one 8-lane vector (G = 3 for 12 annotators and
// 5 classes) instead of W x K lookups and adds. The per-annotator counts are C summed over the
// other digits (done in JAX; tiny). Rows are taken 8 at a time and
// transposed so that the softmax runs across rows; each thread sums chunks of 16,384 rows in float lanes and
// carries the chunks' sums in double. K <= 8 classes.
//
// Identical rows (same codes, same gold) are merged first (CrowdllmDsGroupedUnique, a hash pass
// once per fit): the passes run over the distinct rows, each weighted by how many tasks it stands
// for (398,225 distinct rows of 1,000,000 on the synthetic 12 x 5 panel; LLM panels agree more).
//
// flags[t]: -2 = padding row (unique pass only: dropped), -1 = no gold, k >= 0 = gold class k
// (posterior clamped to it; its log-likelihood term is its score for k).
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace crowdllm_simd;

struct Part {  // one thread's share of the sums
  std::vector<float> C;    // [NC, 8]: float sums over the current chunk of rows
  std::vector<double> D;   // [NC, 8]: the chunks' sums, in double
  __m256d ll0, ll1;
  float* track = nullptr;  // [blocks, K classes, 8 rows]: each row's last posteriors (or none)
  const float* tab2 = nullptr;  // RATIO: the denominators' table
  __m256 dz;               // the largest change of a posterior since the last pass
  int64_t row = 0;         // HARD: the block's first row (its tasks' index in the tie hash)
  uint32_t seed0 = 0, seed1 = 0;  // HARD: the tie hash's two words
  void flush() {
    for (size_t j = 0; j < C.size(); ++j) D[j] += C[j];
    std::fill(C.begin(), C.end(), 0.f);
  }
};

//: rows summed in float lanes before the sums are carried into double
constexpr int64_t CHUNK = 16384;

// bits: 1 = write posteriors (no sums), 2 = the table holds votes (posteriors: normalised votes),
// 8 = the "posteriors" are the ratios of the table's sums to a second table's (BWA's truth:
// precision-weighted answers over summed precisions), 4 = (with 8) sum their squares too: the
// sums table is [NC, 16], the ratios' sums in lanes 0-7 and their squares' in 8-15 (one pass),
// 16 = (with 2) each row's vote made hard: its sums get the indicator of the voted class
// (_core.argmax_ties with random ties: of the classes within 1e-6 of the largest fraction, the
// one whose counter hash is largest)
enum Mode { SUMS = 0, POST = 1, VOTE = 2, POST_VOTE = 3, POST_RATIO = 9, RATIO_SQ = 12,
            HARD = 18 };
constexpr bool is_post(int m) { return m & 1; }
constexpr bool is_vote(int m) { return m & 2; }
constexpr bool is_sq(int m) { return m & 4; }
constexpr bool is_ratio(int m) { return m & 8; }
constexpr bool is_hard(int m) { return m & 16; }
constexpr bool has_ll(int m) { return !(m & 10); }  // softmax posteriors: a log-likelihood
constexpr int64_t width(int m) { return is_sq(m) ? 16 : 8; }  // floats per combination in C

// One block of 8 distinct rows: codes 8 x G, flags 8, weights 8 (SUMS, VOTE). SUMS: softmax
// posteriors, weighted, added into part.C, weighted log-likelihood into part.ll. VOTE: the table
// holds vote weights; posteriors are the normalised votes (uniform when there are none). POST:
// softmax posteriors written to post[8, K] (rows below n_out only).
// s[k], lane i: the sum of row i's G entries of tab for class k (8 rows of codes, G per row)
inline void gather8(const uint16_t* codes, int64_t G, const float* tab, __m256 s[8]) {
  for (int i = 0; i < 8; ++i) {
    const uint16_t* c = codes + i * G;
    __m256 v = _mm256_loadu_ps(tab + 8 * (int64_t)c[0]);
    for (int64_t g = 1; g < G; ++g) v = _mm256_add_ps(v, _mm256_loadu_ps(tab + 8 * (int64_t)c[g]));
    s[i] = v;
  }
  transpose8(s);
}

// HARD: the rows' fractions p[k] (lane i: row part.row + i) replaced by the indicator of the
// class argmax_ties picks with random ties: of the classes within 1e-6 max(|m|, 1) of the
// largest, m, the one whose hash of (row K + k) is largest (the first if equal). Not its lowest
// policy, XLA's argmax: the lowest of exactly equal maxima, where a tie that two orders of adding
// a vote leave one bit apart (a sum of equal skills) can go either way.
template <int K>
inline void hard_vote(__m256 p[8], const Part& part) {
  __m256 m = p[0];
  for (int k = 1; k < K; ++k) m = _mm256_max_ps(m, p[k]);
  const __m256 tol = _mm256_mul_ps(
      _mm256_set1_ps(1e-6f), _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), m),
                                           _mm256_set1_ps(1.f)));
  const __m256 thr = _mm256_sub_ps(m, tol);
  __m256i tied[8];
  __m256i count = _mm256_setzero_si256(), choice = _mm256_setzero_si256();
  for (int k = K - 1; k >= 0; --k) {  // a row with one class within 1e-6 of m votes for it
    tied[k] = _mm256_castps_si256(_mm256_cmp_ps(p[k], thr, _CMP_GE_OQ));
    count = _mm256_sub_epi32(count, tied[k]);  // a tied lane's mask is -1
    choice = _mm256_blendv_epi8(choice, _mm256_set1_epi32(k), tied[k]);
  }
  if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(count, _mm256_set1_epi32(1))))) {
    const __m256i base = _mm256_add_epi32(
        _mm256_set1_epi32((int)((uint32_t)part.row * (uint32_t)K)),
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(K)));
    __m256i best = _mm256_set1_epi32(-1);
    for (int k = 0; k < K; ++k) {
      const __m256i h = hash23(_mm256_add_epi32(base, _mm256_set1_epi32(k)), part.seed0,
                               part.seed1);
      const __m256i key = _mm256_or_si256(_mm256_and_si256(tied[k], h),
                                          _mm256_andnot_si256(tied[k], _mm256_set1_epi32(-1)));
      const __m256i gt = _mm256_cmpgt_epi32(key, best);
      best = _mm256_blendv_epi8(best, key, gt);
      choice = _mm256_blendv_epi8(choice, _mm256_set1_epi32(k), gt);
    }
  }
  for (int k = 0; k < K; ++k)
    p[k] = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(choice, _mm256_set1_epi32(k))),
                         _mm256_set1_ps(1.f));
}

template <int K, int MODE, int GT>
inline void block(const uint16_t* codes, int64_t G_, const int8_t* flags, const float* wts,
                  const float* tab, Part& part, float* post, int n_out, float* q) {
  const int64_t G = GT > 0 ? GT : G_;  // the common group count is a constant: loops unrolled
  __m256 s[8];
  gather8(codes, G, tab, s);  // s[k]: lane i = row i's score (or votes) for class k
  __m256 p[8];
  __m256 ll = _mm256_setzero_ps();
  if (is_ratio(MODE)) {
    __m256 d[8];
    gather8(codes, G, part.tab2, d);
    for (int k = 0; k < K; ++k) p[k] = _mm256_div_ps(s[k], d[k]);
  } else if (is_vote(MODE)) {
    __m256 z = s[0];
    for (int k = 1; k < K; ++k) z = _mm256_add_ps(z, s[k]);
    __m256 any = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
    __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_blendv_ps(_mm256_set1_ps(1.f), z, any));
    for (int k = 0; k < K; ++k)
      p[k] = _mm256_blendv_ps(_mm256_set1_ps(1.f / K), _mm256_mul_ps(s[k], inv), any);
  } else {
    __m256 m = s[0];
    for (int k = 1; k < K; ++k) m = _mm256_max_ps(m, s[k]);
    __m256 z = _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) {
      p[k] = exp256(_mm256_sub_ps(s[k], m));
      z = _mm256_add_ps(z, p[k]);
    }
    __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), z);
    for (int k = 0; k < K; ++k) p[k] = _mm256_mul_ps(p[k], inv);
    ll = _mm256_add_ps(m, log256(z));
  }
  for (int k = K; k < 8; ++k) p[k] = _mm256_setzero_ps();
  int64_t fl8;
  std::memcpy(&fl8, flags, 8);
  if (fl8 != -1) {  // some row is gold (rows without gold, all -1, skip this)
    __m256i f = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(fl8));
    __m256 gold = _mm256_castsi256_ps(_mm256_cmpgt_epi32(f, _mm256_set1_epi32(-1)));
    for (int k = 0; k < K; ++k) {
      __m256 eq = _mm256_castsi256_ps(_mm256_cmpeq_epi32(f, _mm256_set1_epi32(k)));
      p[k] = _mm256_blendv_ps(p[k], _mm256_and_ps(eq, _mm256_set1_ps(1.f)), gold);
      if (has_ll(MODE)) ll = _mm256_blendv_ps(ll, s[k], eq);
    }
  }
  if constexpr (is_hard(MODE)) hard_vote<K>(p, part);
  if (!is_post(MODE) && q != nullptr) {  // track: compare with the last pass, keep these
    __m256 wt = _mm256_loadu_ps(wts);
    __m256 live = _mm256_cmp_ps(wt, _mm256_setzero_ps(), _CMP_GT_OQ);
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int k = 0; k < K; ++k) {
      __m256 d = _mm256_andnot_ps(sign, _mm256_sub_ps(p[k], _mm256_loadu_ps(q + 8 * k)));
      part.dz = _mm256_max_ps(part.dz, _mm256_and_ps(d, live));
      _mm256_storeu_ps(q + 8 * k, p[k]);
    }
  }
  __m256 p2[8];  // SQ: the squares, weighted
  if (!is_post(MODE)) {
    __m256 wt = _mm256_loadu_ps(wts);
    for (int k = 0; k < K; ++k) {
      if (is_sq(MODE)) p2[k] = _mm256_mul_ps(_mm256_mul_ps(p[k], p[k]), wt);
      p[k] = _mm256_mul_ps(p[k], wt);
    }
    ll = _mm256_mul_ps(ll, wt);
  }
  if (has_ll(MODE)) {
    part.ll0 = _mm256_add_pd(part.ll0, _mm256_cvtps_pd(_mm256_castps256_ps128(ll)));
    part.ll1 = _mm256_add_pd(part.ll1, _mm256_cvtps_pd(_mm256_extractf128_ps(ll, 1)));
  }
  transpose8(p);  // p[i]: row i's posteriors in lanes 0..K-1, zeros above
  if (is_post(MODE)) {  // a row's 8-lane store spills into the rows after it, which overwrite
    // it; a row whose store would reach past the block's rows is stored masked (the next block
    // may belong to another thread, which may have written it already: with K < 4 a spill
    // reaches past the next row)
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(K),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int i = 0; i < n_out; ++i) {
      if (i * K + 8 <= n_out * K) _mm256_storeu_ps(post + i * K, p[i]);
      else _mm256_maskstore_ps(post + i * K, keep, p[i]);
    }
    return;
  }
  float* C = part.C.data();
  if (is_sq(MODE)) {
    for (int k = K; k < 8; ++k) p2[k] = _mm256_setzero_ps();
    transpose8(p2);
  }
  for (int i = 0; i < 8; ++i) {
    const uint16_t* c = codes + i * G;
    for (int64_t g = 0; g < G; ++g) {
      float* d = C + width(MODE) * (int64_t)c[g];
      _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), p[i]));
      if (is_sq(MODE)) _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), p2[i]));
    }
  }
}

template <int K, int MODE, int GT>
void rows(const uint16_t* codes, int64_t G, const int8_t* flags, const float* wts,
          const float* tab, int64_t r0, int64_t r1, Part& part, float* post) {
  int64_t t = r0;
  for (; t + 8 <= r1; t += 8) {
    if constexpr (is_hard(MODE)) part.row = t;
    block<K, MODE, GT>(codes + t * G, G, flags + t, wts + t, tab, part,
                   is_post(MODE) ? post + t * K : nullptr, 8,
                   part.track ? part.track + t * K : nullptr);
    if (!is_post(MODE) && (t - r0) % CHUNK == CHUNK - 8) part.flush();
  }
  if (t < r1) {  // the last rows, padded to a block with weightless copies of row r0
    int n = (int)(r1 - t);
    std::vector<uint16_t> c(8 * G);
    for (int i = 0; i < 8; ++i) std::memcpy(&c[i * G], codes + (i < n ? t + i : r0) * G, G * 2);
    int8_t f[8];
    float w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::fill(f, f + 8, int8_t(-1));
    std::memcpy(f, flags + t, n);
    if (!is_post(MODE)) std::memcpy(w, wts + t, n * sizeof(float));
    if constexpr (is_hard(MODE)) part.row = t;
    block<K, MODE, GT>(c.data(), G, f, w, tab, part, is_post(MODE) ? post + t * K : nullptr, n,
                   part.track ? part.track + t * K : nullptr);
  }
}

template <int MODE>
using RowsFn = void (*)(const uint16_t*, int64_t, const int8_t*, const float*, const float*,
                        int64_t, int64_t, Part&, float*);

template <int MODE>
RowsFn<MODE> pick(int64_t K, int64_t G) {
  bool g3 = G == 3;  // 12 annotators with 4-8 classes, 13-18 with 2 (the LLM-panel shapes)
  switch (K) {
    case 1: return g3 ? rows<1, MODE, 3> : rows<1, MODE, 0>;
    case 2: return g3 ? rows<2, MODE, 3> : rows<2, MODE, 0>;
    case 3: return g3 ? rows<3, MODE, 3> : rows<3, MODE, 0>;
    case 4: return g3 ? rows<4, MODE, 3> : rows<4, MODE, 0>;
    case 5: return g3 ? rows<5, MODE, 3> : rows<5, MODE, 0>;
    case 6: return g3 ? rows<6, MODE, 3> : rows<6, MODE, 0>;
    case 7: return g3 ? rows<7, MODE, 3> : rows<7, MODE, 0>;
    case 8: return g3 ? rows<8, MODE, 3> : rows<8, MODE, 0>;
    default: return nullptr;
  }
}

// Rows [0, U) split over threads; returns the summed log-likelihood. SUMS, VOTE: C [NC, 8]
// (float) gets the summed per-combination posteriors (RATIO_SQ: [NC, 16], with the squares').
// POST: out gets posteriors [U, K].
template <int MODE>
ffi::Error Pass(const uint16_t* codes, int64_t U, int64_t G, const int8_t* flags, const float* wts,
                const float* tab, int64_t NC, int64_t K, int64_t threads, float* out, double* ll,
                float* track = nullptr, float* dz = nullptr, const float* tab2 = nullptr,
                const uint32_t* seeds = nullptr) {
  RowsFn<MODE> fn = pick<MODE>(K, G);
  if (fn == nullptr) return ffi::Error::InvalidArgument("ds_grouped: 1 <= K <= 8 classes");
  int n = (int)std::max<int64_t>(1, std::min<int64_t>(threads, (U + 4095) / 4096));
  std::vector<Part> parts(n);
  auto work = [&](int64_t i) {
    Part& part = parts[i];
    part.ll0 = part.ll1 = _mm256_setzero_pd();
    part.track = track;
    part.tab2 = tab2;
    part.dz = _mm256_setzero_ps();
    if (seeds != nullptr) part.seed0 = seeds[0], part.seed1 = seeds[1];
    if (!is_post(MODE)) {
      part.C.assign(NC * width(MODE), 0.f);
      part.D.assign(NC * width(MODE), 0.0);
    }
    const int64_t a = share_start(U, i, n), b = share_start(U, i + 1, n);
    if (b > a) fn(codes, G, flags, wts, tab, a, b, part, out);
    if (!is_post(MODE)) part.flush();
  };
  Workers::run(n, work);
  double tot = 0;
  for (auto& part : parts) {
    alignas(32) double v[8];
    _mm256_store_pd(v, part.ll0);
    _mm256_store_pd(v + 4, part.ll1);
    for (double x : v) tot += x;
  }
  *ll = tot;
  if (dz != nullptr) {
    float m = 0;
    for (auto& part : parts) {
      alignas(32) float v[8];
      _mm256_store_ps(v, part.dz);
      for (float x : v) m = std::max(m, x);
    }
    *dz = m;
  }
  if (!is_post(MODE)) {
    for (int64_t j = 0; j < NC * width(MODE); ++j) {
      double acc = 0;
      for (auto& part : parts) acc += part.D[j];
      out[j] = (float)acc;
    }
  }
  return ffi::Error::Success();
}

ffi::Error Check(ffi::Buffer<ffi::U16>& codes, ffi::Buffer<ffi::S8>& flags,
                 ffi::Buffer<ffi::F32>& table, ffi::Buffer<ffi::S32>& n, int64_t* U) {
  auto cd = codes.dimensions();
  auto td = table.dimensions();
  if (cd.size() != 2 || td.size() != 2 || td[1] != 8 || cd[1] < 1)
    return ffi::Error::InvalidArgument("ds_grouped: codes [T, G >= 1] and table [NC, 8] expected");
  if (flags.dimensions()[0] != cd[0]) return ffi::Error::InvalidArgument("ds_grouped: flags [T]");
  *U = n.typed_data()[0];
  if (*U < 0 || *U > cd[0]) return ffi::Error::InvalidArgument("ds_grouped: 0 <= n <= T rows");
  return ffi::Error::Success();
}

// The sums pass over the first n distinct rows (weights = how many tasks each stands for); with
// track, each row's posteriors are compared with and replace the ones kept there.
ffi::Error SumsPass(ffi::Buffer<ffi::U16>& codes, ffi::Buffer<ffi::S8>& flags,
                    ffi::Buffer<ffi::F32>& weights, ffi::Buffer<ffi::S32>& n,
                    ffi::Buffer<ffi::F32>& table, float* sums, float* ll, float* track, float* dz,
                    int64_t K, int64_t threads, int64_t vote) {
  int64_t U;
  if (auto e = Check(codes, flags, table, n, &U); e.failure()) return e;
  double tot = 0;
  auto args = std::make_tuple(codes.typed_data(), U, codes.dimensions()[1], flags.typed_data(),
                              weights.typed_data(), table.typed_data(), table.dimensions()[0], K,
                              threads, sums, &tot, track, dz, (const float*)nullptr,
                              (const uint32_t*)nullptr);
  ffi::Error e = vote ? std::apply(Pass<VOTE>, args) : std::apply(Pass<SUMS>, args);
  ll[0] = (float)tot;
  return e;
}

ffi::Error SumsImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                    ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                    ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> sums,
                    ffi::ResultBuffer<ffi::F32> ll, int64_t K, int64_t threads, int64_t vote) {
  return SumsPass(codes, flags, weights, n, table, sums->typed_data(), ll->typed_data(), nullptr,
                  nullptr, K, threads, vote);
}

// The hard vote pass (ZBS: a skill-weighted vote, then each annotator's agreement with it):
// C [NC, 8] gets, per combination, the weighted indicators of its rows' voted classes, ties
// broken at random by the counter hash of seeds' two words and (row, class): row t must be task
// t (rows not merged: the draw is the task's).
ffi::Error HardImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                    ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                    ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::U32> seeds,
                    ffi::ResultBuffer<ffi::F32> sums, int64_t K, int64_t threads) {
  int64_t U;
  if (auto e = Check(codes, flags, table, n, &U); e.failure()) return e;
  if (seeds.element_count() != 2)
    return ffi::Error::InvalidArgument("ds_grouped: seeds [2] (the tie hash's two words)");
  double ll;
  return Pass<HARD>(codes.typed_data(), U, codes.dimensions()[1], flags.typed_data(),
                    weights.typed_data(), table.typed_data(), table.dimensions()[0], K, threads,
                    sums->typed_data(), &ll, nullptr, nullptr, nullptr, seeds.typed_data());
}

// SumsImpl that also keeps each distinct row's posteriors between passes (track, [blocks, K, 8],
// updated in place) and returns the largest change of any posterior (VB's stopping rule).
ffi::Error TrackImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                     ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> track_in,
                     ffi::ResultBuffer<ffi::F32> sums, ffi::ResultBuffer<ffi::F32> ll,
                     ffi::ResultBuffer<ffi::F32> track, ffi::ResultBuffer<ffi::F32> dz,
                     int64_t K, int64_t threads, int64_t vote) {
  if (K < 1 || track_in.element_count() < (codes.dimensions()[0] + 7) / 8 * 8 * K)
    return ffi::Error::InvalidArgument("ds_grouped: track must hold [ceil(T / 8), K, 8] floats");
  float* tr = track->typed_data();
  if (tr != track_in.typed_data())  // not aliased: start from the input's values
    std::memcpy(tr, track_in.typed_data(), track_in.element_count() * sizeof(float));
  return SumsPass(codes, flags, weights, n, table, sums->typed_data(), ll->typed_data(), tr,
                  dz->typed_data(), K, threads, vote);
}

// The ratio pass (BWA): sums of the rows' ratios num / den (lanes 0-7 of a [NC, 16] table) and
// of their squares (lanes 8-15), num and den each the sum of the row's G entries of its table.
ffi::Error RatioImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                     ffi::Buffer<ffi::F32> num, ffi::Buffer<ffi::F32> den,
                     ffi::ResultBuffer<ffi::F32> sums, int64_t K, int64_t threads) {
  int64_t U;
  if (auto e = Check(codes, flags, num, n, &U); e.failure()) return e;
  if (den.element_count() != num.element_count())
    return ffi::Error::InvalidArgument("ds_grouped: num and den tables of one shape");
  if (sums->element_count() != num.dimensions()[0] * 16)
    return ffi::Error::InvalidArgument("ds_grouped: ratio sums [NC, 16] expected");
  double ll = 0;
  return Pass<RATIO_SQ>(codes.typed_data(), U, codes.dimensions()[1], flags.typed_data(),
                        weights.typed_data(), num.typed_data(), num.dimensions()[0], K, threads,
                        sums->typed_data(), &ll, nullptr, nullptr, den.typed_data());
}

// The E-step's posteriors of every task (ratio: the rows' num / den): the distinct rows' values,
// spread by inverse (inverse[t] = -1, a padding row: zeros).
template <int MODE>
ffi::Error PostPass(ffi::Buffer<ffi::U16>& codes, ffi::Buffer<ffi::S8>& flags,
                    ffi::Buffer<ffi::S32>& n, ffi::Buffer<ffi::F32>& table, const float* tab2,
                    ffi::Buffer<ffi::S32>& inverse, float* out, float* ll, int64_t K,
                    int64_t threads) {
  int64_t U;
  if (auto e = Check(codes, flags, table, n, &U); e.failure()) return e;
  int64_t T = inverse.dimensions()[0];
  std::vector<float> pu(U * K + 8);
  double tot = 0;
  ffi::Error e = Pass<MODE>(codes.typed_data(), U, codes.dimensions()[1], flags.typed_data(),
                            nullptr, table.typed_data(), table.dimensions()[0], K, threads,
                            pu.data(), &tot, nullptr, nullptr, tab2);
  if (e.failure()) return e;
  *ll = (float)tot;
  const int32_t* inv = inverse.typed_data();
  int nt = (int)std::max<int64_t>(1, std::min<int64_t>(threads, T / 65536));
  auto spread = [&](int64_t i) {
    for (int64_t t = T * i / nt; t < T * (i + 1) / nt; ++t) {
      int32_t u = inv[t];
      for (int k = 0; k < K; ++k) out[t * K + k] = u >= 0 ? pu[u * K + k] : 0.f;
    }
  };
  Workers::run(nt, spread);
  return ffi::Error::Success();
}

ffi::Error PostImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                    ffi::Buffer<ffi::S32> n, ffi::Buffer<ffi::F32> table,
                    ffi::Buffer<ffi::S32> inverse, ffi::ResultBuffer<ffi::F32> post,
                    ffi::ResultBuffer<ffi::F32> ll, int64_t K, int64_t threads, int64_t vote) {
  auto pass = vote ? PostPass<POST_VOTE> : PostPass<POST>;  // vote: the table holds votes
  return pass(codes, flags, n, table, nullptr, inverse, post->typed_data(), ll->typed_data(), K,
              threads);
}

ffi::Error RatioPostImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                         ffi::Buffer<ffi::S32> n, ffi::Buffer<ffi::F32> num,
                         ffi::Buffer<ffi::F32> den, ffi::Buffer<ffi::S32> inverse,
                         ffi::ResultBuffer<ffi::F32> post, int64_t K, int64_t threads) {
  if (den.element_count() != num.element_count())
    return ffi::Error::InvalidArgument("ds_grouped: num and den tables of one shape");
  float ll;
  return PostPass<POST_RATIO>(codes, flags, n, num, den.typed_data(), inverse,
                              post->typed_data(), &ll, K, threads);
}

inline uint64_t mix(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  return h ^ (h >> 33);
}

// Distinct (codes, flag) rows in order of first appearance, how many tasks each stands for, and
// each task's distinct row (padding rows, flag -2: inverse -1, not counted). Outputs past the
// n-th row are zero (codes, weights) and -1 (flags).
ffi::Error UniqueImpl(ffi::Buffer<ffi::U16> codes, ffi::Buffer<ffi::S8> flags,
                      ffi::ResultBuffer<ffi::U16> ucodes, ffi::ResultBuffer<ffi::S8> uflags,
                      ffi::ResultBuffer<ffi::F32> uweights, ffi::ResultBuffer<ffi::S32> inverse,
                      ffi::ResultBuffer<ffi::S32> n_out) {
  auto cd = codes.dimensions();
  if (cd.size() != 2 || flags.dimensions()[0] != cd[0])
    return ffi::Error::InvalidArgument("ds_grouped: codes [T, G] and flags [T] expected");
  int64_t T = cd[0], G = cd[1];
  const uint16_t* c = codes.typed_data();
  const int8_t* f = flags.typed_data();
  uint16_t* uc = ucodes->typed_data();
  int8_t* uf = uflags->typed_data();
  int32_t* inv = inverse->typed_data();
  uint64_t size = 16;
  while (size < 2 * (uint64_t)T) size <<= 1;
  std::vector<int32_t> count;
  count.reserve(std::min<int64_t>(T, 1 << 20));
  constexpr int64_t AHEAD = 16;  // slots are prefetched this many rows ahead (the table is large)
  uint64_t ring[AHEAD];
  int32_t U = 0;
  auto add = [&](int64_t t, int32_t s) {
    if (s >= 0) {
      ++count[s];
      inv[t] = s;
      return;
    }
    std::memcpy(uc + (int64_t)U * G, c + t * G, G * 2);
    uf[U] = f[t];
    count.push_back(1);
    inv[t] = U++;
  };
  if (G <= 3) {  // the whole row fits one 64-bit key, kept in the table: probes read no row
    struct Slot {
      uint64_t key;
      int64_t idx;
    };
    // one 16-byte slot per probe, on huge pages where the kernel gives them (random probes into
    // 32 MB of 4 KB pages spent most of their time on TLB misses); the table starts small and
    // doubles whenever it is half full, so its size follows the distinct rows, not the tasks
    // (panels that agree keep it in cache)
    auto alloc = [](uint64_t n) -> Slot* {
      size_t bytes = (n * sizeof(Slot) + (2u << 20) - 1) / (2u << 20) * (2u << 20);
      Slot* p = static_cast<Slot*>(std::aligned_alloc(2u << 20, bytes));
      if (p != nullptr) {
        madvise(p, bytes, MADV_HUGEPAGE);
        std::memset(p, 0xff, n * sizeof(Slot));  // key ~0: empty (real keys: bits 56-63 clear)
      }
      return p;
    };
    size = std::min<uint64_t>(size, 1 << 16);
    Slot* tab = alloc(size);
    if (tab == nullptr) return ffi::Error::Internal("ds_grouped: out of memory for the row table");
    auto key = [&](int64_t t) {
      uint64_t k = (uint64_t)(uint8_t)f[t] << 48;
      for (int64_t g = 0; g < G; ++g) k |= (uint64_t)c[t * G + g] << (16 * g);
      return k;
    };
    for (int64_t t = 0; t < std::min(T, AHEAD); ++t) {
      ring[t] = key(t);
      __builtin_prefetch(&tab[mix(ring[t]) & (size - 1)]);
    }
    for (int64_t t = 0; t < T; ++t) {
      uint64_t k = ring[t % AHEAD];
      if (t + AHEAD < T) {
        uint64_t kn = key(t + AHEAD);
        ring[t % AHEAD] = kn;
        __builtin_prefetch(&tab[mix(kn) & (size - 1)]);
      }
      if (f[t] == -2) {
        inv[t] = -1;
        continue;
      }
      for (uint64_t i = mix(k) & (size - 1);; i = (i + 1) & (size - 1)) {
        if (tab[i].key == k) {  // idx: the distinct row (low 32 bits), its count (high 32)
          tab[i].idx += int64_t(1) << 32;
          inv[t] = (int32_t)tab[i].idx;
          break;
        }
        if (tab[i].key == ~0ULL) {
          tab[i].key = k;
          tab[i].idx = (int64_t(1) << 32) | U;
          std::memcpy(uc + (int64_t)U * G, c + t * G, G * 2);
          uf[U] = f[t];
          inv[t] = U++;
          break;
        }
      }
      if (2 * (uint64_t)U > size) {  // half full: move the slots into a table twice the size
        Slot* big = alloc(2 * size);
        if (big == nullptr) {
          std::free(tab);
          return ffi::Error::Internal("ds_grouped: out of memory for the row table");
        }
        for (uint64_t j = 0; j < size; ++j) {
          if (tab[j].key == ~0ULL) continue;
          uint64_t i = mix(tab[j].key) & (2 * size - 1);
          while (big[i].key != ~0ULL) i = (i + 1) & (2 * size - 1);
          big[i] = tab[j];
        }
        std::free(tab);
        tab = big;
        size *= 2;
      }
    }
    count.assign(U, 0);
    for (uint64_t i = 0; i < size; ++i)
      if (tab[i].key != ~0ULL) count[(uint32_t)tab[i].idx] = (int32_t)(tab[i].idx >> 32);
    std::free(tab);
  } else {
    std::vector<int32_t> slot(size, -1);
    auto hash = [&](int64_t t) {
      const uint16_t* row = c + t * G;
      uint64_t h = (uint64_t)(uint8_t)f[t] * 0x9E3779B97F4A7C15ULL;
      for (int64_t g = 0; g < G; ++g) h = mix(h ^ row[g]);
      return h & (size - 1);
    };
    for (int64_t t = 0; t < std::min(T, AHEAD); ++t) {
      ring[t] = hash(t);
      __builtin_prefetch(&slot[ring[t]]);
    }
    for (int64_t t = 0; t < T; ++t) {
      uint64_t h = ring[t % AHEAD];
      if (t + AHEAD < T) {
        uint64_t hn = hash(t + AHEAD);
        ring[t % AHEAD] = hn;
        __builtin_prefetch(&slot[hn]);
      }
      if (f[t] == -2) {
        inv[t] = -1;
        continue;
      }
      const uint16_t* row = c + t * G;
      for (uint64_t i = h;; i = (i + 1) & (size - 1)) {
        int32_t s = slot[i];
        if (s < 0) {
          slot[i] = U;
          add(t, -1);
          break;
        }
        if (uf[s] == f[t] && std::memcmp(uc + (int64_t)s * G, row, G * 2) == 0) {
          add(t, s);
          break;
        }
      }
    }
  }
  float* w = uweights->typed_data();
  for (int32_t u = 0; u < U; ++u) w[u] = (float)count[u];
  std::fill(w + U, w + T, 0.f);
  std::fill(uf + U, uf + T, int8_t(-1));
  std::memset(uc + (int64_t)U * G, 0, (T - U) * G * 2);
  n_out->typed_data()[0] = U;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedSums, SumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("vote"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedHard, HardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedTrack, TrackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("vote"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedPost, PostImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("vote"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedRatio, RatioImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedRatioPost, RatioPostImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("K")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmDsGroupedUnique, UniqueImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
