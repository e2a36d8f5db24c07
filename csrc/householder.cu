// at::Tensor wrapper of the Householder chain kernels (kernels/householder.cuh).
#include <limits>

#include <ATen/ops/zeros.h>

#include "torch_glue.h"
#include "kernels/householder.cuh"

namespace mk::householder {
namespace {

constexpr const char* kOp = "mokernels.householder_apply";

// (out [..., D], s [N, L] acc dtype or an empty [0]) = (x Hᵀ or x H, the normalised projections x Yᵀ).
std::tuple<at::Tensor, at::Tensor> apply(const at::Tensor& x_in, const at::Tensor& U_in, bool transpose, double eps,
                                         bool return_s) {
  check_device(kOp, "x", x_in, x_in);
  check_device(kOp, "U", U_in, x_in);
  TORCH_CHECK_VALUE(x_in.dim() >= 1, kOp, ": x must be [..., D], got a 0-d tensor");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK_VALUE(U_in.dim() == 2 && U_in.size(1) == D, kOp, ": U must be [L, D] = [L, ", D, "], got ",
                    U_in.sizes());
  check_dtype(kOp, "U", U_in, x_in.scalar_type());
  const int64_t L = U_in.size(0);
  TORCH_CHECK_VALUE(L <= kMaxL, kOp, ": the fused kernel takes L <= ", kMaxL, " reflections, got ", L,
                    " (mokernels.ops.householder_apply runs longer chains in blocks of <= 64)");
  TORCH_CHECK_VALUE(D <= std::numeric_limits<int>::max() / 2, kOp, ": D = ", D, " is too large");
  TORCH_CHECK_VALUE(eps > 0, kOp, ": eps must be positive, got ", eps);
  DeviceGuard guard(x_in);
  const at::Tensor x = x_in.contiguous(), U = U_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor s = at::empty({return_s ? N : 0, return_s ? L : 0}, x.options().dtype(acc));
  if (x.numel() == 0) return {out, s};
  if (L == 0) {
    out.copy_(x);
    return {out, s};
  }
  at::Tensor ws = at::empty({workspace_elems(static_cast<int>(L))}, x.options().dtype(acc));
  dispatch_float(kOp, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    check_launch(kOp, launch_wy<T>(ptr<T>(U), ptr<A>(ws), static_cast<int>(L), static_cast<int>(D), eps,
                                   current_stream()));
    check_launch(kOp, launch_apply<T>(ptr<T>(x), ptr<T>(U), ptr<A>(ws), ptr<T>(out), return_s ? ptr<A>(s) : nullptr,
                                      N, static_cast<int>(D), static_cast<int>(L), transpose, num_sms(),
                                      current_stream()));
  });
  return {out, s};
}

constexpr const char* kOpDy = "mokernels.householder_grad_y";

// Z = alpha^T g + beta^T x [L, D] (accumulator dtype): the fused dU reduction of the backward (kernels/householder.cuh).
at::Tensor grad_y(const at::Tensor& alpha_in, const at::Tensor& beta_in, const at::Tensor& g_in,
                  const at::Tensor& x_in) {
  check_device(kOpDy, "x", x_in, x_in);
  check_device(kOpDy, "g", g_in, x_in);
  check_device(kOpDy, "alpha", alpha_in, x_in);
  check_device(kOpDy, "beta", beta_in, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2, kOpDy, ": x must be [N, D], got ", x_in.sizes());
  const int64_t N = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK_VALUE(g_in.sizes() == x_in.sizes(), kOpDy, ": g must be [N, D] = ", x_in.sizes(), ", got ",
                    g_in.sizes());
  check_dtype(kOpDy, "g", g_in, x_in.scalar_type());
  TORCH_CHECK_VALUE(alpha_in.dim() == 2 && alpha_in.size(0) == N, kOpDy, ": alpha must be [N, L] with N = ", N,
                    ", got ", alpha_in.sizes());
  const int64_t L = alpha_in.size(1);
  TORCH_CHECK_VALUE(beta_in.sizes() == alpha_in.sizes(), kOpDy, ": beta must be [N, L] = ", alpha_in.sizes(),
                    ", got ", beta_in.sizes());
  TORCH_CHECK_VALUE(L <= kMaxL, kOpDy, ": L <= ", kMaxL, " reflections, got ", L);
  TORCH_CHECK_VALUE(D <= std::numeric_limits<int>::max() / 2, kOpDy, ": D = ", D, " is too large");
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_dtype(kOpDy, "alpha", alpha_in, acc);
  check_dtype(kOpDy, "beta", beta_in, acc);
  DeviceGuard guard(x_in);
  at::Tensor Z = at::zeros({L, D}, x_in.options().dtype(acc));
  if (N == 0 || L == 0 || D == 0) return Z;
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), alpha = alpha_in.contiguous(),
                   beta = beta_in.contiguous();
  dispatch_float(kOpDy, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int S = dy_splits(N, static_cast<int>(D), static_cast<int>(L), static_cast<int>(sizeof(T)));
    at::Tensor part = at::empty({S > 1 ? S * L * D : 0}, x.options().dtype(acc));
    check_launch(kOpDy, launch_dy<T>(ptr<A>(alpha), ptr<A>(beta), ptr<T>(g), ptr<T>(x), S > 1 ? ptr<A>(part) : nullptr,
                                     ptr<A>(Z), N, static_cast<int>(D), static_cast<int>(L), S, current_stream()));
  });
  return Z;
}

}  // namespace
}  // namespace mk::householder

MK_REGISTER_IMPLS(m) {
  m.impl("householder_apply", &mk::householder::apply);
  m.impl("householder_grad_y", &mk::householder::grad_y);
}
