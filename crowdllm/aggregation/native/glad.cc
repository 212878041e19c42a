// GLAD's E-step, M-step gradient passes and whole M-step over a dense panel or a sparse crowd's
// rows of answer slots (Slots; AVX2, CPU).
//
// Built with ds_grouped.cc into one library by crowdllm/aggregation/_native.py and called from
// JAX as XLA FFI custom calls; the EM loop stays in JAX, the M-step (Adam, the Q check and the
// retries: MImpl) and the next E-step are one call. Every answer has its own logit x = alpha_w *
// exp(b_t), so nothing can be tabulated: each pass computes one exp (and, where a log-likelihood is
// wanted, one log) per answer, 8 tasks at a time (lanes = tasks). The labels and the per-answer
// posteriors are stored in blocks of 8 tasks, [T / 8, W, 8]: one block's values for one annotator
// are one contiguous load, and a pass reads each array as one sequential stream (T is a multiple of
// 8). A sparse crowd's blocks are [T / 8, S, 8], S answer slots a row, or ragged (each block its
// own slots, [Z, 8] in all), with a second such array of the slots' annotators (Slots).
//
//   E pass:    score[t, k] = log rho_k + sum_w answered (log sigma(-x) - log(K-1))
//                            + sum_w [y = k] (x + log(K-1)),
//              posteriors (softmax, gold clamped), p[w, t] = q_t(y_tw), the weighted
//              log-likelihood sum_t n_t log Z_t, Q's answer term
//              sum n_t (log sigma(x) - (1 - p) x), and that term with the old p.
//   grad pass: g = p - sigma(x) per answer; d_alpha[w] = sum_t n_t g exp(b_t) (weighted) and
//              d_b[t] = sum_w g x (per task: merged rows stand for identical tasks, whose
//              gradients are identical); optionally Q's answer term.
//   M-step:    m_steps Adam steps, each a grad pass stepping every b_t as soon as its gradient
//              is summed (alpha after the pass), then the E pass at the new parameters, which
//              is also the Q check (Q with the old p) and sums the next M-step's first gradient
//              (with the new p): that first step needs no pass of its own; see MImpl.
//
// n_t = the row's weight (how many identical tasks it stands for); rows at or past n are inert
// (zero outputs). flags[t] = -1 no gold, k >= 0 gold class k.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace crowdllm_simd;

constexpr int64_t GCHUNK = 4096;  // rows summed in float lanes before carrying into double;
                                   // a thread's share of work (parallel_row_pairs)

inline __m256i load_s8(const int8_t* p) {  // 8 labels
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline void add_pd(__m256d& lo, __m256d& hi, __m256 v) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

inline double hsum(__m256d lo, __m256d hi) {
  alignas(32) double v[8];
  _mm256_store_pd(v, lo);
  _mm256_store_pd(v + 4, hi);
  double s = 0;
  for (double x : v) s += x;
  return s;
}

// exp for arguments <= 0, kept >= -80 so that the result (and what it multiplies) is never a
// denormal float: denormals take microcode assists, ~100 cycles each (a fitted GLAD has many
// answers with |x| > 87). exp(-80) = 2e-35 is 0 next to any term it is added to.
CROWDLLM_INLINE __m256 exp_le0(__m256 x) { return exp256(_mm256_max_ps(x, _mm256_set1_ps(-80.f))); }

// e = exp(-|x|) (in (0, 1]); sigma(x) and log sigma(x) = min(x, 0) - log(1 + e) from it
CROWDLLM_INLINE __m256 exp_neg_abs(__m256 x) {
  __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  return exp_le0(_mm256_sub_ps(_mm256_setzero_ps(), a));
}

CROWDLLM_INLINE __m256 sigmoid_from(__m256 x, __m256 e) {
  __m256 one = _mm256_set1_ps(1.f);
  __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
  __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
}

// sigma(x) = 1 / (1 + exp(-x)) with -x clamped to [-80, 80] (where only sigma is wanted: one
// exp, no select; the same clamp as exp_le0's, so sigma(x) for x < -80 is exp(-80) as there)
CROWDLLM_INLINE __m256 sigmoid_direct(__m256 x) {
  __m256 nx = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), x),
                                          _mm256_set1_ps(-80.f)), _mm256_set1_ps(80.f));
  __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(nx)));
}

// sum over a row's answers of log(1 + e) (log sigma(x) = min(x, 0) - log(1 + e)), as the log of
// a running product: one log per 32 answers instead of one per answer (the product of 32 factors
// in [1, 2] stays below 2^32)
struct LogProd {
  __m256 prod = _mm256_set1_ps(1.f), sum = _mm256_setzero_ps();
  int count = 0;
  void add(__m256 ans, __m256 e) {
    prod = _mm256_mul_ps(prod, _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_and_ps(ans, e)));
    if (++count == 32) flush();
  }
  void flush() {
    sum = _mm256_add_ps(sum, log256(prod));
    prod = _mm256_set1_ps(1.f);
    count = 0;
  }
  __m256 total() {
    flush();
    return sum;
  }
};

struct Acc {  // one thread's sums: float lanes over a chunk, carried in double
  std::vector<__m256> fa;  // [W] d_alpha lanes
  std::vector<double> da;  // [W]
  __m256 fq, fqo, fll, fc[8];
  __m256d q0, q1, qo0, qo1, ll0, ll1;
  double dc[8];  // class sums (E pass)
  void init(int64_t nfa, int64_t W) {  // nfa: annotators summed in lanes (a dense panel's)
    fa.assign(nfa, _mm256_setzero_ps());
    da.assign(W, 0.0);
    fq = fqo = fll = _mm256_setzero_ps();
    q0 = q1 = qo0 = qo1 = ll0 = ll1 = _mm256_setzero_pd();
    for (int k = 0; k < 8; ++k) {
      fc[k] = _mm256_setzero_ps();
      dc[k] = 0;
    }
  }
  void flush() {
    for (size_t w = 0; w < fa.size(); ++w) {
      alignas(32) float v[8];
      _mm256_store_ps(v, fa[w]);
      for (float x : v) da[w] += x;
      fa[w] = _mm256_setzero_ps();
    }
    add_pd(q0, q1, fq);
    add_pd(qo0, qo1, fqo);
    add_pd(ll0, ll1, fll);
    fq = fqo = fll = _mm256_setzero_ps();
    for (int k = 0; k < 8; ++k) {
      alignas(32) float v[8];
      _mm256_store_ps(v, fc[k]);
      for (float x : v) dc[k] += x;
      fc[k] = _mm256_setzero_ps();
    }
  }
};

