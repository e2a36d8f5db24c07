// Deliberately wrong kernels, registered only in the sanitizer build of the emulation module: the
// test suite runs them to prove that the sanitizer build catches each class of bug in kernel code
// (the CPU stand-in for compute-sanitizer):
//  * _planted_oob_read: sums each row of x [T, R] reading one element past the row, so the last row
//    reads one past the end of the allocation (ASan heap-buffer-overflow);
//  * _planted_int_overflow: an int32 index product that overflows (UBSan signed-integer-overflow,
//    only with -fno-wrapv after Python's -fwrapv);
//  * _planted_uninit_acc: a row sum whose accumulator is never initialised (with
//    -ftrivial-auto-var-init=pattern it starts as garbage, not as the fresh fiber stack's 0).
// Kept outside module.cpp's -Werror=maybe-uninitialized region (the third would not compile there).
#pragma once

#include "../torch_glue.h"

namespace mk::planted {

#if defined(__SANITIZE_ADDRESS__)
MK_GLOBAL void row_sum_one_past(const float* x, float* out, int64_t rows, int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float s = 0.f;
  for (int64_t c = 0; c <= cols; ++c) s += x[r * cols + c];  // BUG (planted): c <= cols
  out[r] = s;
}

// out[t] = (t * stride) % 8 with the product in int: t * stride >= 2^31 is undefined behaviour.
MK_GLOBAL void int32_index_overflow(float* out, int stride) {
  const int t = static_cast<int>(threadIdx.x);
  const int off = t * stride;  // BUG (planted): int32 product, overflows for large rows * stride
  out[t] = static_cast<float>(off % 8);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
MK_GLOBAL void row_sum_uninit(const float* x, float* out, int64_t rows, int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float s;  // BUG (planted): the neutral value 0 is missing
  for (int64_t c = 0; c < cols; ++c) s += x[r * cols + c];
  out[r] = s;
}
#pragma GCC diagnostic pop

inline at::Tensor planted_int_overflow(const at::Tensor& x) {
  at::Tensor out = at::empty({4}, x.options().dtype(at::kFloat));
  auto kernel = int32_index_overflow;
  MK_LAUNCH(kernel, dim3(1), dim3(4), 0, nullptr, ptr<float>(out), 1 << 30);
  return out;
}

// out[r] = kernel's sum of row r of x [T, R] (one thread per row, 32-thread blocks).
template <class Kernel> at::Tensor launch_row_sums(Kernel kernel, const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  at::Tensor out = at::empty({x.size(0)}, x.options());
  MK_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(x.size(0), 32))), dim3(32), 0, nullptr, ptr<float>(x),
            ptr<float>(out), x.size(0), x.size(1));
  return out;
}
inline at::Tensor planted_uninit(const at::Tensor& x) { return launch_row_sums(row_sum_uninit, x); }
inline at::Tensor planted_oob(const at::Tensor& x) { return launch_row_sums(row_sum_one_past, x); }

inline void define(torch::Library& m) {
  m.def("_planted_oob_read(Tensor x) -> Tensor");
  m.impl("_planted_oob_read", c10::DispatchKey::CPU, TORCH_FN(planted_oob));
  m.def("_planted_int_overflow(Tensor x) -> Tensor");
  m.impl("_planted_int_overflow", c10::DispatchKey::CPU, TORCH_FN(planted_int_overflow));
  m.def("_planted_uninit_acc(Tensor x) -> Tensor");
  m.impl("_planted_uninit_acc", c10::DispatchKey::CPU, TORCH_FN(planted_uninit));
}
#else
inline void define(torch::Library&) {}
#endif

}  // namespace mk::planted
