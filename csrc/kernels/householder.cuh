// Householder chain (METHODS.md §3, mokernels/ops/householder.py): out = x Hᵀ (or x H), H = H_1 … H_L,
// H_l = I − 2 û_l û_lᵀ, through the compact WY form H = I − Yᵀ T Y (Y = diag(rn) U the normalised rows,
// T = (½ I + striu(Y Yᵀ))⁻¹ upper triangular, LAPACK larft with τ = 2).
//
// Three kernels:
//  1. gram_kernel   (grid L, tiny): G[i][j] = u_i · u_j for j >= i, fp32 (fp64) block reductions.
//  2. wy_kernel     (1 block): rn_i = 1 / max(‖u_i‖, eps); T column by column (thread j owns column j:
//                   T[i][j] = −2 Σ_{k=i+1..j} S[i][k] T[k][j], S = striu(G) scaled by rn); writes
//                   K_fwd[l][k] = rn_l T[l][k] rn_k, K_tr[l][k] = rn_l T[k][l] rn_k, T and rn.
//                   K folds the normalisation in, so the apply kernel reads the raw U in x's dtype
//                   (bf16: half the bytes of an fp32 Y) and never divides.
//  3. apply_kernel  (the hot one): a block owns a tile of kRows rows of x; per tile
//                   s[r][k] = x_r · u_k (L dot products, block reductions), t[r] = K s[r] (L² FMAs),
//                   out_r = x_r − Σ_l t[r][l] u_l. x is read from HBM once (staged in shared memory
//                   between the two passes when kRows·D·elt fits, else re-read: an L2 hit) and written once.
// Bytes (why a prologue and not per-block WY): the Gram costs L²·D/2 FMAs once per call; rebuilt per
// block it would cost that per kRows-row tile — at L = 64, D = 4096 about as much as the tile's own
// 2·kRows·L·D FMAs. Prologue traffic: U read L/2 times from L2 (≤ 64·4096·2·32 B = 16 MB of L2 reads
// at L = 64, 0.5 MB at L = 8), a few L² floats written; two extra launches (~2·3 µs on an H100).
// Apply-kernel traffic per tile: x in + out (2·kRows·D·elt from HBM) and U twice (2·L·D·elt, L2/L1):
// at L = 8, kRows = 8, U traffic equals x traffic and is served by L2 (U is 64 KB, shared by all SMs).
#pragma once

#include <algorithm>

#include "common/dtype.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"

namespace mk::householder {

constexpr int kThreads = 256;             // apply kernel block
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRows = 8;                  // rows of x per tile
constexpr int kGroup = 8;                 // reflections per dot-product pass
constexpr int kRB = 4;                    // rows per register block (kRB x kGroup accumulators per thread)
constexpr int kMaxL = 64;                 // longest chain of the fused kernels
constexpr int kGramThreads = 256;
constexpr size_t kMaxStageBytes = 96 * 1024;  // x tile staged in shared memory up to this size

// Sum of v over the block (blockDim.x == NT, a multiple of 32); every thread gets the result.
// `red` holds NT / 32 values; the caller's next write to it must follow a barrier (the one at the end).
template <int NT, class A>
MK_DEVICE A block_sum(A v, A* red) {
  v = warp_reduce(v, SumOp{});
  const int warp = threadIdx.x / kWarpSize;
  if (lane_id() == 0) red[warp] = v;
  block_sync();
  A s = A(0);
#pragma unroll
  for (int w = 0; w < NT / kWarpSize; ++w) s += red[w];  // fixed order: deterministic
  block_sync();
  return s;
}

// G[i * L + j] = u_i · u_j for j >= i (the lower triangle is not written). Grid L, block kGramThreads.
// sass-budget: mk::householder::gram_kernel block=256 regs<=64 spill=0
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kGramThreads)
    gram_kernel(const T* __restrict__ U, acc_t<T>* __restrict__ G, int L, int D) {
  using A = acc_t<T>;
  MK_SHARED_ARRAY(A, red, kGramThreads / kWarpSize);
  const int i = blockIdx.x;
  const T* ui = U + static_cast<int64_t>(i) * D;
  for (int j = i; j < L; ++j) {  // block-uniform loop
    const T* uj = U + static_cast<int64_t>(j) * D;
    A p = A(0);
    for (int c = threadIdx.x; c < D; c += kGramThreads) p += to_acc(ui[c]) * to_acc(uj[c]);
    const A s = block_sum<kGramThreads>(p, red);
    if (threadIdx.x == 0) G[i * L + j] = s;
  }
}