// The answers as the passes read them: labels L [T/8, S, 8] (8 rows' answers in one slot are
// one load; -1: none). A dense panel's slot s is annotator s (S = W; wi null). A sparse crowd's
// (COO) row holds its task's answers in S slots, and wi [T/8, S, 8] the annotator of each (0
// where empty): alpha is gathered by it, and alpha's gradient added to its annotator's sum.
//
// A sparse crowd's blocks may also be ragged (off non-null): block b (rows 8b ... 8b + 7) then
// holds off[b + 1] - off[b] slots, from slot off[b] of L [Z, 8] and wi [Z, 8] (tasks sorted by
// their number of answers, so that a few busy tasks widen only their own blocks); S is then the
// widest block's slots.
struct Slots {
  const int8_t* L;
  const int32_t* wi;
  int64_t S, W;
  const int32_t* off = nullptr;  // [T/8 + 1] block offsets in slots, or null: every block S
  int64_t Z = 0;                 // the slots of L (Z >= off[T/8]; T/8 * S when off is null)
  bool coo() const { return wi != nullptr; }
  // the index in L of the first value of the block at row r, and that block's slots
  int64_t base(int64_t r) const { return off ? (int64_t)off[r >> 3] * 8 : r * S; }
  int64_t width(int64_t r) const { return off ? (int64_t)(off[(r >> 3) + 1] - off[r >> 3]) : S; }
  int64_t elems() const { return Z * 8; }  // the values of L (and of each p buffer)
  // the rows of a chunk of the threads' shares: a dense panel's sums of alpha's gradient are a
  // vector of lanes an annotator, a chunk's few; a sparse crowd's are W doubles a chunk, so its
  // rows come in at most COO_CHUNKS chunks, however many threads there are
  int64_t span(int64_t U) const {
    if (!coo()) return GCHUNK;
    constexpr int64_t COO_CHUNKS = 32;
    return std::max<int64_t>(1, (U + GCHUNK * COO_CHUNKS - 1) / (GCHUNK * COO_CHUNKS)) * GCHUNK;
  }
};

// rows [0, U) in blocks of 8, in chunks of sl.span(U) rows that the threads take in turn as each
// finishes one (a thread slowed by a neighbour on its core takes fewer), each chunk summed into
// its own Acc (its float lanes carried into double every GCHUNK rows): the sums, added up over
// the chunks in order, do not depend on which thread ran a chunk nor on how many threads there
// are. body(r, acc, nb) takes nb blocks from row r, nb a std::integral_constant: 2, or 1 for an
// odd last block of GCHUNK rows.
template <typename F>
void parallel_row_pairs(int64_t U, int64_t threads, std::vector<Acc>& parts, const Slots& sl,
                        F&& body) {
  const int64_t span = sl.span(U);
  const int64_t chunks = std::max<int64_t>(1, (U + span - 1) / span);
  parts.resize(chunks);
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      Acc& acc = parts[i];
      acc.init(sl.coo() ? 0 : sl.W, sl.W);
      const int64_t c = i * span, e = std::min(U, c + span);
      for (int64_t r = c; r < e;) {
        const int64_t f = std::min(e, r + GCHUNK);
        for (; r + 16 <= f; r += 16) body(r, acc, std::integral_constant<int, 2>{});
        for (; r < f; r += 8) body(r, acc, std::integral_constant<int, 1>{});
        acc.flush();
      }
      if (c >= e) acc.flush();
    }
  };
  Workers::run(std::max<int64_t>(1, std::min(threads, chunks)), [&](int64_t) { work(); });
}

// the same, one block a call: body(r, acc)
template <typename F>
void parallel_rows(int64_t U, int64_t threads, std::vector<Acc>& parts, const Slots& sl,
                   F&& body) {
  parallel_row_pairs(U, threads, parts, sl, [&](int64_t r, Acc& acc, auto nb) {
    for (int j = 0; j < decltype(nb)::value; ++j) body(r + 8 * j, acc);
  });
}

// alpha of the 8 rows' answers in slot s of the block whose values start at o (sl.base)
template <bool COO>
inline __m256 alpha_at(const Slots& sl, const float* al, int64_t o, int64_t s) {
  if constexpr (COO)
    return _mm256_i32gather_ps(al, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                       sl.wi + o + s * 8)), 4);
  else
    return _mm256_set1_ps(al[s]);
}

// (COO) c, 8 rows' terms of alpha's gradient in slot s of the block at o, added to each
// lane's annotator's sum; 8 rows with one annotator in the slot, as tasks sorted by their first
// annotator often have, take one add of the lanes' sum (1M sparse tasks: 33.8-35.0 ms a GLAD
// iteration against 38.1-39.6 without it, session 31). A dense panel's sums are annotator s's
// lanes, added in the passes themselves.
inline void add_alpha_coo(Acc& acc, const Slots& sl, int64_t o, int64_t s, __m256 c) {
  const int32_t* w = sl.wi + o + s * 8;
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(wv, _mm256_set1_epi32(w[0]))) == -1) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    acc.da[w[0]] += _mm_cvtss_f32(h);
    return;
  }
  alignas(32) float v[8];
  _mm256_store_ps(v, c);
  for (int i = 0; i < 8; ++i) acc.da[w[i]] += v[i];
}

inline __m256 valid_lanes(int64_t r, int64_t U) {
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)U), idx));
}

