// at::Tensor wrappers of the multi-adapter LoRA kernels (kernels/lora.cuh). The Python layer
// (mokernels/ops/lora.py) turns the five routing forms into these canonical arguments and validates
// the metadata in eager mode; here every shape, dtype and device is checked again (the ops are public
// through torch.ops), never the metadata values: the kernel treats invalid ids as "no adapter".
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include <ATen/MemoryOverlap.h>

#include "torch_glue.h"
#include "kernels/lora.cuh"
#include "kernels/lora_prefill.cuh"
#include "kernels/lora_fused_w.cuh"

namespace mk::lora {
namespace {

constexpr const char* kApply = "mokernels.lora_apply";
constexpr const char* kApplyInplace = "mokernels.lora_apply_";
constexpr const char* kShared = "mokernels.lora_shared_apply";
constexpr const char* kLinear = "mokernels.lora_linear";

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Kernel choice: MOKERNELS_LORA_PATH = auto (default: the tensor-core prefill kernel when it can run and
// the segments average >= 32 tokens, else the SIMT decode kernel) | decode | prefill (forced: an error
// where the prefill kernel cannot run these arguments, so tests know which kernel ran). Host values only
// (T, S): no sync.
template <class T>
bool use_prefill(const char* op, const Args<T>& a) {
  const char* env = std::getenv("MOKERNELS_LORA_PATH");
  const std::string mode = env != nullptr ? env : "";
  const char* why = prefill_unsupported(a);
  if (mode == "prefill") {
    TORCH_CHECK_VALUE(why == nullptr, op, ": MOKERNELS_LORA_PATH=prefill but ", why);
    return true;
  }
  if (mode == "decode") return false;
  TORCH_CHECK_VALUE(mode.empty() || mode == "auto", op, ": MOKERNELS_LORA_PATH must be auto, decode or prefill, got '",
                    mode, "'");
  return why == nullptr && a.tokens >= static_cast<int64_t>(prefill::kMinTokensPerSegment) * a.segs;
}

// Checks every argument, fills Args<T> and calls launch_fn(a) (a generic lambda: T = the kernel's
// element type). scale: [N] tensor (per adapter) or nullopt (scale_value).
template <class LaunchFn>
void run_with(LaunchFn&& launch_fn, const char* op, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
         const std::optional<at::Tensor>& scale_in, double scale_value, const std::optional<at::Tensor>& ids_in,
         const std::optional<at::Tensor>& w_in, const std::optional<at::Tensor>& off_in,
         const std::optional<at::Tensor>& base_in, at::Tensor& y, bool shared_a, bool accumulate) {
  check_device(op, "x", x_in, x_in);
  check_device(op, "A", A_in, x_in);
  check_device(op, "B", B_in, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be [T, d_in], got ", x_in.sizes());
  const int64_t T = x_in.size(0), d_in = x_in.size(1);
  if (shared_a) {
    TORCH_CHECK_VALUE(A_in.dim() == 2 && A_in.size(1) == d_in, op, ": A must be [r, d_in] with d_in = ", d_in,
                      ", got ", A_in.sizes());
  } else {
    TORCH_CHECK_VALUE(A_in.dim() == 3 && A_in.size(2) == d_in, op, ": A must be [N, r, d_in] with d_in = ", d_in,
                      ", got ", A_in.sizes());
  }
  const int64_t r = A_in.size(shared_a ? 0 : 1);
  TORCH_CHECK_VALUE(B_in.dim() == 3 && B_in.size(2) == r && (shared_a || B_in.size(0) == A_in.size(0)), op,
                    ": B must be [N, d_out, r] with r = ", r, shared_a ? "" : " and A's N", ", got ", B_in.sizes());
  const int64_t N = B_in.size(0), d_out = B_in.size(1);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxRank, op, ": rank r must be in [1, ", kMaxRank, "], got ", r);
  TORCH_CHECK_VALUE(d_in <= INT32_MAX && d_out <= INT32_MAX && N <= INT32_MAX && T <= INT32_MAX, op,
                    ": sizes must fit in int32");
  const auto dt = x_in.scalar_type(), acc = acc_type(dt);
  check_dtype(op, "A", A_in, dt);
  check_dtype(op, "B", B_in, dt);
  if (scale_in) {
    check_device(op, "scale", *scale_in, x_in);
    TORCH_CHECK_VALUE(scale_in->dim() == 1 && scale_in->size(0) == N, op, ": scale must be [N] = [", N, "], got ",
                      scale_in->sizes());
    check_dtype(op, "scale", *scale_in, acc);
  }
  int64_t R = T, S = 0, k = N;  // rows of the routing metadata; slots per row
  if (has(off_in)) {
    check_device(op, "offsets", *off_in, x_in);
    TORCH_CHECK_VALUE(off_in->dim() == 1 && off_in->size(0) >= 1, op, ": offsets must be [S+1], got ", off_in->sizes());
    check_dtype(op, "offsets", *off_in, at::kInt);
    R = S = off_in->size(0) - 1;
  }
  if (has(ids_in)) {
    check_device(op, "ids", *ids_in, x_in);
    TORCH_CHECK_VALUE(ids_in->dim() == 2 && ids_in->size(0) == R, op, ": ids must be [R, k] with R = ", R,
                      has(off_in) ? " segments" : " tokens", ", got ", ids_in->sizes());
    check_dtype(op, "ids", *ids_in, at::kInt);
    k = ids_in->size(1);
  }
  if (has(w_in)) {
    check_device(op, "weights", *w_in, x_in);
    TORCH_CHECK_VALUE(w_in->dim() == 2 && w_in->size(0) == R && w_in->size(1) == k, op, ": weights must be [",
                      R, ", ", k, "], got ", w_in->sizes());
    check_dtype(op, "weights", *w_in, acc);
  }
  TORCH_CHECK_VALUE(k <= INT32_MAX / (r + 2), op, ": too many adapter slots per token (k = ", k, ")");
  if (has(base_in)) {
    check_device(op, accumulate ? "out" : "base_out", *base_in, x_in);
    TORCH_CHECK_VALUE(base_in->dim() == 2 && base_in->size(0) == T && base_in->size(1) == d_out, op,
                      accumulate ? ": out" : ": base_out", " must be [T, d_out] = [", T, ", ", d_out, "], got ",
                      base_in->sizes());
    check_dtype(op, accumulate ? "out" : "base_out", *base_in, dt);
  }
  const int k32 = static_cast<int>(k), r32 = static_cast<int>(r);
  dispatch_float(op, dt, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    const size_t tail = smem_tail_bytes<T_>(r32, k32, shared_a);
    TORCH_CHECK_VALUE(tail <= kMaxSmem, op, ": k = ", k, " adapter slots of rank ", r,
                      " need more shared memory than the kernel has (k * (r + 2) * 4 bytes <= ", kMaxSmem, ")");
  });
  if (T == 0 || d_out == 0) return;
  DeviceGuard guard(x_in);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const at::Tensor scale = scale_in ? scale_in->contiguous() : at::Tensor();
  const at::Tensor ids = has(ids_in) ? ids_in->contiguous() : at::Tensor();
  const at::Tensor w = has(w_in) ? w_in->contiguous() : at::Tensor();
  const at::Tensor off = has(off_in) ? off_in->contiguous() : at::Tensor();
  const at::Tensor base = (has(base_in) && !accumulate) ? base_in->contiguous() : at::Tensor();
  dispatch_float(op, dt, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    using Acc = acc_t<T_>;
    Args<T_> a{};
    a.x = ptr<T_>(x);
    a.A = ptr<T_>(A);
    a.B = ptr<T_>(B);
    a.scale = scale.defined() ? ptr<Acc>(scale) : nullptr;
    a.scale_value = static_cast<Acc>(scale_value);
    a.ids = ids.defined() ? ptr<int32_t>(ids) : nullptr;
    a.weights = w.defined() ? ptr<Acc>(w) : nullptr;
    a.offsets = off.defined() ? ptr<int32_t>(off) : nullptr;
    a.base = base.defined() ? ptr<T_>(base) : nullptr;
    a.y = ptr<T_>(y);
    a.tokens = T;
    a.d_in = static_cast<int>(d_in);
    a.d_out = static_cast<int>(d_out);
    a.r = r32;
    a.N = static_cast<int>(N);
    a.k = k32;
    a.segs = static_cast<int>(S);
    a.shared_a = shared_a;
    a.accumulate = accumulate;
    a.x_bytes = staged_x_bytes<T_>(a.d_in, r32, k32, shared_a);
    launch_fn(a);
  });
}

// The lora_apply family: the automatic decode/prefill switch.
void run(const char* op, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
         const std::optional<at::Tensor>& scale_in, double scale_value, const std::optional<at::Tensor>& ids_in,
         const std::optional<at::Tensor>& w_in, const std::optional<at::Tensor>& off_in,
         const std::optional<at::Tensor>& base_in, at::Tensor& y, bool shared_a, bool accumulate) {
  run_with(
      [&](auto& a) {
        using T_ = std::remove_cv_t<std::remove_reference_t<decltype(*a.x)>>;
        if (use_prefill(op, a)) {  // split-K shrink -> fp32 partials [ksplit, T, k·r16] -> expand
          PrefillArgs<T_> p{};
          p.l = a;
          p.ksplit = prefill_ksplit(a.tokens, a.segs, a.d_in, num_sms());
          p.kh = static_cast<int>(a.k * ceil_div(a.r, 16) * 16);
          at::Tensor buf = at::empty({static_cast<int64_t>(prefill_workspace_bytes(a.tokens, a.k, a.r, p.ksplit))},
                                     x_in.options().dtype(at::kByte));
          p.hp = reinterpret_cast<float*>(buf.data_ptr());
          check_launch(op, launch_prefill<T_>(p, num_sms(), current_stream()));
        } else if (a.shared_a) {  // h once per token: the fused SIMT kernel
          check_launch(op, launch<T_>(a, num_sms(), current_stream()));
        } else {  // shrink -> tiny workspace -> expand (lora.cuh "Split decode path")
          at::Tensor buf = at::empty({static_cast<int64_t>(workspace_bytes<T_>(a.tokens, a.k, a.r))},
                                     x_in.options().dtype(at::kByte));
          Workspace<T_> f{};
          f.l = a;
          set_workspace(f, buf.data_ptr());
          check_launch(op, launch_split<T_>(f, num_sms(), current_stream()));
        }
      },
      op, x_in, A_in, B_in, scale_in, scale_value, ids_in, w_in, off_in, base_in, y, shared_a, accumulate);
}

at::Tensor lora_apply(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& base_out) {
  TORCH_CHECK_VALUE(B.dim() == 3 && x.dim() == 2, kApply, ": x must be [T, d_in] and B [N, d_out, r], got ",
                    x.sizes(), " and ", B.sizes());
  at::Tensor y = at::empty({x.size(0), B.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run(kApply, x, A, B, scale, 0.0, ids, weights, offsets, base_out, y, false, false);
  return y;
}

void lora_apply_(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& scale, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                 const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK_VALUE(out.is_contiguous(), kApplyInplace, ": out must be contiguous (updated in place)");
  // Blocks of other output chunks still read x while a block writes its slice of out: no aliasing.
  const auto ov = at::get_overlap_status(out, x);
  TORCH_CHECK_VALUE(ov != at::MemOverlapStatus::Full && ov != at::MemOverlapStatus::Partial, kApplyInplace,
                    ": out must not share memory with x; pass a copy of x or use lora_apply");
  run(kApplyInplace, x, A, B, scale, 0.0, ids, weights, offsets, out, out, false, true);
}

at::Tensor lora_shared_apply(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale,
                             const std::optional<at::Tensor>& ids, const at::Tensor& weights,
                             const std::optional<at::Tensor>& base_out) {
  TORCH_CHECK_VALUE(B.dim() == 3 && x.dim() == 2, kShared, ": x must be [T, d_in] and B [N, d_out, r], got ",
                    x.sizes(), " and ", B.sizes());
  if (!has(ids)) {
    TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == B.size(0), kShared,
                      ": weights must be [T, N] = [", x.size(0), ", ", B.size(0), "], got ", weights.sizes());
  }
  at::Tensor y = at::empty({x.size(0), B.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run(kShared, x, A, B, std::nullopt, scale, ids, weights, std::nullopt, base_out, y, true, false);
  return y;
}

// The fused pass over W (kernels/lora_fused_w.cuh): y = x Wᵀ + bias + the LoRA delta, fp16/bf16.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale, const at::Tensor& ids,
                       const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& offsets) {
  constexpr const char* op = kLinear;
  check_device(op, "x", x, x);
  check_device(op, "W", W, x);
  TORCH_CHECK_VALUE(x.dim() == 2 && B.dim() == 3, op, ": x must be [T, d_in] and B [N, d_out, r], got ", x.sizes(),
                    " and ", B.sizes());
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) == B.size(1) && W.size(1) == x.size(1), op,
                    ": W must be [d_out, d_in] = [", B.size(1), ", ", x.size(1), "], got ", W.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                    ": the fused pass over W takes float16/bfloat16, got ", x.scalar_type());
  check_dtype(op, "W", W, x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) <= int64_t(65535) * fused::kTN, op, ": too many tokens for the fused pass (T = ",
                    x.size(0), ")");
  if (has(bias)) {
    check_device(op, "bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == W.size(0), op, ": bias must be [d_out] = [", W.size(0),
                      "], got ", bias->sizes());
    check_dtype(op, "bias", *bias, x.scalar_type());
  }
  at::Tensor y = at::empty({x.size(0), B.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor Wc = W.contiguous();
  const at::Tensor bc = has(bias) ? bias->contiguous() : at::Tensor();
  run_with(
      [&](auto& a) {
        using T_ = std::remove_cv_t<std::remove_reference_t<decltype(*a.x)>>;
        if constexpr (sizeof(T_) == 2) {
          at::Tensor buf = at::empty({static_cast<int64_t>(workspace_bytes<T_>(a.tokens, a.k, a.r))},
                                     x.options().dtype(at::kByte));
          fused::Args<T_> f{};
          f.ws.l = a;
          set_workspace(f.ws, buf.data_ptr());
          f.W = ptr<T_>(Wc);
          f.bias = bc.defined() ? ptr<T_>(bc) : nullptr;
          check_launch(op, fused::launch<T_>(f, num_sms(), current_stream()));
        }
      },
      op, x, A, B, scale, 0.0, ids, weights, offsets, std::nullopt, y, false, false);
  return y;
}

}  // namespace
}  // namespace mk::lora

MK_REGISTER_IMPLS(m) {
  m.impl("lora_linear", &mk::lora::lora_linear);
  m.impl("lora_apply", &mk::lora::lora_apply);
  m.impl("lora_apply_", &mk::lora::lora_apply_);
  m.impl("lora_shared_apply", &mk::lora::lora_shared_apply);
}
