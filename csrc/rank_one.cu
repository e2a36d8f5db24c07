// at::Tensor wrappers of the rank-one scaling kernels (kernels/rank_one.cuh).
#include "torch_glue.h"
#include "kernels/rank_one.cuh"

namespace mk::rank_one {
namespace {

constexpr const char* kOp = "mokernels.rank_one_scale";

// z, g: [..., R] of one float dtype, sigma: [R] of the same dtype, all on one device.
void check_inputs(const at::Tensor& z, const at::Tensor& sigma, const at::Tensor& g) {
  check_device(kOp, "z", z, z);
  check_device(kOp, "sigma", sigma, z);
  check_device(kOp, "g", g, z);
  TORCH_CHECK_VALUE(z.dim() >= 1, kOp, ": z must be [..., R], got a 0-d tensor");
  const int64_t R = z.size(-1);
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == R, kOp, ": sigma must be [R] = [", R, "], got ", sigma.sizes());
  TORCH_CHECK_VALUE(g.sizes() == z.sizes(), kOp, ": g must have z's shape ", z.sizes(), ", got ", g.sizes());
  check_dtype(kOp, "sigma", sigma, z.scalar_type());
  check_dtype(kOp, "g", g, z.scalar_type());
}

at::Tensor scale(const at::Tensor& z_in, const at::Tensor& sigma_in, const at::Tensor& g_in) {
  check_inputs(z_in, sigma_in, g_in);
  DeviceGuard guard(z_in);
  const at::Tensor z = z_in.contiguous(), sigma = sigma_in.contiguous(), g = g_in.contiguous();
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (z.numel() == 0) return out;
  const int64_t cols = z.size(-1), rows = z.numel() / cols;
  dispatch_float(kOp, z.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(kOp, launch_fwd<T>(ptr<T>(z), ptr<T>(sigma), ptr<T>(g), ptr<T>(out), rows, cols, num_sms(),
                                    current_stream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_backward(const at::Tensor& grad_in, const at::Tensor& z_in,
                                                             const at::Tensor& sigma_in, const at::Tensor& g_in) {
  check_inputs(z_in, sigma_in, g_in);
  check_device(kOp, "grad", grad_in, z_in);
  TORCH_CHECK_VALUE(grad_in.sizes() == z_in.sizes(), kOp, ": grad must have z's shape ", z_in.sizes(), ", got ",
              grad_in.sizes());
  check_dtype(kOp, "grad", grad_in, z_in.scalar_type());
  DeviceGuard guard(z_in);
  const at::Tensor grad = grad_in.contiguous(), z = z_in.contiguous(), sigma = sigma_in.contiguous(),
                   g = g_in.contiguous();
  at::Tensor dz = at::empty_like(z, at::MemoryFormat::Contiguous);
  at::Tensor dg = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (z.numel() == 0) return {dz, at::zeros_like(sigma), dg};
  at::Tensor dsigma = at::empty_like(sigma, at::MemoryFormat::Contiguous);
  const int64_t cols = z.size(-1), rows = z.numel() / cols;
  dispatch_float(kOp, z.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Plan plan = plan_bwd<T>(ptr<T>(grad), ptr<T>(z), ptr<T>(sigma), ptr<T>(g), ptr<T>(dz), ptr<T>(dg), rows,
                                  cols, num_sms());
    const auto acc_dtype = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
    at::Tensor partial = at::empty({plan.partial_rows, cols}, z.options().dtype(acc_dtype));
    check_launch(kOp, launch_bwd<T>(plan, ptr<T>(grad), ptr<T>(z), ptr<T>(sigma), ptr<T>(g), ptr<T>(dz),
                                    ptr<T>(dg), ptr<acc_t<T>>(partial), ptr<T>(dsigma), rows, cols,
                                    current_stream()));
  });
  return {dz, dsigma, dg};
}

}  // namespace
}  // namespace mk::rank_one

MK_REGISTER_IMPLS(m) {
  m.impl("rank_one_scale", &mk::rank_one::scale);
  m.impl("rank_one_scale_backward", &mk::rank_one::scale_backward);
}