// widx: empty (a dense panel: slot = annotator) or like the labels (a sparse crowd's annotators,
// each below alpha's W: _native.glad_coo_rows makes them so); boff: empty (labels [T/8, S, 8])
// or a sparse crowd's ragged blocks (Slots::off, [T/8 + 1]; labels [Z, 8]). T: the weights'.
ffi::Error CheckRows(ffi::Buffer<ffi::S8>& lab, ffi::Buffer<ffi::S32>& widx,
                     ffi::Buffer<ffi::S32>& boff, ffi::Buffer<ffi::F32>& weights,
                     ffi::Buffer<ffi::S32>& n, ffi::Buffer<ffi::F32>& alpha,
                     ffi::Buffer<ffi::F32>& log_beta, Slots* sl, int64_t* T, int64_t* U) {
  *T = weights.element_count();
  if (*T % 8 != 0) return ffi::Error::InvalidArgument("glad: rows T a multiple of 8");
  if (*T >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("glad: T < 2^31 rows");
  auto d = lab.dimensions();
  const bool coo = widx.element_count() != 0;
  if (coo && widx.element_count() != lab.element_count())
    return ffi::Error::InvalidArgument("glad: annotators shaped like the labels, or none");
  if (boff.element_count() == 0) {
    if (d.size() != 3 || d[2] != 8 || d[0] * 8 != *T)
      return ffi::Error::InvalidArgument("glad: labels [T/8, S, 8]");
    *sl = Slots{lab.typed_data(), coo ? widx.typed_data() : nullptr, d[1],
                coo ? (int64_t)alpha.element_count() : d[1]};
    sl->Z = d[0] * d[1];
  } else {
    const int64_t B = *T / 8;
    if (!coo || d.size() != 2 || d[1] != 8 || boff.element_count() != B + 1)
      return ffi::Error::InvalidArgument(
          "glad: ragged blocks: labels and annotators [Z, 8], offsets [T/8 + 1]");
    const int32_t* o = boff.typed_data();
    int64_t widest = 0;
    for (int64_t b = 0; b < B; ++b) widest = std::max<int64_t>(widest, (int64_t)o[b + 1] - o[b]);
    bool ok = o[0] == 0 && o[B] <= d[0];
    for (int64_t b = 0; ok && b < B; ++b) ok = o[b + 1] >= o[b];
    if (!ok) return ffi::Error::InvalidArgument("glad: block offsets from 0, ascending, <= Z");
    *sl = Slots{lab.typed_data(), widx.typed_data(), widest, (int64_t)alpha.element_count()};
    sl->off = o;
    sl->Z = d[0];
  }
  if (alpha.element_count() != sl->W || log_beta.element_count() != *T)
    return ffi::Error::InvalidArgument("glad: alpha [W], log_beta [T], weights [T] expected");
  *U = n.typed_data()[0];
  if (*U < 0 || *U > *T) return ffi::Error::InvalidArgument("glad: 0 <= n <= T rows");
  return ffi::Error::Success();
}

// p = pk[y] lane by lane (pk[k] = 0 for k >= K), masked by ans: a tree of blends on y's low
// bits (K <= 8; y < 0 is masked out by ans), fewer operations than a compare per class
template <int K>
inline __m256 pick(__m256i y, const __m256* pk, __m256 ans) {
  constexpr int NP = K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : 8;
  __m256 s[NP];
  for (int k = 0; k < NP; ++k) s[k] = k < K ? pk[k] : _mm256_setzero_ps();
  int shift = 31;  // bit j of y to the sign bit, j = 0, 1, 2
  for (int width = NP; width > 1; width /= 2, --shift) {
    const __m256 m = _mm256_castsi256_ps(_mm256_sllv_epi32(y, _mm256_set1_epi32(shift)));
    for (int i = 0; i < width / 2; ++i) s[i] = _mm256_blendv_ps(s[2 * i], s[2 * i + 1], m);
  }
  return _mm256_and_ps(ans, s[0]);
}

// E pass over rows [0, U) with K known at compile time (the class loops unrolled, the scores
// kept in registers), the new p written to P. It also sums Q's answer term with the old p in
// Pold (acc.fqo: the M-step's check of Q at the parameters this pass is at); Pold may be P
// (each block's old p is read before its new p is stored). With GRAD, it also makes the
// gradient pass's sums at these parameters with the new p, from the exps it has (acc.fa:
// alpha's lanes; DB: each row's d_b): the next M-step's first gradient, which then needs no
// pass of its own.
template <int K, bool GRAD, bool COO>
void e_rows(int64_t U, const Slots& sl, int64_t threads, const int8_t* fl, const float* wt,
            const float* al, const float* lb, const float* lp, float lkm1, float* out,
            const float* Pold, float* P, float* DB, std::vector<Acc>& parts) {
  const bool want_post = out != nullptr;
  const int8_t* L = sl.L;
  parallel_rows(U, threads, parts, sl, [&](int64_t r, Acc& acc) {
    // the block's slots (a dense panel's annotators) and where its values start
    const int64_t W = COO ? sl.width(r) : sl.S, o = COO ? sl.base(r) : r * sl.S;
    thread_local std::vector<__m256> xbuf, ebuf;
    if ((int64_t)xbuf.size() < W) xbuf.resize(W);
    if (GRAD && (int64_t)ebuf.size() < W) ebuf.resize(W);
    LogProd lp1;
    __m256 valid = valid_lanes(r, U);
    __m256 beta = exp256(_mm256_loadu_ps(lb + r));
    // qa = sum_w answered (min(x, 0) - x) (= log sigma(-x) + log(1 + e)), cnt = answers
    __m256 qa = _mm256_setzero_ps(), qo = _mm256_setzero_ps(), cnt = _mm256_setzero_ps();
    __m256 sc[K];
    for (int k = 0; k < K; ++k) sc[k] = _mm256_setzero_ps();
    for (int64_t w = 0; w < W; ++w) {
      __m256i y = load_s8(L + o + w * 8);
      __m256 ans = _mm256_and_ps(valid, _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(y, _mm256_set1_epi32(-1))));
      __m256 x = _mm256_mul_ps(alpha_at<COO>(sl, al, o, w), beta);
      __m256 e = exp_neg_abs(x);
      lp1.add(ans, e);
      xbuf[w] = x;
      if constexpr (GRAD) ebuf[w] = e;
      __m256 m0 = _mm256_sub_ps(_mm256_min_ps(x, _mm256_setzero_ps()), x);
      qa = _mm256_add_ps(qa, _mm256_and_ps(ans, m0));
      cnt = _mm256_add_ps(cnt, _mm256_and_ps(ans, _mm256_set1_ps(1.f)));
      // Q's answer term with the old p: log sigma(x) - (1 - p) x = m0 - log(1 + e) + p x
      __m256 p_old = _mm256_loadu_ps(Pold + o + w * 8);
      qo = _mm256_add_ps(qo, _mm256_and_ps(ans, _mm256_fmadd_ps(p_old, x, m0)));
    }
    for (int64_t w = 0; w < W; ++w) {  // the scores' per-label part, from the stored x
      __m256i y = load_s8(L + o + w * 8);
      __m256 d = _mm256_add_ps(xbuf[w], _mm256_set1_ps(lkm1));
      for (int k = 0; k < K; ++k) {
        __m256 is = _mm256_castsi256_ps(_mm256_cmpeq_epi32(y, _mm256_set1_epi32(k)));
        sc[k] = _mm256_add_ps(sc[k], _mm256_and_ps(is, d));
      }
    }
    const __m256 log1pe = lp1.total();
    // sum_w answered log P(wrong) = sum (log sigma(-x) - log(K - 1)) = qa - log1pe - cnt log(K-1)
    const __m256 base = _mm256_sub_ps(_mm256_fnmadd_ps(cnt, _mm256_set1_ps(lkm1), qa), log1pe);
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int k = 0; k < K; ++k) {
      sc[k] = _mm256_add_ps(_mm256_add_ps(sc[k], base), _mm256_set1_ps(lp[k]));
      m = _mm256_max_ps(m, sc[k]);
    }
    __m256 s = _mm256_setzero_ps();
    __m256 pk[K];
    for (int k = 0; k < K; ++k) {
      pk[k] = exp_le0(_mm256_sub_ps(sc[k], m));
      s = _mm256_add_ps(s, pk[k]);
    }
    __m256 logz = _mm256_add_ps(m, log256(s));
    __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), s);
    alignas(8) int8_t gbuf[8];
    for (int i = 0; i < 8; ++i) gbuf[i] = r + i < U ? fl[r + i] : -1;
    __m256i g = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(gbuf)));
    __m256 isg = _mm256_castsi256_ps(_mm256_cmpgt_epi32(g, _mm256_set1_epi32(-1)));
    __m256 gscore = _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) {
      __m256 isk = _mm256_castsi256_ps(_mm256_cmpeq_epi32(g, _mm256_set1_epi32(k)));
      gscore = _mm256_add_ps(gscore, _mm256_and_ps(isk, sc[k]));
      pk[k] = _mm256_blendv_ps(_mm256_mul_ps(pk[k], inv),
                               _mm256_and_ps(isk, _mm256_set1_ps(1.f)), isg);
    }
    logz = _mm256_blendv_ps(logz, gscore, isg);
    __m256 wv = _mm256_and_ps(valid, _mm256_loadu_ps(wt + r));
    acc.fll = _mm256_add_ps(acc.fll, _mm256_mul_ps(wv, _mm256_and_ps(valid, logz)));
    acc.fqo = _mm256_fmadd_ps(wv, _mm256_sub_ps(qo, log1pe), acc.fqo);
    // p = q_t(y_tw) per answer (0 where unanswered); Q's answer term qa - log1pe + sum p x;
    // with GRAD, g = p - sigma(x) summed as the gradient pass sums it
    __m256 q = qa;
    const __m256 wb = _mm256_mul_ps(wv, beta);
    __m256 dbv = _mm256_setzero_ps();
    for (int64_t w = 0; w < W; ++w) {
      __m256i y = load_s8(L + o + w * 8);
      __m256 ans = _mm256_and_ps(valid, _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(y, _mm256_set1_epi32(-1))));
      __m256 p = pick<K>(y, pk, ans);
      _mm256_storeu_ps(P + o + w * 8, p);
      q = _mm256_fmadd_ps(p, xbuf[w], q);
      if constexpr (GRAD) {
        __m256 g = _mm256_and_ps(ans, _mm256_sub_ps(p, sigmoid_from(xbuf[w], ebuf[w])));
        if constexpr (COO) add_alpha_coo(acc, sl, o, w, _mm256_mul_ps(g, wb));
        else acc.fa[w] = _mm256_fmadd_ps(g, wb, acc.fa[w]);
        dbv = _mm256_fmadd_ps(g, xbuf[w], dbv);
      }
    }
    if constexpr (GRAD) _mm256_storeu_ps(DB + r, dbv);
    acc.fq = _mm256_fmadd_ps(wv, _mm256_sub_ps(q, log1pe), acc.fq);
    for (int k = 0; k < K; ++k) acc.fc[k] = _mm256_fmadd_ps(wv, pk[k], acc.fc[k]);
    if (want_post) {
      alignas(32) float pv[K][8];
      for (int k = 0; k < K; ++k) _mm256_store_ps(pv[k], pk[k]);
      for (int i = 0; i < 8 && r + i < U; ++i)
        for (int k = 0; k < K; ++k) out[(r + i) * K + k] = pv[k][i];
    }
  });
}