// One block of kMaxL threads. G: [L, L] (upper triangle incl. diagonal). Writes K [2, L, L]
// (K[0]: x Hᵀ, K[1]: x H), Tm [L, L] (T, zero below the diagonal) and rn [L]. T is built in Tm itself
// (column j by thread j only; read by all after the barrier): static shared memory stays at S (33 KB in fp64).
// sass-budget: mk::householder::wy_kernel block=64 regs<=80 spill=0
template <class A>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kMaxL)
    wy_kernel(const A* __restrict__ G, A* __restrict__ K, A* __restrict__ Tm, A* __restrict__ rn, int L, A eps) {
  MK_SHARED_ARRAY(A[kMaxL + 1], S, kMaxL);  // S[i][k] = û_i · û_k (i < k)
  MK_SHARED_ARRAY(A, rs, kMaxL);
  const int t = threadIdx.x;
  if (t < L) {
    const A n = sqrt_acc(G[t * L + t]);
    // A zero vector is the identity whatever rn is (û = rn·u = 0); rn = 0 there, not 1/eps: K folds rn_l·rn_k
    // in, and 1/eps² overflows fp32 for eps < ~5e-20 (K = inf, t = inf·0 = NaN in every output row).
    rs[t] = n > A(0) ? A(1) / (n > eps ? n : eps) : A(0);
  }
  block_sync();
  for (int idx = t; idx < L * L; idx += kMaxL) {
    const int i = idx / L, k = idx % L;
    S[i][k] = i < k ? G[idx] * rs[i] * rs[k] : A(0);
  }
  block_sync();
  if (t < L) {  // column t of T = (½ I + striu S)⁻¹, bottom up
    const int j = t;
    for (int i = L - 1; i > j; --i) Tm[i * L + j] = A(0);
    Tm[j * L + j] = A(2);
    for (int i = j - 1; i >= 0; --i) {
      A s = A(0);
      for (int k = i + 1; k <= j; ++k) s += S[i][k] * Tm[k * L + j];
      Tm[i * L + j] = A(-2) * s;
    }
  }
  block_sync();  // Tm complete (global memory written by this block, read after the barrier)
  for (int idx = t; idx < L * L; idx += kMaxL) {
    const int l = idx / L, k = idx % L;
    const A r = rs[l] * rs[k];
    K[idx] = r * Tm[idx];
    K[L * L + idx] = r * Tm[k * L + l];
  }
  if (t < L) rn[t] = rs[t];
}

// __launch_bounds__(256, 1): with the block size alone ptxas (nvcc 13.0, sm_80) capped the 16-byte-vector
// instances at 64-80 registers and spilled 12-16 bytes; with the explicit minimum of one block per SM it
// allocates 76-80 registers and spills nothing (3 blocks of 256 threads per SM by registers).
#if defined(MOKERNELS_EMULATION)
#define MK_HOUSEHOLDER_APPLY_BOUNDS
#else
#define MK_HOUSEHOLDER_APPLY_BOUNDS __launch_bounds__(kThreads, 1)
#endif

// Dynamic shared memory of apply_kernel: [kWarps][kRows][kGroup] partial dots, s and t [kRows][kMaxL]
// (accumulator type), then the staged x tile [kRows][D] (x's type) when `stage`.
template <class T>
constexpr size_t apply_smem_fixed() {
  return sizeof(acc_t<T>) * (kWarps * kRows * kGroup + 2 * kRows * kMaxL);
}

