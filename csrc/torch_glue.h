// What every at::Tensor wrapper (csrc/<family>.cu) needs, for both of its builds:
//  * the CUDA build (nvcc, registered as the CUDA kernels of the `mokernels` ops), and
//  * the emulation build (g++ with MOKERNELS_EMULATION, included by csrc/emu/module.cpp and
//    registered as CPU kernels of the `mokernels_emu` ops, running the same kernel source on CPU).
#pragma once

#include <cstdlib>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <type_traits>

#include "kernels/common/platform.cuh"

#if defined(MOKERNELS_EMULATION)
#define MK_REGISTER_IMPLS(m) TORCH_LIBRARY_IMPL(mokernels_emu, CPU, m)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define MK_REGISTER_IMPLS(m) TORCH_LIBRARY_IMPL(mokernels, CUDA, m)
#endif

namespace mk {

#if defined(MOKERNELS_EMULATION)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
constexpr const char* kKernelDeviceName = "CPU (emulated kernel)";
inline cudaStream_t current_stream() { return nullptr; }
// A small fixed "GPU" of 2 SMs: emulated grids are deterministic, and modest test shapes already
// exercise multi-block grids and the grid-stride loops. MOKERNELS_EMU_NUM_SMS overrides it (read per
// call), so tests can check that results do not depend on the SM count.
inline int num_sms() {
  const char* s = std::getenv("MOKERNELS_EMU_NUM_SMS");
  const int v = (s != nullptr && *s != '\0') ? std::atoi(s) : 2;
  return v >= 1 ? v : 2;
}
struct DeviceGuard { explicit DeviceGuard(const at::Tensor&) {} };
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
constexpr const char* kKernelDeviceName = "CUDA";
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
};
#endif

// `t` lives on the kernel's device and on the same device as `ref`.
inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device().type() == kKernelDevice, op, ": ", name, " must be a ", kKernelDeviceName,
              " tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
              ref.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_launch(const char* op, cudaError_t err) {
#if defined(MOKERNELS_EMULATION)
  (void)op;
  (void)err;  // emulated launches throw on failure
#else
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
#endif
}

template <class T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the kernel-side element type of `st`
// (float, double, __half, __nv_bfloat16); other dtypes are an error naming the op.
template <class F>
void dispatch_float(const char* op, c10::ScalarType st, F&& f) {
  switch (st) {
    case c10::ScalarType::Float: return f(TypeTag<float>{});
    case c10::ScalarType::Double: return f(TypeTag<double>{});
    case c10::ScalarType::Half: return f(TypeTag<__half>{});
    case c10::ScalarType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st, " (expected float16, bfloat16, float32 or float64)");
  }
}

// As dispatch_float, tensor-core operand types only.
template <class F>
void dispatch_half(const char* op, c10::ScalarType st, F&& f) {
  switch (st) {
    case c10::ScalarType::Half: return f(TypeTag<__half>{});
    case c10::ScalarType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st, " (expected float16 or bfloat16)");
  }
}

template <class T> T* ptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <class T> const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

}  // namespace mk