// an E pass's sums over the threads: the weighted log-likelihood, Q's answer term with the new
// p and with the old one, the K weighted class sums
struct ESums {
  double ll = 0, q = 0, q_old = 0, cs[8] = {0};
  void store(float* st, int64_t K) const {  // [ll, q, class sums]: the E call's stats
    st[0] = (float)ll;
    st[1] = (float)q;
    for (int64_t k = 0; k < K; ++k) st[2 + k] = (float)cs[k];
  }
};

// DB: null, or [T] where the pass writes each row's d_b (blocks past n: zeros) and sums
// alpha's gradient into the parts (alpha_sum): the gradient pass's sums at these parameters
// with the new p
ESums e_pass(int64_t K, int64_t U, const Slots& sl, int64_t threads, const int8_t* fl,
             const float* wt, const float* al, const float* lb, const float* lp, float* out,
             const float* Pold, float* P, std::vector<Acc>& parts, float* DB = nullptr,
             int64_t T = 0) {
  using Fn = void (*)(int64_t, const Slots&, int64_t, const int8_t*, const float*, const float*,
                      const float*, const float*, float, float*, const float*, float*, float*,
                      std::vector<Acc>&);
#define CROWDLLM_E_ROWS(G, C)                                                              \
  {e_rows<1, G, C>, e_rows<2, G, C>, e_rows<3, G, C>, e_rows<4, G, C>, e_rows<5, G, C>, \
   e_rows<6, G, C>, e_rows<7, G, C>, e_rows<8, G, C>}
  static constexpr Fn table[2][2][8] = {
      {CROWDLLM_E_ROWS(false, false), CROWDLLM_E_ROWS(true, false)},
      {CROWDLLM_E_ROWS(false, true), CROWDLLM_E_ROWS(true, true)}};
#undef CROWDLLM_E_ROWS
  const float lkm1 = std::log((float)std::max<int64_t>(K - 1, 1));
  if (DB != nullptr) {
    const int64_t full = (U + 7) / 8 * 8;
    std::memset(DB + full, 0, sizeof(float) * (T - full));
  }
  table[sl.coo()][DB != nullptr][K - 1](U, sl, threads, fl, wt, al, lb, lp, lkm1, out, Pold, P,
                                        DB, parts);
  ESums es;
  for (auto& a : parts) {
    es.ll += hsum(a.ll0, a.ll1);
    es.q += hsum(a.q0, a.q1);
    es.q_old += hsum(a.qo0, a.qo1);
    for (int k = 0; k < K; ++k) es.cs[k] += a.dc[k];
  }
  return es;
}

