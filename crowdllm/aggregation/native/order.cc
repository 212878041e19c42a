// The order in which a sparse crowd's tasks run fastest through the COO sweep (CPU): by their
// first (lowest numbered) annotator, ties in task order, tasks nobody answered last. A plain C
// function called with ctypes on numpy arrays (_native.coo_task_order; built with the other
// kernels). One pass over the answers for each task's first annotator, then a counting sort by
// it (stable: each annotator's tasks in task order). NumPy's form of the same (a minimum over
// each task's run of answers, then a radix sort of 16-bit keys) took 0.5-1.1 s at 30M answers.
#include <algorithm>
#include <cstdint>
#include <vector>

extern "C" {

// task, worker [A] (any order; 0 <= task < T, 0 <= worker < W); order [T] out: the tasks sorted.
void crowdllm_task_order(int64_t A, const int32_t* task, const int32_t* worker, int64_t T,
                         int64_t W, int64_t* order) {
  const int32_t none = (int32_t)W;  // no answer: after every annotator
  std::vector<int32_t> first(T, none);
  for (int64_t j = 0; j < A; ++j) first[task[j]] = std::min(first[task[j]], worker[j]);
  std::vector<int64_t> at(W + 2, 0);  // where each key's tasks start
  for (int64_t t = 0; t < T; ++t) ++at[first[t] + 1];
  for (int64_t k = 0; k <= W; ++k) at[k + 1] += at[k];
  for (int64_t t = 0; t < T; ++t) order[at[first[t]]++] = t;
}

}  // extern "C"

// A dense panel from the answers (_core.prepare, through _native.dense_fill): dense [T, W] int8,
// filled with -1 by the caller, gets label[j] at (task[j], worker[j]) for each answer in order (a
// repeated cell keeps its last answer, as NumPy's scatter does). Returns -1, or the first answer
// whose codes are out of range (written up to it). NumPy's scatter took 0.63 s for 120M answers.
extern "C" int64_t crowdllm_dense_fill(int64_t A, const int32_t* task, const int32_t* worker,
                                       const int32_t* label, int64_t T, int64_t W, int8_t* dense) {
  for (int64_t j = 0; j < A; ++j) {
    const int64_t t = task[j], w = worker[j];
    if ((uint64_t)t >= (uint64_t)T || (uint64_t)w >= (uint64_t)W) return j;
    dense[t * W + w] = (int8_t)label[j];
  }
  return -1;
}