// x, out: [N, D]; U: [L, D] (x's type, raw vectors); K: [L, L] (the orientation's matrix, rn folded in);
// rn: [L]; s_out: [N, L] normalised projections x Yᵀ (nullptr: not written). 1 <= L <= kMaxL.
// VEC divides D and every row start is VEC-aligned (launcher: pick_vec).
// Registers (nvcc 13.0, sm_80 / sm_90a): bf16 and fp16 76-98, fp32 78-91, fp64 120-136; no spills.
// sass-budget: mk::householder::apply_kernel<__nv_bfloat16,*> block=256 smem=71680 regs<=104 spill=0 hot
// sass-budget: mk::householder::apply_kernel<__half,*> block=256 smem=71680 regs<=104 spill=0 hot
// sass-budget: mk::householder::apply_kernel<float,*> block=256 regs<=104 spill=0 hot
// sass-budget: mk::householder::apply_kernel<double,*> block=256 regs<=144 spill=0
template <class T, int VEC>
MK_GLOBAL void MK_HOUSEHOLDER_APPLY_BOUNDS
    apply_kernel(const T* __restrict__ x, const T* __restrict__ U, const acc_t<T>* __restrict__ K,
                 const acc_t<T>* __restrict__ rn, T* __restrict__ out, acc_t<T>* __restrict__ s_out, int64_t N,
                 int D, int L, bool stage) {
  using A = acc_t<T>;
  MK_DYNAMIC_SHARED(A, smem);
  A* red = smem;                                 // [kWarps][kRows][kGroup]
  A* s_all = red + kWarps * kRows * kGroup;      // [kRows][kMaxL]
  A* t_all = s_all + kRows * kMaxL;              // [kRows][kMaxL]
  T* xs = reinterpret_cast<T*>(t_all + kRows * kMaxL);  // [kRows][D] (when stage)
  // one tile of kRows rows per block, worked on in register blocks of kRB rows: each U vector loaded
  // serves kRB rows (U traffic per tile 2·L·D·elt / kRB per row block from L1/L2)
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int nr = static_cast<int>(N - r0 < kRows ? N - r0 : kRows);
  // ---- pass 1: s[r][k] = x_r · u_k, G reflections at a time (16-byte vectors of 16-bit types: 4, else 8 —
  // kRB·G fp32 accumulators next to kRB 8-element vectors stay under ~128 registers without spills)
  constexpr int G = (VEC >= 8) ? kGroup / 2 : kGroup;
  for (int g0 = 0; g0 < L; g0 += G) {  // block-uniform
    const int ng = L - g0 < G ? L - g0 : G;
    for (int rb = 0; rb < kRows; rb += kRB) {  // every thread, every block of rows: the reductions are collective
      A p[kRB][G];
#pragma unroll
      for (int q = 0; q < kRB; ++q)
#pragma unroll
        for (int j = 0; j < G; ++j) p[q][j] = A(0);
      if (rb < nr) {
        for (int c = static_cast<int>(threadIdx.x) * VEC; c < D; c += kThreads * VEC) {
          Vec<T, VEC> xv[kRB];
#pragma unroll
          for (int q = 0; q < kRB; ++q) {
            if (rb + q < nr) {
              T* xsr = xs + static_cast<int64_t>(rb + q) * D + c;
              if (stage && g0 > 0) {
                xv[q] = load_vec<VEC>(xsr);  // written by this thread in the first group
              } else {
                xv[q] = load_vec<VEC>(x + (r0 + rb + q) * D + c);
                if (stage && MK_MUTABLE("householder.stage")) store_vec(xsr, xv[q]);
              }
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) xv[q].v[i] = from_acc<T>(A(0));
            }
          }
#pragma unroll
          for (int j = 0; j < G; ++j) {
            if (j < ng) {
              const Vec<T, VEC> uv = load_vec<VEC>(U + static_cast<int64_t>(g0 + j) * D + c);
#pragma unroll
              for (int q = 0; q < kRB; ++q)
#pragma unroll
                for (int i = 0; i < VEC; ++i) p[q][j] += to_acc(xv[q].v[i]) * to_acc(uv.v[i]);
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kRB; ++q)
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const A w = warp_reduce(p[q][j], SumOp{});
          if (lane_id() == 0) red[((static_cast<int>(threadIdx.x) / kWarpSize) * kRows + rb + q) * kGroup + j] = w;
        }
    }
    if (MK_MUTABLE("householder.red_barrier")) block_sync();
    if (static_cast<int>(threadIdx.x) < kRows * kGroup) {  // fixed-order sum over the warps
      const int r = static_cast<int>(threadIdx.x) / kGroup, j = static_cast<int>(threadIdx.x) % kGroup;
      if (j < ng) {
        A s = A(0);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(w * kRows + r) * kGroup + j];
        s_all[r * kMaxL + g0 + j] = s;
      }
    }
    block_sync();  // s_all complete; red free for the next group
  }
  // ---- t[r] = K s[r] (L² FMAs per row); the normalised projections out for the backward
  for (int idx = static_cast<int>(threadIdx.x); idx < kRows * L; idx += kThreads) {
    const int r = idx / L, l = idx % L;
    A t = A(0);
    for (int k = 0; k < L; ++k) t += K[l * L + k] * s_all[r * kMaxL + k];
    t_all[r * kMaxL + l] = t;
    if (s_out != nullptr && r < nr) s_out[(r0 + r) * L + l] = s_all[r * kMaxL + l] * rn[l];
  }
  if (MK_MUTABLE("householder.t_barrier")) block_sync();
  // ---- pass 2: out_r = x_r − Σ_l t[r][l] u_l
  for (int rb = 0; rb < nr; rb += kRB) {
    for (int c = static_cast<int>(threadIdx.x) * VEC; c < D; c += kThreads * VEC) {
      A o[kRB][VEC];
#pragma unroll
      for (int q = 0; q < kRB; ++q) {
        if (rb + q < nr) {
          const Vec<T, VEC> xv = load_vec<VEC>(stage ? xs + static_cast<int64_t>(rb + q) * D + c
                                                     : x + (r0 + rb + q) * D + c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) o[q][i] = to_acc(xv.v[i]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) o[q][i] = A(0);
        }
      }
      for (int l = 0; l < L; ++l) {
        const Vec<T, VEC> uv = load_vec<VEC>(U + static_cast<int64_t>(l) * D + c);
#pragma unroll
        for (int q = 0; q < kRB; ++q) {
          const A tl = t_all[(rb + q) * kMaxL + l];
#pragma unroll
          for (int i = 0; i < VEC; ++i) o[q][i] -= tl * to_acc(uv.v[i]);
        }
      }
#pragma unroll
      for (int q = 0; q < kRB; ++q) {
        if (rb + q < nr) {
          Vec<T, VEC> ov;
#pragma unroll
          for (int i = 0; i < VEC; ++i) ov.v[i] = from_acc<T>(o[q][i]);
          store_vec(out + (r0 + rb + q) * D + c, ov);
        }
      }
    }
  }
}