// p_in: the last pass's p (aliased to pright, so the buffer is reused, not page-faulted anew);
// post: [T, K] posteriors written when it has T rows (else a [1, K] placeholder); stats: the
// weighted log-likelihood, Q's answer term and the K weighted class sums.
ffi::Error EImpl(ffi::Buffer<ffi::S8> lab, ffi::Buffer<ffi::S32> widx,
                 ffi::Buffer<ffi::S32> boff, ffi::Buffer<ffi::S8> flags,
                 ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                 ffi::Buffer<ffi::F32> alpha,
                 ffi::Buffer<ffi::F32> log_beta, ffi::Buffer<ffi::F32> log_prior,
                 ffi::Buffer<ffi::F32> p_in, ffi::ResultBuffer<ffi::F32> post,
                 ffi::ResultBuffer<ffi::F32> pright, ffi::ResultBuffer<ffi::F32> stats,
                 int64_t threads) {
  Slots sl;
  int64_t T, U;
  if (auto e = CheckRows(lab, widx, boff, weights, n, alpha, log_beta, &sl, &T, &U); e.failure())
    return e;
  const int64_t K = log_prior.element_count();
  if (K < 1 || K > 8) return ffi::Error::InvalidArgument("glad: 1 <= K <= 8 classes");
  const int8_t* fl = flags.typed_data();
  const float* wt = weights.typed_data();
  const float* al = alpha.typed_data();
  const float* lb = log_beta.typed_data();
  const float* lp = log_prior.typed_data();
  if (p_in.element_count() != sl.elems() || pright->element_count() != sl.elems())
    return ffi::Error::InvalidArgument("glad: p shaped like the labels expected");
  const bool want_post = post->dimensions()[0] == T;
  float* out = want_post ? post->typed_data() : nullptr;
  float* P = pright->typed_data();
  if (want_post) std::memset(out + U * K, 0, sizeof(float) * (T - U) * K);  // rows past n: zeros
  const int64_t full = (U + 7) / 8 * 8;  // blocks past n: zeros (a partial block: masked below)
  std::memset(P + sl.base(full), 0, sizeof(float) * (sl.elems() - sl.base(full)));
  if (stats->element_count() != 2 + K) return ffi::Error::InvalidArgument("glad: stats [2 + K]");
  std::vector<Acc> parts;
  const ESums es = e_pass(K, U, sl, threads, fl, wt, al, lb, lp, out, P, P, parts);
  es.store(stats->typed_data(), K);
  return ffi::Error::Success();
}

// the alpha gradient's sums of a pass: each annotator's lanes, over the threads, in double
inline float alpha_sum(const std::vector<Acc>& parts, int64_t w) {
  double s = 0;
  for (auto& a : parts) s += a.da[w];
  return (float)s;
}

// gradient / Q pass over rows [0, U), what it computes fixed at compile time (no per-answer
// branches; the accumulators stay in registers). With GRAD, each block of 8 rows ends with
// row_done(r, valid, b, d_b): the block's log-betas and difficulty gradients (lanes past n: 0).
// Two blocks go through the annotators together (the last block of a chunk may go alone): their
// answers' chains of dependent operations interleave (~10 % faster on the AMD VM). Ragged
// blocks (Slots::off) go together where they are as wide, else one after the other.
template <bool GRAD, bool WANT_Q, bool COO, typename RowDone>
void grad_rows(int64_t U, const Slots& sl, int64_t threads, const float* wt, const float* P,
               const float* al, const float* lb, std::vector<Acc>& parts, RowDone&& row_done) {
  const int8_t* L = sl.L;
  auto blocks = [&](int64_t r0, Acc& acc, auto nb) {
    constexpr int NB = decltype(nb)::value;
    const int64_t W = COO ? sl.width(r0) : sl.S;  // the blocks' slots (a panel's annotators)
    __m256 valid[NB], b[NB], beta[NB], wv[NB], wb[NB], dbv[NB], q[NB];
    int64_t o[NB];  // where each block's values start
    LogProd lp1[NB];
    for (int j = 0; j < NB; ++j) {
      const int64_t r = r0 + 8 * j;
      o[j] = COO ? sl.base(r) : r * sl.S;
      valid[j] = valid_lanes(r, U);
      b[j] = _mm256_loadu_ps(lb + r);
      beta[j] = exp256(b[j]);
      wv[j] = _mm256_and_ps(valid[j], _mm256_loadu_ps(wt + r));
      wb[j] = _mm256_mul_ps(wv[j], beta[j]);
      dbv[j] = q[j] = _mm256_setzero_ps();
    }
    for (int64_t w = 0; w < W; ++w) {
      const __m256 a = COO ? _mm256_setzero_ps() : _mm256_set1_ps(al[w]);
      __m256 fa = COO ? _mm256_setzero_ps() : acc.fa[w];
      for (int j = 0; j < NB; ++j) {
        __m256i y = load_s8(L + o[j] + w * 8);
        __m256 ans = _mm256_and_ps(valid[j], _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(y, _mm256_set1_epi32(-1))));
        __m256 x = _mm256_mul_ps(COO ? alpha_at<true>(sl, al, o[j], w) : a, beta[j]);
        __m256 p = _mm256_loadu_ps(P + o[j] + w * 8);
        __m256 e;
        if constexpr (WANT_Q) e = exp_neg_abs(x);
        if constexpr (GRAD) {
          __m256 g = _mm256_and_ps(ans, _mm256_sub_ps(p, WANT_Q ? sigmoid_from(x, e)
                                                               : sigmoid_direct(x)));
          if constexpr (COO) add_alpha_coo(acc, sl, o[j], w, _mm256_mul_ps(g, wb[j]));
          else fa = _mm256_fmadd_ps(g, wb[j], fa);
          dbv[j] = _mm256_fmadd_ps(g, x, dbv[j]);
        }
        if constexpr (WANT_Q) {
          __m256 term = _mm256_fnmadd_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), p), x,
                                         _mm256_min_ps(x, _mm256_setzero_ps()));
          q[j] = _mm256_add_ps(q[j], _mm256_and_ps(ans, term));
          lp1[j].add(ans, e);
        }
      }
      if constexpr (GRAD && !COO) acc.fa[w] = fa;
    }
    for (int j = 0; j < NB; ++j) {
      if constexpr (GRAD) row_done(r0 + 8 * j, valid[j], b[j], dbv[j]);
      if constexpr (WANT_Q)
        acc.fq = _mm256_fmadd_ps(wv[j], _mm256_sub_ps(q[j], lp1[j].total()), acc.fq);
    }
  };
  parallel_row_pairs(U, threads, parts, sl, [&](int64_t r0, Acc& acc, auto nb) {
    if constexpr (COO && decltype(nb)::value == 2) {
      if (sl.width(r0) != sl.width(r0 + 8)) {
        blocks(r0, acc, std::integral_constant<int, 1>{});
        blocks(r0 + 8, acc, std::integral_constant<int, 1>{});
        return;
      }
    }
    blocks(r0, acc, nb);
  });
}

