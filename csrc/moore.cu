// at::Tensor wrappers of the fused MoORE gate kernels (kernels/moore.cuh).
#include <ATen/ops/zeros.h>

#include "torch_glue.h"
#include "kernels/moore.cuh"

namespace mk::moore {
namespace {

constexpr const char* kFwd = "mokernels.experts_gate_gemm";
constexpr const char* kBwd = "mokernels.experts_gate_bwd";

struct Inputs {
  at::Tensor x, V, sigma, gx, Q, p;  // contiguous; gx/Q/p undefined when absent
};

// x [T, d_in], V [d_in, R], sigma [R], gx [T, d_s] + Q [d_s, R] (both or neither), p_task [R] | [T, R] | None;
// one dtype (fp16/bf16), one device.
Inputs check_inputs(const char* op, const at::Tensor& x, const at::Tensor& V, const at::Tensor& sigma,
                    const std::optional<at::Tensor>& gx, const std::optional<at::Tensor>& Q,
                    const std::optional<at::Tensor>& p) {
  check_device(op, "x", x, x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [T, d_in], got ", x.sizes());
  const int64_t T = x.size(0), d_in = x.size(1);
  check_device(op, "V", V, x);
  TORCH_CHECK_VALUE(V.dim() == 2 && V.size(0) == d_in, op, ": V must be [d_in, R] = [", d_in, ", R], got ", V.sizes());
  const int64_t R = V.size(1);
  check_device(op, "sigma", sigma, x);
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == R, op, ": sigma must be [R] = [", R, "], got ", sigma.sizes());
  dispatch_half(op, x.scalar_type(), [](auto) {});
  check_dtype(op, "V", V, x.scalar_type());
  check_dtype(op, "sigma", sigma, x.scalar_type());
  TORCH_CHECK_VALUE(gx.has_value() == Q.has_value(), op, ": gx and Q must both be given or both be None");
  Inputs in{x.contiguous(), V.contiguous(), sigma.contiguous(), {}, {}, {}};
  if (gx.has_value()) {
    check_device(op, "gx", *gx, x);
    check_device(op, "Q", *Q, x);
    TORCH_CHECK_VALUE(gx->dim() == 2 && gx->size(0) == T, op, ": gx must be [T, d_s] = [", T, ", d_s], got ",
                      gx->sizes());
    TORCH_CHECK_VALUE(Q->dim() == 2 && Q->size(0) == gx->size(1) && Q->size(1) == R, op, ": Q must be [d_s, R] = [",
                      gx->size(1), ", ", R, "], got ", Q->sizes());
    check_dtype(op, "gx", *gx, x.scalar_type());
    check_dtype(op, "Q", *Q, x.scalar_type());
    in.gx = gx->contiguous();
    in.Q = Q->contiguous();
  }
  if (p.has_value()) {
    check_device(op, "p_task", *p, x);
    TORCH_CHECK_VALUE((p->dim() == 1 && p->size(0) == R) || (p->dim() == 2 && p->size(0) == T && p->size(1) == R), op,
                      ": p_task must be [R] = [", R, "] or [T, R] = [", T, ", ", R, "], got ", p->sizes());
    check_dtype(op, "p_task", *p, x.scalar_type());
    in.p = p->contiguous();
  }
  TORCH_CHECK_VALUE(d_in <= INT32_MAX && R <= INT32_MAX && (!in.gx.defined() || in.gx.size(1) <= INT32_MAX), op,
                    ": d_in, R and d_s must fit in int32");
  TORCH_CHECK_VALUE(R == 0 || grid_blocks(T, static_cast<int>(R)) <= INT32_MAX, op, ": too many tokens (", T, ") for R = ",
                    R);
  return in;
}

template <class T>
Args<T> make_args(const Inputs& in, bool clip) {
  Args<T> a;
  a.x = ptr<T>(in.x);
  a.V = ptr<T>(in.V);
  a.sigma = ptr<T>(in.sigma);
  a.gx = in.gx.defined() ? ptr<T>(in.gx) : nullptr;
  a.Q = in.Q.defined() ? ptr<T>(in.Q) : nullptr;
  a.p = in.p.defined() ? ptr<T>(in.p) : nullptr;
  a.tokens = in.x.size(0);
  a.d_in = static_cast<int>(in.x.size(1));
  a.R = static_cast<int>(in.V.size(1));
  a.d_s = in.gx.defined() ? static_cast<int>(in.gx.size(1)) : 0;
  a.p_per_token = in.p.defined() && in.p.dim() == 2;
  a.clip = clip;
  return a;
}

at::Tensor gate_gemm(const at::Tensor& x, const at::Tensor& V, const at::Tensor& sigma,
                     const std::optional<at::Tensor>& gx, const std::optional<at::Tensor>& Q,
                     const std::optional<at::Tensor>& p_task, bool clip) {
  const Inputs in = check_inputs(kFwd, x, V, sigma, gx, Q, p_task);
  DeviceGuard guard(x);
  at::Tensor S = at::empty({in.x.size(0), in.V.size(1)}, in.x.options());
  if (S.numel() == 0) return S;
  dispatch_half(kFwd, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Args<T> a = make_args<T>(in, clip);
    a.S = ptr<T>(S);
    a.pairs = can_pair(a);
    const int sms = num_sms();
    a.ksplit = fwd_ksplit(a.tokens, a.R, a.d_in, sms);
    at::Tensor ws;
    if (a.ksplit > 1) {
      ws = at::empty({a.ksplit, a.tokens, a.R}, in.x.options().dtype(at::kFloat));
      a.ws = ptr<float>(ws);
    }
    check_launch(kFwd, launch_fwd<T>(a, sms, current_stream()));
  });
  return S;
}

// (dz, dg, dsigma): dz = dS ⊙ c, dg = dS ⊙ (x V) (clip: masked by c > 0), dsigma = Σ_t dg; one not asked for is an
// empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bwd(const at::Tensor& dS_in, const at::Tensor& x,
                                                        const at::Tensor& V, const at::Tensor& sigma,
                                                        const std::optional<at::Tensor>& gx,
                                                        const std::optional<at::Tensor>& Q,
                                                        const std::optional<at::Tensor>& p_task, bool clip,
                                                        bool need_dz, bool need_dg, bool need_dsigma) {
  const Inputs in = check_inputs(kBwd, x, V, sigma, gx, Q, p_task);
  check_device(kBwd, "dS", dS_in, x);
  const int64_t T_ = in.x.size(0), R = in.V.size(1);
  TORCH_CHECK_VALUE(dS_in.dim() == 2 && dS_in.size(0) == T_ && dS_in.size(1) == R, kBwd, ": dS must be [T, R] = [", T_,
                    ", ", R, "], got ", dS_in.sizes());
  check_dtype(kBwd, "dS", dS_in, x.scalar_type());
  DeviceGuard guard(x);
  const at::Tensor dS = dS_in.contiguous();
  const auto empty = [&] { return at::empty({0}, in.x.options()); };
  at::Tensor dz = need_dz ? at::empty({T_, R}, in.x.options()) : empty();
  at::Tensor dg = need_dg ? at::empty({T_, R}, in.x.options()) : empty();
  at::Tensor dsigma = need_dsigma ? at::zeros({R}, in.x.options()) : empty();
  if (T_ == 0 || R == 0 || !(need_dz || need_dg || need_dsigma)) return {dz, dg, dsigma};
  at::Tensor partial;
  if (need_dsigma) partial = at::empty({token_tiles(T_), R}, in.x.options().dtype(at::kFloat));
  dispatch_half(kBwd, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Args<T> a = make_args<T>(in, clip);
    a.dS = ptr<T>(dS);
    a.dz = need_dz ? ptr<T>(dz) : nullptr;
    a.dg = need_dg ? ptr<T>(dg) : nullptr;
    a.partial = need_dsigma ? ptr<float>(partial) : nullptr;
    a.pairs = can_pair(a);
    check_launch(kBwd, launch_bwd<T>(a, need_dsigma ? ptr<T>(dsigma) : nullptr, current_stream()));
  });
  return {dz, dg, dsigma};
}

}  // namespace
}  // namespace mk::moore

MK_REGISTER_IMPLS(m) {
  m.impl("experts_gate_gemm", &mk::moore::gate_gemm);
  m.impl("experts_gate_bwd", &mk::moore::gate_bwd);
}