// ---- backward: the dU reduction (issue 11 item 1) ----
// With a = x Yᵀ (saved by the forward), b = g Yᵀ (the dx pass, apply_kernel on g with the other orientation),
// M = Tᵀ (T if transpose): dY = −(Mᵀ aᵀ g + M bᵀ x) + gsᵀ x + (dG + dGᵀ) Y. The two [L, D] products over all
// N tokens fold into one: Mᵀ aᵀ g + M bᵀ x − gsᵀ x = αᵀ g + βᵀ x with α = a M, β = b Mᵀ − gs ([N, L], fp32;
// two [N, L]×[L, L] products on the host side). dy_partial_kernel computes Z = αᵀ g + βᵀ x straight from x and
// g in their own dtype: block (column slice of kThreads columns, row split) accumulates its slice of Z over
// its rows in registers (thread = one column, LB accumulators) and writes it to part[split]; dy_reduce_kernel
// sums the splits in a fixed order (deterministic, no atomics; S depends on the shape only, not the device).
//
// Why column slices and not a partial per apply tile: a block of the row-tiled dx pass owns kRows = 8 rows ×
// all D, and its share of Z is L·D·4 bytes — L/(3·elt) times the 3·8·D·elt bytes the tile itself moves (bf16,
// L = 8: 1.3×; L = 64: 11×), and holding a whole row's Z in registers (L·D/kThreads floats) does not fit.
// Sliced by columns, a block keeps L floats per thread for as many rows as it likes: partials shrink to
// S·L·D·4 bytes with S = the row splits (dy_splits: ≤ N·elt / (8·L), so writing + reading them costs at most
// one half of a pass over x).
//
// Bytes of the backward (N tokens, elt = x's bytes; forward = 2·N·D·elt: x in, out out):
//   before: dx pass (g in, dx out: 2·N·D·elt) + fp32 copies of x and g (16-bit: 2·N·D·(elt + 4), fp32: none)
//           + the two GEMMs aᵀ g, bᵀ x on the copies (2·N·D·4)
//           = bf16 24·N·D (6× the forward's 4·N·D), fp32 16·N·D (2×); 3 kernel launches + ~37 torch ops.
//   after:  dx pass (2·N·D·elt) + dy_partial (g and x in: 2·N·D·elt; α, β: 8·N·L) + partials (≤ N·D·elt/2)
//           = bf16 ≤ 9·N·D (≤ 2.25×; 2× + 8·N·L at S = 1), fp32 ≤ 18·N·D (≤ 2.25×), fp64 ≤ 2.25×;
//           (fp32 had no copies to save: its bytes stay ≈ 2× + ≤ 12 % of partials; it gains the fixed order);
//           launches: gram + wy + apply + dy_partial (+ dy_reduce when S > 1) + ~33 small torch ops (the
//           [L, L] / [L, D] glue of _grads_from_projections: Y and T rebuilt, dM, dS, the norm's chain rule; counted
//           with a dispatch mode). So the ≤ 3× target holds by bytes at large N (T = 4096: ≈ 2.25×), but at N = 32
//           the backward is launch-bound (~37 launches vs the forward's 3) and above 3×, as it was before. Next step
//           (not done): a one-block wy-backward kernel taking Z, aᵀ b (one more output of dy_partial), T and rn
//           and writing dU, replacing the glue.
constexpr int kZRows = 32;  // rows of α, β staged in shared memory per step

