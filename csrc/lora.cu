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
#include "lora_wrapper.h"

namespace mk::lora {
namespace {

using wrap::Extra;
using wrap::has;
using wrap::run_with;

constexpr const char* kApply = "mokernels.lora_apply";
constexpr const char* kApplyInplace = "mokernels.lora_apply_";
constexpr const char* kShared = "mokernels.lora_shared_apply";
constexpr const char* kSliced = "mokernels.lora_apply_sliced";

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

// The lora_apply family: the automatic decode/prefill switch.
void run(const char* op, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
         const std::optional<at::Tensor>& scale_in, double scale_value, const std::optional<at::Tensor>& ids_in,
         const std::optional<at::Tensor>& w_in, const std::optional<at::Tensor>& off_in,
         const std::optional<at::Tensor>& base_in, at::Tensor& y, bool shared_a, bool accumulate,
         const Extra& ex = {}) {
  run_with(
      [&](auto& a) {
        using T_ = std::remove_cv_t<std::remove_reference_t<decltype(*a.x)>>;
        if (use_prefill(op, a)) {  // split-K shrink -> fp32 partials [ksplit, T, k·r16] -> expand
          PrefillArgs<T_> p{};
          p.l = a;
          p.ksplit = prefill_ksplit(a.tokens, a.segs, a.d_in, num_sms());
          p.kh = static_cast<int>(a.k * ceil_div(a.r, 16) * 16);
          at::Tensor buf = at::empty({static_cast<int64_t>(prefill_workspace_bytes(a.tokens, a.k, a.r, p.ksplit,
                                                                                   num_slices(a)))},
                                     x_in.options().dtype(at::kByte));
          p.hp = reinterpret_cast<float*>(buf.data_ptr());
          check_launch(op, launch_prefill<T_>(p, num_sms(), current_stream()));
        } else if (a.shared_a) {  // h once per token: the fused SIMT kernel
          check_launch(op, launch<T_>(a, num_sms(), current_stream()));
        } else {  // shrink -> tiny workspace -> expand (lora.cuh "Split decode path")
          at::Tensor buf = at::empty({static_cast<int64_t>(workspace_bytes<T_>(a.tokens, a.k, a.r, num_slices(a)))},
                                     x_in.options().dtype(at::kByte));
          Workspace<T_> f{};
          f.l = a;
          set_workspace(f, buf.data_ptr());
          check_launch(op, launch_split<T_>(f, num_sms(), current_stream()));
        }
      },
      op, x_in, A_in, B_in, scale_in, scale_value, ids_in, w_in, off_in, base_in, y, shared_a, accumulate, ex);
}

at::Tensor lora_apply(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& base_out,
                      const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(B.dim() == 3 && x.dim() == 2, kApply, ": x must be [T, d_in] and B [N, d_out, r], got ",
                    x.sizes(), " and ", B.sizes());
  at::Tensor y = at::empty({x.size(0), B.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run(kApply, x, A, B, scale, 0.0, ids, weights, offsets, base_out, y, false, false, Extra{{}, {}, ranks});
  return y;
}

// Several output slices (q/k/v, gate/up) in one launch per kernel: slice s writes y's columns
// [Σ_{s'<s} d_out_s', + d_out_s). A [S] x [N, r, d_in], B [S] x [N, d_out_s, r]: no copy of the stacks.
at::Tensor lora_apply_sliced(const at::Tensor& x, at::TensorList A, at::TensorList B, const at::Tensor& scale,
                             const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                             const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& base_out,
                             const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(!A.empty() && A.size() == B.size(), kSliced, ": A and B must be lists of the same length S >= 1, "
                    "got ", A.size(), " and ", B.size());
  TORCH_CHECK_VALUE(x.dim() == 2, kSliced, ": x must be [T, d_in], got ", x.sizes());
  int64_t d_out = 0;
  for (const at::Tensor& b : B) {
    TORCH_CHECK_VALUE(b.dim() == 3, kSliced, ": every B[s] must be [N, d_out_s, r], got ", b.sizes());
    d_out += b.size(1);
  }
  at::Tensor y = at::empty({x.size(0), d_out}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run(kSliced, x, A[0], B[0], scale, 0.0, ids, weights, offsets, base_out, y, false, false, Extra{A, B, ranks});
  return y;
}

void lora_apply_(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& scale, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                 const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(out.is_contiguous(), kApplyInplace, ": out must be contiguous (updated in place)");
  // Blocks of other output chunks still read x while a block writes its slice of out: no aliasing.
  const auto ov = at::get_overlap_status(out, x);
  TORCH_CHECK_VALUE(ov != at::MemOverlapStatus::Full && ov != at::MemOverlapStatus::Partial, kApplyInplace,
                    ": out must not share memory with x; pass a copy of x or use lora_apply");
  run(kApplyInplace, x, A, B, scale, 0.0, ids, weights, offsets, out, out, false, true, Extra{{}, {}, ranks});
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

}  // namespace
}  // namespace mk::lora

MK_REGISTER_IMPLS(m) {
  m.impl("lora_apply", &mk::lora::lora_apply);
  m.impl("lora_apply_", &mk::lora::lora_apply_);
  m.impl("lora_shared_apply", &mk::lora::lora_shared_apply);
  m.impl("lora_apply_sliced", &mk::lora::lora_apply_sliced);
}