// mode 1: gradients; 2: Q's answer term only; 3: both
ffi::Error GradImpl(ffi::Buffer<ffi::S8> lab, ffi::Buffer<ffi::S32> widx,
                    ffi::Buffer<ffi::S32> boff, ffi::Buffer<ffi::F32> weights,
                    ffi::Buffer<ffi::S32> n, ffi::Buffer<ffi::F32> pright,
                    ffi::Buffer<ffi::F32> alpha,
                    ffi::Buffer<ffi::F32> log_beta, ffi::ResultBuffer<ffi::F32> d_alpha,
                    ffi::ResultBuffer<ffi::F32> d_b, ffi::ResultBuffer<ffi::F32> qout,
                    int64_t threads, int64_t mode) {
  Slots sl;
  int64_t T, U;
  if (auto e = CheckRows(lab, widx, boff, weights, n, alpha, log_beta, &sl, &T, &U); e.failure())
    return e;
  if (pright.element_count() != sl.elems())
    return ffi::Error::InvalidArgument("glad: p shaped like the labels");
  if (mode < 1 || mode > 3) return ffi::Error::InvalidArgument("glad: mode 1, 2 or 3");
  const int64_t W = sl.W;
  const float* wt = weights.typed_data();
  const float* P = pright.typed_data();
  const float* al = alpha.typed_data();
  const float* lb = log_beta.typed_data();
  float* db = d_b->typed_data();
  std::memset(db + U, 0, sizeof(float) * (T - U));
  std::vector<Acc> parts;
  auto store = [db](int64_t r, __m256, __m256, __m256 d) { _mm256_storeu_ps(db + r, d); };
  auto run = [&](auto grad, auto want_q) {
    if (sl.coo())
      grad_rows<grad.value, want_q.value, true>(U, sl, threads, wt, P, al, lb, parts, store);
    else
      grad_rows<grad.value, want_q.value, false>(U, sl, threads, wt, P, al, lb, parts, store);
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (mode == 1) run(yes{}, no{});
  else if (mode == 2) run(no{}, yes{});
  else run(yes{}, yes{});
  float* da = d_alpha->typed_data();
  double qq = 0;
  for (int64_t w = 0; w < W; ++w) da[w] = alpha_sum(parts, w);
  for (auto& a : parts) qq += hsum(a.q0, a.q1);
  qout->typed_data()[0] = (float)qq;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------- M-step
// The whole M-step of one EM iteration in one call: m_steps Adam steps on Q, then Q at the new
// parameters (from the next E pass there, which leaves the next E-step done), undone and retried
// with a 4 times smaller step while Q fell (glad.adam_steps' rule; optax.scale_by_adam's update,
// with b1, b2, eps passed in). Each step is one pass over the rows: a row's difficulty gradient
// depends on its own b_t and on alpha only, so the pass updates b_t (and its Adam moments) right
// after summing it, and alpha (W values) after the pass; the gradients are the ones JAX's step
// would see (all taken at the step's start).

struct Adam {  // one step's constants
  float b1, b2, eps, bc1, bc2, step;  // bias corrections 1 - b^count; step = lr * scale
};

struct Clip {  // glad.py's box: |alpha| <= alpha_max, log_beta_min <= b <= log_beta_max
  float alpha_max, b_min, b_max;
};

// p += step * m_hat / (sqrt(v_hat) + eps), after the moments take g; clipped to [lo, hi]
inline float adam1(float g, float& m, float& v, float p, const Adam& a, float lo, float hi) {
  m = (1.f - a.b1) * g + a.b1 * m;
  v = (1.f - a.b2) * (g * g) + a.b2 * v;
  float u = (m / a.bc1) / (std::sqrt(v / a.bc2) + a.eps);
  return std::min(std::max(p + a.step * u, lo), hi);
}

inline __m256 adam8(__m256 g, float* m_, float* v_, __m256 p, const Adam& a, float lo, float hi) {
  __m256 m = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(1.f - a.b1), g),
                           _mm256_mul_ps(_mm256_set1_ps(a.b1), _mm256_loadu_ps(m_)));
  __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(1.f - a.b2), _mm256_mul_ps(g, g)),
                           _mm256_mul_ps(_mm256_set1_ps(a.b2), _mm256_loadu_ps(v_)));
  _mm256_storeu_ps(m_, m);
  _mm256_storeu_ps(v_, v);
  __m256 u = _mm256_div_ps(_mm256_div_ps(m, _mm256_set1_ps(a.bc1)),
                           _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(v, _mm256_set1_ps(a.bc2))),
                                         _mm256_set1_ps(a.eps)));
  p = _mm256_add_ps(p, _mm256_mul_ps(_mm256_set1_ps(a.step), u));
  return _mm256_min_ps(_mm256_max_ps(p, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}

// sum over rows [0, U) of wt[t] (lb[t] - mu)^2 (each term as (double)wt (lb - mu) (lb - mu), in
// two chains of four lanes: one chain of dependent adds took ~0.4 ms at 385k rows, a try's 3 %)
inline double weighted_sq(const float* wt, const float* lb, float mu, int64_t U) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t t = 0;
  for (; t + 8 <= U; t += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(lb + t), _mm256_set1_ps(mu));
    const __m256 w = _mm256_loadu_ps(wt + t);
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
    s0 = _mm256_add_pd(s0, _mm256_mul_pd(_mm256_mul_pd(
        _mm256_cvtps_pd(_mm256_castps256_ps128(w)), d0), d0));
    s1 = _mm256_add_pd(s1, _mm256_mul_pd(_mm256_mul_pd(
        _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), d1), d1));
  }
  double s = hsum(s0, s1);
  for (; t < U; ++t) s += (double)wt[t] * (lb[t] - mu) * (lb[t] - mu);
  return s;
}

