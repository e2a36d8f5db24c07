// The schema of every mokernels op, defined once and used for both op namespaces:
// `mokernels` (csrc/bindings.cpp: CUDA kernels + the Python reference on CPU) and `mokernels_emu`
// (csrc/emu/module.cpp: the same kernel source run by the CPU emulator).
#pragma once

#include <torch/library.h>

namespace mk {

inline void define_schemas(torch::Library& m) {
  // Rank-one expert scaling (MoORE): out = z * (sigma + g).  z, g: [..., R]; sigma: [R].
  m.def("rank_one_scale(Tensor z, Tensor sigma, Tensor g) -> Tensor");
  // Its backward: (dz, dsigma, dg) = (grad * (sigma + g), sum over rows of grad * z, grad * z).
  m.def("rank_one_scale_backward(Tensor grad, Tensor z, Tensor sigma, Tensor g) -> (Tensor, Tensor, Tensor)");
  // Fused router (METHODS.md §2): x = logits [T,N] * fl(1/temperature), p = softmax(x); keep the shortest
  // prefix of the descending order of x (ties: lower index) whose unnormalised mass sum(e) reaches
  // fl(top_p * S) (top_p >= 1: all), at most kmax (the router rules in mokernels/ops/router.py);
  // renorm "sum" | "softmax" | "none". Returns (ids [T,kmax] int32 -1-padded, weights [T,kmax],
  // counts [T] int32, dense [T,N] if dense else an empty [0] tensor).
  m.def("route_fwd(Tensor logits, float temperature, float top_p, int kmax, str renorm, bool dense) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward, selection (ids) held fixed: dlogits [T,N] from grad_weights [T,kmax] and grad_dense [T,N].
  m.def("route_bwd(Tensor grad_weights, Tensor? grad_dense, Tensor logits, Tensor ids, float temperature, str renorm) -> Tensor");
  // Cosine router (SAMoRA): route_fwd on logits cos(h [T,r], keys [N,r]) (norms clamped at eps), formed
  // inside the kernel. Backward: route_bwd on the recomputed cosine logits, then through cos (Python).
  m.def("route_cosine_fwd(Tensor h, Tensor keys, float temperature, float eps, float top_p, int kmax, str renorm, bool dense) -> (Tensor, Tensor, Tensor, Tensor)");
  // Segmented multi-adapter LoRA (METHODS.md §1, mokernels/ops/lora.py). x [T,d_in], A [N,r,d_in],
  // B [N,d_out,r] (x's dtype), scale [N] fp32 (fp64 for fp64). Routing rows R: tokens (offsets None)
  // or segments (offsets [S+1] int32, token t in row s iff offsets[s] <= t < offsets[s+1]); ids [R,k]
  // int32 (ids outside [0,N) = no adapter), weights [R,k] fp32/fp64 or None (= 1).
  // y = base_out + sum_j w_j scale[id_j] B[id_j] A[id_j] x  -> [T,d_out] (x's dtype).
  // ranks [N] int32 or None: adapter n uses only the first ranks[n] rows of A[n] / columns of B[n] (mixed
  // ranks without padded compute; clamped into [0, r] by the kernels, validated in Python).
  m.def("lora_apply(Tensor x, Tensor A, Tensor B, Tensor scale, Tensor ids, Tensor? weights, Tensor? offsets, Tensor? base_out, Tensor? ranks=None) -> Tensor");
  // In place (inference): out [T,d_out] += the same delta.
  m.def("lora_apply_(Tensor(a!) out, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor ids, Tensor? weights, Tensor? offsets, Tensor? ranks=None) -> ()");
  // Output slices in one launch (fused q/k/v or gate/up projections): A S x [N,r,d_in], B S x [N,d_out_s,r];
  // slice s writes columns [sum_{s'<s} d_out_s', + d_out_s) of y [T, sum_s d_out_s]; S <= 8. Else as lora_apply.
  m.def("lora_apply_sliced(Tensor x, Tensor[] A, Tensor[] B, Tensor scale, Tensor ids, Tensor? weights, Tensor? offsets, Tensor? base_out, Tensor? ranks=None) -> Tensor");
  // Shared A [r,d_in], experts B [N,d_out,r]: y = base_out + scale * sum_i w[t,i] B_i (A x[t]); weights
  // dense [T,N] (ids None) or compact [T,k] with ids [T,k] int32 (-1 pads); weights fp32 (fp64).
  m.def("lora_shared_apply(Tensor x, Tensor A, Tensor B, float scale, Tensor? ids, Tensor weights, Tensor? base_out) -> Tensor");
  // Backward of lora_apply (kernels/lora_bwd.cuh; CPU: the reference): grad [T,d_out], the forward's
  // canonical arguments, and which gradients to form. Returns (dx [T,d_in], dA [N,r,d_in], dB [N,d_out,r],
  // dweights [R,k] fp32/fp64); one not asked for (or dweights without weights) is an empty [0] tensor.
  // Slots with coefficient 0 add nothing to dx/dA/dB but get their weight's gradient. Deterministic.
  m.def("lora_apply_backward(Tensor grad, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor ids, Tensor? weights, Tensor? offsets, bool need_dx, bool need_dA, bool need_dB, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of lora_shared_apply: (dx, dA [r,d_in], dB [N,d_out,r], dweights like weights), as above.
  m.def("lora_shared_apply_backward(Tensor grad, Tensor x, Tensor A, Tensor B, float scale, Tensor? ids, Tensor weights, bool need_dx, bool need_dA, bool need_dB, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor)");
  // The fused pass over W (decode, fp16/bf16 on CUDA; the CPU kernel is the reference): x [T,d_in],
  // W [d_out,d_in], bias [d_out] or None, A/B/scale/ids/weights/offsets as lora_apply.
  // y = x W^T + bias + sum_j w_j scale[id_j] B[id_j] A[id_j] x  -> [T,d_out] (x's dtype).
  m.def("lora_linear(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor ids, Tensor? weights, Tensor? offsets) -> Tensor");
  // Test kernel for the mma.sync / ldmatrix wrappers: fp32 [M, N] = a [M, K] @ b, with b [N, K]
  // used transposed (b_kn=False) or b [K, N] (b_kn=True); a, b fp16 or bf16.
  m.def("_tile_gemm(Tensor a, Tensor b, bool b_kn=False) -> Tensor");
  // Householder chain (METHODS.md §3, mokernels/ops/householder.py): H = H_1 ... H_L, H_l = I - 2 u_l u_l^T/|u_l|^2
  // (norms clamped at eps), x [..., D], U [L, D] (x's dtype, 0 <= L <= 64). out = x H^T (transpose: x H), x's dtype;
  // s = the normalised projections x Y^T [N, L] fp32 (fp64 for fp64) when return_s, else an empty [0, 0] tensor.
  m.def("householder_apply(Tensor x, Tensor U, bool transpose, float eps, bool return_s) -> (Tensor, Tensor)");
  // MoORE rank-one experts, first GEMM with the gate fused (kernels/moore.cuh; CPU: the reference). x [T,d_in],
  // V [d_in,R], sigma [R], gx [T,d_s] and Q [d_s,R] (both or neither), p_task [R] or [T,R] or None, fp16/bf16.
  // S = (x V) * c, c = sigma + p_task + gx Q (clip: relu(c)) -> [T,R] (x's dtype); c is never materialised.
  m.def("experts_gate_gemm(Tensor x, Tensor V, Tensor sigma, Tensor? gx, Tensor? Q, Tensor? p_task, bool clip) -> Tensor");
  // Its backward from dS [T,R]: (dz = dS * c, dg = dS * (x V), both masked by c > 0 under clip, dsigma = sum over
  // tokens of dg [R], x's dtype); z and gx Q are recomputed, one not asked for is an empty [0] tensor.
  m.def("experts_gate_bwd(Tensor dS, Tensor x, Tensor V, Tensor sigma, Tensor? gx, Tensor? Q, Tensor? p_task, bool clip, bool need_dz, bool need_dg, bool need_dsigma) -> (Tensor, Tensor, Tensor)");
  // The fused dU reduction of its backward: Z = alpha^T g + beta^T x [L, D] (fp32; fp64 for fp64 x) for alpha, beta
  // [N, L] (fp32 / fp64), g, x [N, D] (x's dtype), L <= 64; partials per block + a fixed-order reduce (deterministic).
  m.def("householder_grad_y(Tensor alpha, Tensor beta, Tensor g, Tensor x) -> Tensor");
}

}  // namespace mk