// __launch_bounds__(256, 1) as apply_kernel: with the block size alone ptxas (nvcc 13.0, sm_80) gave the LB = 32
// instances 48 registers and 28 bytes of spills. Registers (nvcc 13.0, sm_80 / sm_90a): fp16/bf16/fp32 60-110 (LB = 8..64),
// fp64 64-182; no spills (2 blocks of 256 per SM at LB = 64, 16-/32-bit).
// x, g: [N, D] (x's dtype); alpha, beta: [N, L] (accumulator type); part: [S, L, D] with
// S = gridDim.y, split s owning rows [s·rows_per_split, (s+1)·rows_per_split). LB >= L (8, 16, 32, 64).
// sass-budget: mk::householder::dy_partial_kernel<__nv_bfloat16,*> block=256 regs<=112 spill=0 hot
// sass-budget: mk::householder::dy_partial_kernel<__half,*> block=256 regs<=112 spill=0 hot
// sass-budget: mk::householder::dy_partial_kernel<float,*> block=256 regs<=112 spill=0 hot
// sass-budget: mk::householder::dy_partial_kernel<double,*> block=256 regs<=192 spill=0
template <class T, int LB>
MK_GLOBAL void MK_HOUSEHOLDER_APPLY_BOUNDS
    dy_partial_kernel(const acc_t<T>* __restrict__ alpha, const acc_t<T>* __restrict__ beta, const T* __restrict__ g,
                      const T* __restrict__ x, acc_t<T>* __restrict__ part, int64_t N, int D, int L,
                      int64_t rows_per_split) {
  using A = acc_t<T>;
  MK_SHARED_ARRAY(A[LB], as, kZRows);
  MK_SHARED_ARRAY(A[LB], bs, kZRows);
  const int c = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = N < r_begin + rows_per_split ? N : r_begin + rows_per_split;
  A acc[LB];
#pragma unroll
  for (int l = 0; l < LB; ++l) acc[l] = A(0);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kZRows) {  // block-uniform
    const int nr = static_cast<int>(r_end - r0 < kZRows ? r_end - r0 : kZRows);
    for (int idx = static_cast<int>(threadIdx.x); idx < nr * L; idx += kThreads) {
      const int r = idx / L, l = idx % L;
      as[r][l] = alpha[(r0 + r) * L + l];
      bs[r][l] = beta[(r0 + r) * L + l];
    }
    if (MK_MUTABLE("householder.dy_stage_barrier")) block_sync();  // α, β rows staged
    if (c < D) {
      for (int r = 0; r < nr; ++r) {
        const A gv = to_acc(g[(r0 + r) * D + c]);
        const A xv = to_acc(x[(r0 + r) * D + c]);
#pragma unroll
        for (int l = 0; l < LB; ++l)
          if (l < L) acc[l] += as[r][l] * gv + bs[r][l] * xv;
      }
    }
    if (MK_MUTABLE("householder.dy_reuse_barrier")) block_sync();  // all reads done before the next rows land
  }
  if (c < D) {
    A* p = part + static_cast<int64_t>(blockIdx.y) * L * D + c;
#pragma unroll
    for (int l = 0; l < LB; ++l)
      if (l < L) p[static_cast<int64_t>(l) * D] = acc[l];
  }
}