struct BStep {  // one Adam step of the difficulties b (and their moments), in place
  float *lb, *mb, *vb;
  float mu_beta;
  const Adam& a;
  const Clip& clip;
  // a block of 8 rows from r, given their summed d_b (the prior's term is added here)
  void block(int64_t r, __m256 valid, __m256 b, __m256 dbv) const {
    __m256 g = _mm256_and_ps(valid, _mm256_sub_ps(dbv, _mm256_sub_ps(b, _mm256_set1_ps(mu_beta))));
    _mm256_storeu_ps(lb + r, adam8(g, mb + r, vb + r, b, a, clip.b_min, clip.b_max));
  }
  // rows [U, T) past the last block with a zero gradient, as in JAX (8 at a time: T is a
  // multiple of 8; the same floats as adam1's, which took ~0.1 ms a pass for a bucket's padding)
  void past(int64_t U, int64_t T) const {
    for (int64_t t = (U + 7) / 8 * 8; t < T; t += 8)
      _mm256_storeu_ps(lb + t, adam8(_mm256_setzero_ps(), mb + t, vb + t, _mm256_loadu_ps(lb + t),
                                     a, clip.b_min, clip.b_max));
  }
};

// one Adam step's pass: the gradient pass, each row's b_t (and moments) stepped in place as
// soon as its gradient is summed; rows past U (and lanes past it) take a zero gradient, as in JAX
void grad_step_rows(int64_t U, int64_t T, const Slots& sl, int64_t threads, const float* wt,
                    const float* P, const float* al, const BStep& step,
                    std::vector<Acc>& parts) {
  auto done = [&](int64_t r, __m256 valid, __m256 b, __m256 dbv) {
    step.block(r, valid, b, dbv);
  };
  if (sl.coo()) grad_rows<true, false, true>(U, sl, threads, wt, P, al, step.lb, parts, done);
  else grad_rows<true, false, false>(U, sl, threads, wt, P, al, step.lb, parts, done);
  step.past(U, T);
}

