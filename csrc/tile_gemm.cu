// at::Tensor wrapper of the tensor-core test GEMM (kernels/tile_gemm.cuh).
#include "torch_glue.h"
#include "kernels/tile_gemm.cuh"

namespace mk::tile_gemm {
namespace {

constexpr const char* kOp = "mokernels._tile_gemm";

at::Tensor tile_gemm(const at::Tensor& a_in, const at::Tensor& b_in, bool b_kn) {
  check_device(kOp, "a", a_in, a_in);
  check_device(kOp, "b", b_in, a_in);
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2, kOp, ": a and b must be 2-D, got ", a_in.sizes(), " and ",
              b_in.sizes());
  check_dtype(kOp, "b", b_in, a_in.scalar_type());
  const int64_t M = a_in.size(0), K = a_in.size(1);
  const int64_t N = b_kn ? b_in.size(1) : b_in.size(0);
  TORCH_CHECK_VALUE((b_kn ? b_in.size(0) : b_in.size(1)) == K, kOp, ": b must be ", (b_kn ? "[K, N]" : "[N, K]"),
              " with K = ", K, ", got ", b_in.sizes());
  TORCH_CHECK_VALUE(ceil_div(M, kTile) <= 65535 && N <= INT32_MAX && K <= INT32_MAX, kOp, ": problem too large");
  DeviceGuard guard(a_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return c;
  if (K == 0) return c.zero_();
  dispatch_half(kOp, a.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(kOp, launch<T>(ptr<T>(a), ptr<T>(b), ptr<float>(c), static_cast<int>(M), static_cast<int>(N),
                                static_cast<int>(K), b_kn, current_stream()));
  });
  return c;
}

}  // namespace
}  // namespace mk::tile_gemm

MK_REGISTER_IMPLS(m) { m.impl("_tile_gemm", &mk::tile_gemm::tile_gemm); }