// Z[i] = Σ_{s = 0..S-1} part[s][i] in this order (i < n = L·D); grid-stride.
// sass-budget: mk::householder::dy_reduce_kernel block=256 regs<=32 spill=0
template <class A>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    dy_reduce_kernel(const A* __restrict__ part, A* __restrict__ Z, int64_t n, int S) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    A s = A(0);
    for (int k = 0; k < S; ++k) s += part[k * n + i];
    Z[i] = s;
  }
}

// Row splits S of the dU reduction: enough blocks to fill a GPU (~256 with the column slices) but partials
// of at most N·elt/(16·L) splits (their write + read ≤ half a pass over x) and ≥ kZRows rows per split.
// A function of the shape only: the summation order (and so every bit of dU) is the same on every device.
inline int dy_splits(int64_t N, int D, int L, int elt) {
  const int64_t slices = ceil_div(D, kThreads);
  int64_t S = ceil_div(256, slices);
  S = std::min<int64_t>(S, std::max<int64_t>(1, N * elt / (16 * static_cast<int64_t>(L))));
  S = std::min<int64_t>(S, ceil_div(N, kZRows));
  return static_cast<int>(std::max<int64_t>(S, 1));
}

// ---- launchers (raw pointers) ----

// Workspace of the prologue (accumulator type): G [L*L], K [2*L*L], Tm [L*L], rn [L].
inline int64_t workspace_elems(int L) { return 4 * static_cast<int64_t>(L) * L + L; }