// args: labels, gold flags, row weights, n, two buffers of p = q_t(y_tw) [T/8, W, 8] and which
// one holds p (0 or 1; the other is scratch), alpha, log-beta, Adam's count and moments of
// alpha and log-beta, scalars [lr scale, Q before the step, lr, mu_alpha, mu_beta], the
// annotators' mask, the next E-step's log class prior; returns the parameters, moments and
// count after the M-step, [lr scale, tries, accepted], and the next E-step: p at the returned
// parameters, in the buffer that was scratch (both buffers in place; `which` flipped), and its
// stats [log-likelihood, Q's answer term, K class sums], as glad_e gives them.
//
// Each try's Q check is the E pass at the try's parameters: it sums Q's answer term with the
// old p while it writes the new p into the scratch buffer, so an accepted try leaves the next
// iteration's E-step done and a rejected one leaves the old p as it was. When every try fails,
// the E pass runs at the M-step's start (with the next prior).
//
// That E pass also sums the gradient at its parameters with the new p (e_pass's DB): the next
// M-step's first gradient, returned as g1 [alpha's W, then d_b's T]. Taken back as the next
// call's g1 with have_g1 = 1, it spares that call's first step its gradient pass, in every try
// (a retry starts from the same parameters). have_g1 = 0 (the fit's first M-step): the first
// step's gradient pass runs as the others do.
ffi::Error MImpl(ffi::Buffer<ffi::S8> lab, ffi::Buffer<ffi::S32> widx, ffi::Buffer<ffi::S32> boff,
                 ffi::Buffer<ffi::S8> flags,
                 ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> n,
                 ffi::Buffer<ffi::F32> p0, ffi::Buffer<ffi::F32> p1, ffi::Buffer<ffi::S32> which,
                 ffi::Buffer<ffi::F32> alpha, ffi::Buffer<ffi::F32> log_beta,
                 ffi::Buffer<ffi::S32> count,
                 ffi::Buffer<ffi::F32> mu_a, ffi::Buffer<ffi::F32> mu_b,
                 ffi::Buffer<ffi::F32> nu_a, ffi::Buffer<ffi::F32> nu_b,
                 ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> wmask,
                 ffi::Buffer<ffi::F32> log_prior_next, ffi::Buffer<ffi::F32> g1,
                 ffi::Buffer<ffi::S32> have_g1, ffi::ResultBuffer<ffi::F32> alpha_o,
                 ffi::ResultBuffer<ffi::F32> log_beta_o,
                 ffi::ResultBuffer<ffi::S32> count_o, ffi::ResultBuffer<ffi::F32> mu_a_o,
                 ffi::ResultBuffer<ffi::F32> mu_b_o, ffi::ResultBuffer<ffi::F32> nu_a_o,
                 ffi::ResultBuffer<ffi::F32> nu_b_o, ffi::ResultBuffer<ffi::F32> info,
                 ffi::ResultBuffer<ffi::F32> p0_o, ffi::ResultBuffer<ffi::F32> p1_o,
                 ffi::ResultBuffer<ffi::S32> which_o, ffi::ResultBuffer<ffi::F32> stats,
                 ffi::ResultBuffer<ffi::F32> g1_o, int64_t threads, int64_t m_steps,
                 int64_t max_tries, float b1, float b2, float eps, float alpha_max,
                 float log_beta_min, float log_beta_max) {
  Slots sl;
  int64_t T, U;
  if (auto e = CheckRows(lab, widx, boff, weights, n, alpha, log_beta, &sl, &T, &U); e.failure())
    return e;
  const int64_t K = log_prior_next.element_count(), W = sl.W;
  if (K < 1 || K > 8 || stats->element_count() != 2 + K)
    return ffi::Error::InvalidArgument("glad: 1 <= K <= 8 classes, stats [2 + K]");
  if (p0.element_count() != sl.elems() || p1.element_count() != sl.elems() ||
      p0.typed_data() != p0_o->typed_data() || p1.typed_data() != p1_o->typed_data() ||
      which.element_count() != 1 || which_o->element_count() != 1)
    return ffi::Error::InvalidArgument("glad: two p buffers like the labels, rewritten in place");
  const int32_t cur = which.typed_data()[0];
  if (cur != 0 && cur != 1) return ffi::Error::InvalidArgument("glad: which p buffer: 0 or 1");
  if (mu_a.element_count() != W || nu_a.element_count() != W || wmask.element_count() != W ||
      mu_b.element_count() != T || nu_b.element_count() != T)
    return ffi::Error::InvalidArgument("glad: Adam moments [W] and [T], mask [W] expected");
  if (scalars.element_count() != 5 || info->element_count() != 3 || count.element_count() != 1)
    return ffi::Error::InvalidArgument("glad: scalars [5], info [3], count [] expected");
  if (m_steps < 1 || max_tries < 1)
    return ffi::Error::InvalidArgument("glad: m_steps >= 1 and max_tries >= 1");
  if (g1.element_count() != W + T || g1_o->element_count() != W + T ||
      have_g1.element_count() != 1 || g1.typed_data() == g1_o->typed_data())
    return ffi::Error::InvalidArgument("glad: g1 [W + T] in and out (not aliased), have_g1 []");
  const bool have = have_g1.typed_data()[0] != 0;
  const float* g1a = g1.typed_data();  // the first step's gradient sums (have): alpha's
  const float* g1b = g1a + W;          // and each row's d_b
  float* g1a_o = g1_o->typed_data();
  float* g1b_o = g1a_o + W;
  const int8_t* fl = flags.typed_data();
  const float* wt = weights.typed_data();
  const float* P = cur ? p1_o->typed_data() : p0_o->typed_data();  // p
  float* Pnew = cur ? p0_o->typed_data() : p1_o->typed_data();       // the next E-step's p
  const int64_t full = (U + 7) / 8 * 8;  // its blocks past n: zeros, as glad_e leaves them
  std::memset(Pnew + sl.base(full), 0, sizeof(float) * (sl.elems() - sl.base(full)));
  const float* wm = wmask.typed_data();
  const float* sc = scalars.typed_data();
  float scale = sc[0];
  const float q_old = sc[1], lr = sc[2], mu_alpha = sc[3], mu_beta = sc[4];
  float* al = alpha_o->typed_data();
  float* lb = log_beta_o->typed_data();
  float* ma = mu_a_o->typed_data();
  float* mb = mu_b_o->typed_data();
  float* va = nu_a_o->typed_data();
  float* vb = nu_b_o->typed_data();
  auto restore = [&] {  // the M-step's start
    std::memcpy(al, alpha.typed_data(), sizeof(float) * W);
    std::memcpy(lb, log_beta.typed_data(), sizeof(float) * T);
    std::memcpy(ma, mu_a.typed_data(), sizeof(float) * W);
    std::memcpy(va, nu_a.typed_data(), sizeof(float) * W);
    std::memcpy(mb, mu_b.typed_data(), sizeof(float) * T);
    std::memcpy(vb, nu_b.typed_data(), sizeof(float) * T);
  };
  const Clip clip{alpha_max, log_beta_min, log_beta_max};
  const int32_t count0 = count.typed_data()[0];
  int32_t c = count0;
  std::vector<Acc> parts;
  std::vector<float> da(W);
  ESums es;
  bool accepted = false;
  int64_t tries = 0;
  while (!accepted && tries < max_tries) {
    restore();
    c = count0;
    for (int64_t s = 0; s < m_steps; ++s) {
      c = c < INT32_MAX ? c + 1 : c;  // optax's safe_increment
      Adam a{b1, b2, eps, 1.f - std::pow(b1, (float)c), 1.f - std::pow(b2, (float)c),
             lr * scale};
      const BStep step{lb, mb, vb, mu_beta, a, clip};
      if (s == 0 && have) {  // the gradient the last E pass summed, stepped as the pass would
        const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, U / 65536));
        Workers::run(nt, [&](int64_t i) {  // (0.35 ms on one thread at 385k rows)
          for (int64_t r = share_start(U, i, nt); r < share_start(U, i + 1, nt); r += 8)
            step.block(r, valid_lanes(r, U), _mm256_loadu_ps(lb + r), _mm256_loadu_ps(g1b + r));
        });
        step.past(U, T);
        for (int64_t w = 0; w < W; ++w) da[w] = (g1a[w] - (al[w] - mu_alpha)) * wm[w];
      } else {
        grad_step_rows(U, T, sl, threads, wt, P, al, step, parts);
        for (int64_t w = 0; w < W; ++w)
          da[w] = (alpha_sum(parts, w) - (al[w] - mu_alpha)) * wm[w];
      }
      for (int64_t w = 0; w < W; ++w)
        al[w] = adam1(da[w], ma[w], va[w], al[w], a, -clip.alpha_max, clip.alpha_max);
    }
    // Q at the new parameters (the answers' term with the old p, then the Gaussian log priors),
    // from the next E pass there
    es = e_pass(K, U, sl, threads, fl, wt, al, lb, log_prior_next.typed_data(), nullptr, P,
                Pnew, parts, g1b_o, T);
    double pa = 0, pb = 0;
    for (int64_t w = 0; w < W; ++w) pa += (double)wm[w] * (al[w] - mu_alpha) * (al[w] - mu_alpha);
    pb = weighted_sq(wt, lb, mu_beta, U);
    const float q_new = (float)es.q_old + (float)(-0.5 * pa - 0.5 * pb);
    accepted = q_new >= q_old;
    ++tries;
    if (!accepted) scale /= 4;
  }
  if (!accepted) {  // every try lowered Q: the old parameters and moments stay
    restore();
    c = count0;
    es = e_pass(K, U, sl, threads, fl, wt, al, lb, log_prior_next.typed_data(), nullptr, P,
                Pnew, parts, g1b_o, T);
  }
  for (int64_t w = 0; w < W; ++w) g1a_o[w] = alpha_sum(parts, w);  // the last E pass's
  which_o->typed_data()[0] = 1 - cur;
  count_o->typed_data()[0] = c;
  float* inf = info->typed_data();
  inf[0] = accepted ? std::min(scale * 2, 1.f) : scale;
  inf[1] = (float)tries;
  inf[2] = accepted ? 1.f : 0.f;
  es.store(stats->typed_data(), K);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmGladE, EImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmGladGrad, GradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrowdllmGladM, MImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("m_steps")
                                  .Attr<int64_t>("max_tries")
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("alpha_max")
                                  .Attr<float>("log_beta_min")
                                  .Attr<float>("log_beta_max"));
