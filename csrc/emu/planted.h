// A deliberately wrong kernel, registered only in the sanitizer build of the emulation module:
// the test suite runs it to prove that an out-of-bounds access in kernel code fails CI there
// (the CPU stand-in for compute-sanitizer). It sums each row of x [T, R] reading one element past
// the row, so the last row reads one past the end of the allocation.
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

inline at::Tensor planted_oob(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  at::Tensor out = at::empty({x.size(0)}, x.options());
  auto kernel = row_sum_one_past;
  MK_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(x.size(0), 32))), dim3(32), 0, nullptr, ptr<float>(x),
            ptr<float>(out), x.size(0), x.size(1));
  return out;
}

inline void define(torch::Library& m) {
  m.def("_planted_oob_read(Tensor x) -> Tensor");
  m.impl("_planted_oob_read", c10::DispatchKey::CPU, TORCH_FN(planted_oob));
}
#else
inline void define(torch::Library&) {}
#endif

}  // namespace mk::planted
