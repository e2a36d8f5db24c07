// at::Tensor wrapper of the fused pass over W (kernels/lora_fused_w.cuh), in its own translation unit
// so nvcc builds it in parallel with csrc/lora.cu (MAX_JOBS=2 in CI). The Python layer is
// mokernels.ops.lora.lora_linear; the CPU kernel is its reference.
#include <optional>
#include <type_traits>

#include "torch_glue.h"
#include "kernels/lora_fused_w.cuh"
#include "lora_wrapper.h"

namespace mk::lora {
namespace {

using wrap::has;
using wrap::run_with;

constexpr const char* kLinear = "mokernels.lora_linear";

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

MK_REGISTER_IMPLS(m) { m.impl("lora_linear", &mk::lora::lora_linear); }