// Builds K (both orientations), T and rn from U [L, D] (1 <= L <= kMaxL, D >= 1) into `ws`.
template <class T>
cudaError_t launch_wy(const T* U, acc_t<T>* ws, int L, int D, double eps, cudaStream_t stream) {
  using A = acc_t<T>;
  A* G = ws;
  auto gram = gram_kernel<T>;
  MK_LAUNCH(gram, dim3(static_cast<unsigned>(L)), dim3(kGramThreads), 0, stream, U, G, L, D);
  if (cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
  A* K = G + static_cast<int64_t>(L) * L;
  A* Tm = K + 2 * static_cast<int64_t>(L) * L;
  A* rn = Tm + static_cast<int64_t>(L) * L;
  auto wy = wy_kernel<A>;
  MK_LAUNCH(wy, dim3(1), dim3(kMaxL), 0, stream, G, K, Tm, rn, L, static_cast<A>(eps));
  return last_launch_error();
}

template <class T>
inline const acc_t<T>* ws_K(const acc_t<T>* ws, int L, bool transpose) {
  return ws + static_cast<int64_t>(L) * L * (transpose ? 2 : 1);
}
template <class T>
inline const acc_t<T>* ws_T(const acc_t<T>* ws, int L) { return ws + 3 * static_cast<int64_t>(L) * L; }
template <class T>
inline const acc_t<T>* ws_rn(const acc_t<T>* ws, int L) { return ws + 4 * static_cast<int64_t>(L) * L; }

// out = x Hᵀ (transpose: x H) for x [N, D] (N >= 1), with the prologue's workspace `ws`.
template <class T>
cudaError_t launch_apply(const T* x, const T* U, const acc_t<T>* ws, T* out, acc_t<T>* s_out, int64_t N, int D, int L,
                         bool transpose, int num_sms, cudaStream_t stream) {
  const int vec = pick_vec<T>(D, {x, U, out});
  const size_t stage_bytes = static_cast<size_t>(kRows) * D * sizeof(T);
  const bool stage = stage_bytes <= kMaxStageBytes;
  const size_t smem = apply_smem_fixed<T>() + (stage ? stage_bytes : 0);
  (void)num_sms;
  const int64_t grid = ceil_div(N, kRows);  // one tile per block (a grid-stride loop kept r0 & co. live: spills)
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_vec<T>(vec, [&](auto V) {
    auto kernel = apply_kernel<T, decltype(V)::value>;
    // A staged tile above the 48 KiB default: opt in (sm_80: 163 KiB, sm_90: 227 KiB). Through the platform
    // macro, not a raw cudaFuncSetAttribute under !MOKERNELS_EMULATION: the emulator models the limit and
    // rejected every staged launch above 48 KiB (fp32 D > ~1500, bf16 D > ~3000), so that path was never emulated.
    if (smem > 48 * 1024) {
      err = MK_SET_MAX_DYNAMIC_SMEM(kernel, smem);
      if (err != cudaSuccess) return;
    }
    MK_LAUNCH(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), smem, stream, x, U,
              ws_K<T>(ws, L, transpose), ws_rn<T>(ws, L), out, s_out, N, D, L, stage);
    err = last_launch_error();
  });
  return err;
}

// Z = αᵀ g + βᵀ x ([L, D], accumulator type) for alpha, beta [N, L], g, x [N, D] (N >= 1, 1 <= L <= kMaxL).
// part: S·L·D accumulators of scratch (unused when S == 1: the single split writes Z).
template <class T>
cudaError_t launch_dy(const acc_t<T>* alpha, const acc_t<T>* beta, const T* g, const T* x, acc_t<T>* part,
                      acc_t<T>* Z, int64_t N, int D, int L, int S, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = ceil_div(N, S);
  const dim3 grid(static_cast<unsigned>(ceil_div(D, kThreads)), static_cast<unsigned>(S));
  A* out = S == 1 ? Z : part;
  auto go = [&](auto LBc) {
    auto kernel = dy_partial_kernel<T, decltype(LBc)::value>;
    MK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, alpha, beta, g, x, out, N, D, L, rows);
  };
  if (L <= 8) go(std::integral_constant<int, 8>{});
  else if (L <= 16) go(std::integral_constant<int, 16>{});
  else if (L <= 32) go(std::integral_constant<int, 32>{});
  else go(std::integral_constant<int, kMaxL>{});
  if (cudaError_t e = last_launch_error(); e != cudaSuccess || S == 1) return e;
  const int64_t n = static_cast<int64_t>(L) * D;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 1024);
  auto red = dy_reduce_kernel<A>;
  MK_LAUNCH(red, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, part, Z, n, S);
  return last_launch_error();
}

}  // namespace mk::householder
