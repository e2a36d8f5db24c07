// Shared by the at::Tensor wrappers of the LoRA family (csrc/lora.cu, csrc/lora_fused_w.cu; the
// emulation module includes both into one translation unit): the argument checks that turn the
// canonical op arguments into kernels/lora.cuh's Args<T>.
#pragma once

#include <optional>
#include <type_traits>
#include <vector>

#include "torch_glue.h"
#include "kernels/lora.cuh"

namespace mk::lora::wrap {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The routing metadata's shapes, dtypes and devices, shared by the forward (run_with) and backward
// (csrc/lora_bwd.cu) wrappers: scale [N] (acc), offsets [S+1] int32 (rows = segments), ids [R, k] int32,
// weights [R, k] (acc). Returns {R, S, k}; k = N without ids (dense weights).
struct RoutingDims {
  int64_t R, S, k;
};
inline RoutingDims check_routing(const char* op, const at::Tensor& x, int64_t T, int64_t N, at::ScalarType acc,
                                 const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& ids_in,
                                 const std::optional<at::Tensor>& w_in, const std::optional<at::Tensor>& off_in) {
  if (scale_in) {
    check_device(op, "scale", *scale_in, x);
    TORCH_CHECK_VALUE(scale_in->dim() == 1 && scale_in->size(0) == N, op, ": scale must be [N] = [", N, "], got ",
                      scale_in->sizes());
    check_dtype(op, "scale", *scale_in, acc);
  }
  int64_t R = T, S = 0, k = N;  // rows of the routing metadata; slots per row
  if (has(off_in)) {
    check_device(op, "offsets", *off_in, x);
    TORCH_CHECK_VALUE(off_in->dim() == 1 && off_in->size(0) >= 1, op, ": offsets must be [S+1], got ", off_in->sizes());
    check_dtype(op, "offsets", *off_in, at::kInt);
    R = S = off_in->size(0) - 1;
  }
  if (has(ids_in)) {
    check_device(op, "ids", *ids_in, x);
    TORCH_CHECK_VALUE(ids_in->dim() == 2 && ids_in->size(0) == R, op, ": ids must be [R, k] with R = ", R,
                      has(off_in) ? " segments" : " tokens", ", got ", ids_in->sizes());
    check_dtype(op, "ids", *ids_in, at::kInt);
    k = ids_in->size(1);
  }
  if (has(w_in)) {
    check_device(op, "weights", *w_in, x);
    TORCH_CHECK_VALUE(w_in->dim() == 2 && w_in->size(0) == R && w_in->size(1) == k, op, ": weights must be [",
                      R, ", ", k, "], got ", w_in->sizes());
    check_dtype(op, "weights", *w_in, acc);
  }
  return {R, S, k};
}

// Optional extras of the split decode and prefill paths (lora_apply_sliced, mixed ranks): the output slices'
// A [N, r, d_in] / B [N, d_out_s, r] (then A_in / B_in are slice 0's) and ranks [N] int32.
struct Extra {
  at::TensorList sA, sB;  // empty: one slice (A_in, B_in)
  std::optional<at::Tensor> ranks;
};

// Checks every argument (shapes, dtypes, devices; never the metadata values: the kernels treat invalid
// ids as "no adapter"), fills Args<T> and calls launch_fn(a) (a generic lambda: T = the kernel's element
// type). scale: [N] tensor (per adapter) or nullopt (scale_value). Nothing is launched for T = 0.
template <class LaunchFn>
inline void run_with(LaunchFn&& launch_fn, const char* op, const at::Tensor& x_in, const at::Tensor& A_in,
                     const at::Tensor& B_in, const std::optional<at::Tensor>& scale_in, double scale_value,
                     const std::optional<at::Tensor>& ids_in, const std::optional<at::Tensor>& w_in,
                     const std::optional<at::Tensor>& off_in, const std::optional<at::Tensor>& base_in, at::Tensor& y,
                     bool shared_a, bool accumulate, const Extra& ex = {}) {
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
  const int64_t N = B_in.size(0);
  int64_t d_out = B_in.size(1);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxRank, op, ": rank r must be in [1, ", kMaxRank, "], got ", r);
  const int64_t nsl = static_cast<int64_t>(ex.sA.size());
  TORCH_CHECK_VALUE(!shared_a || (nsl == 0 && !has(ex.ranks)), op, ": shared A takes neither slices nor ranks");
  TORCH_CHECK_VALUE(nsl == static_cast<int64_t>(ex.sB.size()) && nsl <= kMaxSlices, op,
                    ": A and B must be lists of the same length S <= ", kMaxSlices, ", got ", nsl, " and ",
                    ex.sB.size());
  std::vector<int64_t> col{0};
  if (nsl > 0) {
    d_out = 0;
    for (int64_t s = 0; s < nsl; ++s) {
      const at::Tensor &As = ex.sA[s], &Bs = ex.sB[s];
      check_device(op, "A[s]", As, x_in);
      check_device(op, "B[s]", Bs, x_in);
      TORCH_CHECK_VALUE(As.sizes() == A_in.sizes(), op, ": every A[s] must be [N, r, d_in] = ", A_in.sizes(),
                        ", got A[", s, "] ", As.sizes());
      TORCH_CHECK_VALUE(Bs.dim() == 3 && Bs.size(0) == N && Bs.size(2) == r, op, ": B[", s,
                        "] must be [N, d_out_s, r] with N = ", N, ", r = ", r, ", got ", Bs.sizes());
      check_dtype(op, "A[s]", As, x_in.scalar_type());
      check_dtype(op, "B[s]", Bs, x_in.scalar_type());
      d_out += Bs.size(1);
      col.push_back(d_out);
    }
  }
  if (has(ex.ranks)) {
    check_device(op, "ranks", *ex.ranks, x_in);
    TORCH_CHECK_VALUE(ex.ranks->dim() == 1 && ex.ranks->size(0) == N, op, ": ranks must be [N] = [", N, "], got ",
                      ex.ranks->sizes());
    check_dtype(op, "ranks", *ex.ranks, at::kInt);
  }
  TORCH_CHECK_VALUE(d_in <= INT32_MAX && N <= INT32_MAX && T <= INT32_MAX, op, ": sizes must fit in int32");
  const auto dt = x_in.scalar_type(), acc = acc_type(dt);
  check_dtype(op, "A", A_in, dt);
  check_dtype(op, "B", B_in, dt);
  const RoutingDims rd = check_routing(op, x_in, T, N, acc, scale_in, ids_in, w_in, off_in);
  const int64_t S = rd.S, k = rd.k;
  TORCH_CHECK_VALUE(k <= INT32_MAX / (r + 2), op, ": too many adapter slots per token (k = ", k, ")");
  TORCH_CHECK_VALUE(d_out <= INT32_MAX, op, ": d_out must fit in int32");
  if (has(base_in)) {
    check_device(op, accumulate ? "out" : "base_out", *base_in, x_in);
    TORCH_CHECK_VALUE(base_in->dim() == 2 && base_in->size(0) == T && base_in->size(1) == d_out, op,
                      accumulate ? ": out" : ": base_out", " must be [T, d_out] = [", T, ", ", d_out, "], got ",
                      base_in->sizes());
    check_dtype(op, accumulate ? "out" : "base_out", *base_in, dt);
  }
  const int k32 = static_cast<int>(k), r32 = static_cast<int>(r);
  // Only the fused SIMT kernel (shared A) keeps per-slot state in shared memory: r codes + k (coef, id)
  // pairs; the split decode path keeps h in a global workspace and the prefill path has a fixed static
  // footprint (k · ceil16(r) <= 128, else it is not taken).
  if (shared_a)
    dispatch_float(op, dt, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      const size_t tail = smem_tail_bytes<T_>(r32, k32, shared_a);
      TORCH_CHECK_VALUE(tail <= kMaxSmem, op, ": ", k, " experts of rank ", r, " need ", tail,
                        " bytes of shared memory ((r + k) * ", sizeof(acc_t<T_>), " + k * 4), the kernel has ",
                        kMaxSmem);
    });
  if (T == 0 || d_out == 0) return;
  DeviceGuard guard(x_in);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const at::Tensor scale = scale_in ? scale_in->contiguous() : at::Tensor();
  const at::Tensor ids = has(ids_in) ? ids_in->contiguous() : at::Tensor();
  const at::Tensor w = has(w_in) ? w_in->contiguous() : at::Tensor();
  const at::Tensor off = has(off_in) ? off_in->contiguous() : at::Tensor();
  const at::Tensor base = (has(base_in) && !accumulate) ? base_in->contiguous() : at::Tensor();
  const at::Tensor ranks = has(ex.ranks) ? ex.ranks->contiguous() : at::Tensor();
  std::vector<at::Tensor> sA, sB;  // the slices, contiguous (views when they already are: no copy)
  for (int64_t s = 0; s < nsl; ++s) {
    sA.push_back(ex.sA[s].contiguous());
    sB.push_back(ex.sB[s].contiguous());
  }
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
    a.ranks = ranks.defined() ? ptr<int32_t>(ranks) : nullptr;
    a.slices = static_cast<int>(nsl);
    for (int64_t s = 0; s < nsl; ++s) {
      a.sA[s] = ptr<T_>(sA[s]);
      a.sB[s] = ptr<T_>(sB[s]);
    }
    for (int64_t s = 0; s <= nsl && nsl > 0; ++s) a.col[s] = static_cast<int>(col[s]);
    launch_fn(a);
  });
}

}  // namespace mk::lora::wrap
