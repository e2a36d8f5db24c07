// at::Tensor wrappers of the multi-adapter LoRA backward kernels (kernels/lora_bwd.cuh): the
// backward of lora_apply / lora_shared_apply on CUDA (mokernels/ops/lora.py; CPU runs the reference).
// Every shape, dtype and device is checked (the ops are public through torch.ops), never the metadata
// values: invalid ids and tokens outside every segment are "no adapter", as in the forward.
#include <optional>
#include <tuple>

#include "torch_glue.h"
#include "kernels/lora_bwd.cuh"
#include "lora_wrapper.h"

namespace mk::lora_bwd {
namespace {

constexpr const char* kBwd = "mokernels.lora_apply_backward";
constexpr const char* kSharedBwd = "mokernels.lora_shared_apply_backward";

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using lora::wrap::has;

// dx [T, d_in] (x's dtype), dA (A's shape), dB (B's shape), dw [R, k] (fp32 / fp64); an unneeded one is
// an empty [0] tensor.
Grads run(const char* op, const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
          const std::optional<at::Tensor>& scale_in, double scale_value, const std::optional<at::Tensor>& ids_in,
          const std::optional<at::Tensor>& w_in, const std::optional<at::Tensor>& off_in, bool shared_a, bool need_dx,
          bool need_dA, bool need_dB, bool need_dw) {
  check_device(op, "x", x_in, x_in);
  check_device(op, "A", A_in, x_in);
  check_device(op, "B", B_in, x_in);
  check_device(op, "grad", g_in, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be [T, d_in], got ", x_in.sizes());
  const int64_t T = x_in.size(0), d_in = x_in.size(1);
  TORCH_CHECK_VALUE(A_in.dim() == (shared_a ? 2 : 3) && A_in.size(-1) == d_in, op, ": A must be ",
                    shared_a ? "[r, d_in]" : "[N, r, d_in]", " with d_in = ", d_in, ", got ", A_in.sizes());
  const int64_t r = A_in.size(shared_a ? 0 : 1);
  TORCH_CHECK_VALUE(B_in.dim() == 3 && B_in.size(2) == r && (shared_a || B_in.size(0) == A_in.size(0)), op,
                    ": B must be [N, d_out, r] with r = ", r, shared_a ? "" : " and A's N", ", got ", B_in.sizes());
  const int64_t N = B_in.size(0), d_out = B_in.size(1);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxRank, op, ": rank r must be in [1, ", kMaxRank, "], got ", r);
  TORCH_CHECK_VALUE(g_in.dim() == 2 && g_in.size(0) == T && g_in.size(1) == d_out, op, ": grad must be [T, d_out] = [",
                    T, ", ", d_out, "], got ", g_in.sizes());
  const auto dt = x_in.scalar_type(), acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  check_dtype(op, "A", A_in, dt);
  check_dtype(op, "B", B_in, dt);
  check_dtype(op, "grad", g_in, dt);
  const lora::wrap::RoutingDims rd = lora::wrap::check_routing(op, x_in, T, N, acc, scale_in, ids_in, w_in, off_in);
  const int64_t R = rd.R, S = rd.S, k = rd.k;
  TORCH_CHECK_VALUE(d_in <= INT32_MAX && d_out <= INT32_MAX && N <= INT32_MAX && T * std::max<int64_t>(k, 1) <= INT32_MAX,
                    op, ": sizes must fit in int32 (T * k pairs included)");
  const size_t tail = dt == at::kDouble ? token_tail_bytes<double>(static_cast<int>(r), static_cast<int>(k), shared_a)
                                        : token_tail_bytes<float>(static_cast<int>(r), static_cast<int>(k), shared_a);
  TORCH_CHECK_VALUE(tail <= kMaxSmem, op, ": k = ", k, " adapter slots of rank ", r,
                    " need more shared memory than the backward kernel has");
  need_dw = need_dw && has(w_in);

  const auto empty0 = [&](at::ScalarType t) { return at::empty({0}, x_in.options().dtype(t)); };
  at::Tensor dx = need_dx ? at::empty({T, d_in}, x_in.options()) : empty0(dt);
  at::Tensor dA = need_dA ? at::empty(A_in.sizes(), A_in.options().memory_format(at::MemoryFormat::Contiguous)) : empty0(dt);
  at::Tensor dB = need_dB ? at::empty(B_in.sizes(), B_in.options().memory_format(at::MemoryFormat::Contiguous)) : empty0(dt);
  at::Tensor dw = need_dw ? at::empty({R, k}, x_in.options().dtype(acc)) : empty0(acc);
  if (T == 0 || k == 0) {
    if (need_dx) dx.zero_();
    if (need_dA) dA.zero_();
    if (need_dB) dB.zero_();
    if (need_dw) dw.zero_();
    return {dx, dA, dB, dw};
  }
  DeviceGuard guard(x_in);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(), g = g_in.contiguous();
  const at::Tensor scale = scale_in ? scale_in->contiguous() : at::Tensor();
  const at::Tensor ids = has(ids_in) ? ids_in->contiguous() : at::Tensor();
  const at::Tensor w = has(w_in) ? w_in->contiguous() : at::Tensor();
  const at::Tensor off = has(off_in) ? off_in->contiguous() : at::Tensor();
  const bool sort = (need_dA && !shared_a) || need_dB;
  const int64_t P = T * k;
  const auto iopt = x.options().dtype(at::kInt);
  at::Tensor pair_id = sort ? at::empty({P}, iopt) : at::Tensor();
  at::Tensor gu = need_dA ? at::empty({shared_a ? T : P, r}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor gh = need_dB ? at::empty({P, r}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dw_tok = need_dw ? (has(off_in) ? at::empty({T, k}, x.options().dtype(acc)) : dw) : at::Tensor();
  const cudaStream_t stream = current_stream();

  dispatch_float(op, dt, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    using Acc = acc_t<T_>;
    Args<T_> a{};
    a.x = ptr<T_>(x);
    a.A = ptr<T_>(A);
    a.B = ptr<T_>(B);
    a.dy = ptr<T_>(g);
    a.scale = scale.defined() ? ptr<Acc>(scale) : nullptr;
    a.scale_value = static_cast<Acc>(scale_value);
    a.ids = ids.defined() ? ptr<int32_t>(ids) : nullptr;
    a.weights = w.defined() ? ptr<Acc>(w) : nullptr;
    a.offsets = off.defined() ? ptr<int32_t>(off) : nullptr;
    a.dx = need_dx ? ptr<T_>(dx) : nullptr;
    a.dw_tok = need_dw ? ptr<Acc>(dw_tok) : nullptr;
    a.gu = need_dA ? ptr<Acc>(gu) : nullptr;
    a.gh = need_dB ? ptr<Acc>(gh) : nullptr;
    a.pair_id = sort ? ptr<int32_t>(pair_id) : nullptr;
    a.tokens = T;
    a.d_in = static_cast<int>(d_in);
    a.d_out = static_cast<int>(d_out);
    a.r = static_cast<int>(r);
    a.N = static_cast<int>(N);
    a.k = static_cast<int>(k);
    a.segs = static_cast<int>(S);
    a.shared_a = shared_a;
    a.dy_bytes = staged_dy_bytes<T_>(a.d_out, a.r, a.k, shared_a);
    check_launch(op, launch_token<T_>(a, stream));

    at::Tensor counts, starts, list;
    if (sort && N > 0) {
      counts = at::empty({N}, iopt);
      starts = at::empty({N + 1}, iopt);
      list = at::empty({P}, iopt);
      check_launch(op, launch_sort(ptr<int32_t>(pair_id), P, static_cast<int>(N), ptr<int32_t>(counts),
                                   ptr<int32_t>(starts), ptr<int32_t>(list), stream));
    }
    if (need_dA && d_in > 0 && (shared_a || N > 0)) {
      RedArgs<T_> ra{ptr<Acc>(gu), ptr<T_>(x), shared_a ? nullptr : ptr<int32_t>(list),
                     shared_a ? nullptr : ptr<int32_t>(starts), shared_a ? T : P, shared_a ? 1 : a.k, a.r, a.d_in,
                     ptr<T_>(dA)};
      check_launch(op, launch_reduce<T_, true>(ra, shared_a ? 1 : a.N, stream));
    } else if (need_dA) {
      dA.zero_();
    }
    if (need_dB && d_out > 0 && N > 0) {
      RedArgs<T_> rb{ptr<Acc>(gh), ptr<T_>(g), ptr<int32_t>(list), ptr<int32_t>(starts), P, a.k, a.r, a.d_out,
                     ptr<T_>(dB)};
      check_launch(op, launch_reduce<T_, false>(rb, a.N, stream));
    }
    if (need_dw && has(off_in))
      check_launch(op, launch_seg_dw<Acc>(ptr<Acc>(dw_tok), a.offsets, a.segs, T, a.k, ptr<Acc>(dw), stream));
  });
  return {dx, dA, dB, dw};
}

Grads lora_apply_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& scale, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                          const std::optional<at::Tensor>& offsets, bool need_dx, bool need_dA, bool need_dB,
                          bool need_dw) {
  return run(kBwd, grad, x, A, B, scale, 0.0, ids, weights, offsets, false, need_dx, need_dA, need_dB, need_dw);
}

Grads lora_shared_apply_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                 double scale, const std::optional<at::Tensor>& ids, const at::Tensor& weights,
                                 bool need_dx, bool need_dA, bool need_dB, bool need_dw) {
  if (!has(ids)) {
    TORCH_CHECK_VALUE(B.dim() == 3 && weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == B.size(0),
                      kSharedBwd, ": dense weights must be [T, N], got ", weights.sizes());
  }
  return run(kSharedBwd, grad, x, A, B, std::nullopt, scale, ids, weights, std::nullopt, true, need_dx, need_dA,
             need_dB, need_dw);
}

}  // namespace
}  // namespace mk::lora_bwd

MK_REGISTER_IMPLS(m) {
  m.impl("lora_apply_backward", &mk::lora_bwd::lora_apply_backward);
  m.impl("lora_shared_apply_backward", &mk::lora_bwd::lora_shared_apply_backward);
}
