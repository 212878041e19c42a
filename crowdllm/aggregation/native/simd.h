// AVX2 helpers shared by the native kernels (Cephes exp / log polynomials, an 8x8 transpose).
#pragma once
#include <immintrin.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

namespace crowdllm_simd {

// Worker threads kept between calls. Starting a pass's threads anew each time cost GLAD's fit a
// quarter of its time on the 2-vCPU host: a new thread often waited for a CPU, so a pass's
// second share ran late (one M-step of 4 gradient passes and an E pass: 15-23 ms, against 15.0
// with these workers). Workers::run(n, work) calls work(i) for each i in [0, n), work(0) on the
// caller and the others on the workers, and returns when all have returned. A worker spins for
// 50 us after its task (an M-step's next pass comes within microseconds), then sleeps. One
// caller at a time: a caller that finds the workers busy (another device's kernel at the same
// moment) starts threads for its call, as a forked child's first call does.
class Workers {
 public:
  template <typename F>
  static void run(int64_t n, F&& work) {
    if (n <= 1) {
      work(0);
      return;
    }
    Workers& p = instance();
    std::unique_lock<std::mutex> mine(p.busy_, std::try_to_lock);
    if (!mine.owns_lock() || n - 1 > MAX_WORKERS) {
      std::vector<std::thread> th;
      for (int64_t i = 1; i < n; ++i) th.emplace_back([&work, i] { work(i); });
      work(0);
      for (auto& t : th) t.join();
      return;
    }
    const uint64_t gen = p.gen_.load(std::memory_order_relaxed);
    while (p.count_ < n - 1) {  // a new worker waits for the next generation
      const int64_t id = ++p.count_;
      std::thread([&p, id, gen] { p.loop(id, gen); }).detach();
    }
    p.fn_ = [](void* f, int64_t i) { (*static_cast<std::remove_reference_t<F>*>(f))(i); };
    p.arg_ = &work;
    p.pending_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> g(p.m_);
      p.gen_.store(((gen >> 16) + 1) << 16 | (n - 1), std::memory_order_release);
    }
    p.cv_.notify_all();
    work(0);
    for (int spins = 0; p.pending_.load(std::memory_order_acquire) > 0; ++spins) {
      if (spins < 4096) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  static Workers& instance() {  // never destroyed: its threads outlive main
    static Workers* p = new Workers;
    if (p->pid_ != getpid()) p = new Workers;  // a forked child: the workers stayed behind
    return *p;
  }
  void loop(int64_t id, uint64_t seen) {
    for (;;) {
      uint64_t g;
      const auto t0 = std::chrono::steady_clock::now();
      for (int spins = 1; (g = gen_.load(std::memory_order_acquire)) == seen; ++spins) {
        _mm_pause();
        if (spins % 256 == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50)) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = g;
      if (id <= (int64_t)(g & MAX_WORKERS)) {  // (the workers this generation uses)
        fn_(arg_, id);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }
  std::mutex busy_, m_;
  std::condition_variable cv_;
  static constexpr int64_t MAX_WORKERS = 0xffff;
  // the generation: a count << 16 | the workers it uses (ids 1..), read in one load, so that a
  // worker that sits one out never reads the next one's fields
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> pending_{0};
  // this generation's task, fn_(arg_, worker id): read by its workers only, which the caller
  // waits for before the next generation writes them
  void (*fn_)(void*, int64_t) = nullptr;
  void* arg_ = nullptr;
  int64_t count_ = 0;  // workers started
  const pid_t pid_ = getpid();
};

// where share i of `parts` shares of rows [0, total) starts when the threads split the rows in
// blocks of 8: a multiple of 8, and `total` for i = parts (the last share's end)
inline int64_t share_start(int64_t total, int64_t i, int64_t parts) {
  return i == parts ? total : total * i / parts / 8 * 8;
}

inline __m256i fmix32(__m256i h) {  // MurmurHash3's finaliser, as _core._fmix32
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// the counter hash of _core.hash_uniform, its top 23 bits (in [0, 2^23)): element idx's
// fmix32(fmix32(idx * 0x9E3779B9 + s0) ^ s1) >> 9. Its uniform number is (that + 1/2) / 2^23,
// so comparing these integers compares the numbers.
inline __m256i hash23(__m256i idx, uint32_t s0, uint32_t s1) {
  __m256i h = _mm256_add_epi32(_mm256_mullo_epi32(idx, _mm256_set1_epi32((int)0x9E3779B9u)),
                               _mm256_set1_epi32((int)s0));
  h = fmix32(_mm256_xor_si256(fmix32(h), _mm256_set1_epi32((int)s1)));
  return _mm256_srli_epi32(h, 9);
}

// the vector maths below, inlined wherever it is called: a call would spill every live vector
// register around it (all ymm registers are caller-saved), and GCC had left exp and log as calls
// in GLAD's E pass. Forcing them inline measured no change in speed (an E pass 10.57 against
// 10.70 ms, session 31): kept for the code GCC emits, not for a measured gain.
#define CROWDLLM_INLINE inline __attribute__((always_inline))

CROWDLLM_INLINE __m256 exp256(__m256 x) {  // Cephes expf, |rel err| < 2e-7 on [-87, 0]
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

CROWDLLM_INLINE __m256 log256(__m256 x) {  // Cephes logf, positive normal x (a softmax normaliser)
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.f)));
  m = _mm256_add_ps(m, _mm256_and_ps(small, m));
  __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  f = _mm256_add_ps(f, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), f);
}

inline void transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 64-byte aligned buffers for the kernels' sums (a std::vector's large buffer starts 16 bytes
// into a page, so half of the 32-byte read-add-writes into it would straddle two cache lines)
template <class T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <class U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const AlignedAlloc<U>&) const { return false; }
};

template <class T>
using AlignedVector = std::vector<T, AlignedAlloc<T>>;

}  // namespace crowdllm_simd
