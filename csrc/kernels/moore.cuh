// MoORE rank-one experts (issue 11 item 2, METHODS.md §4): y = ((x V) ⊙ c) Uᵀ, c = σ + p_task + gx Q
// (clip: relu(c)), as two GEMMs. This file is the first one with the gate fused in; the second
// (y = S Uᵀ) and the backward's plain GEMMs are cuBLAS (csrc/moore.cu / mokernels/ops/moore.py).
//
//   experts_gate_kernel<T, ASYNC, BWD=false>  S[t, i] = (x V)[t, i] · c[t, i]      -> S [T, R] (x's dtype)
//   experts_gate_kernel<T, ASYNC, BWD=true>   reads dS [T, R], recomputes z = x V and gx Q by mma and writes
//       dz = dS ⊙ c, dg = dS ⊙ z (clip: both masked by c > 0) and each T-tile's fp32 column sum of dg
//       (partial [T/64, R]); rank_one::column_sum_kernel then adds the partials in a fixed order: dσ, and
//       dp_task for a shared [R] task gate. Deterministic, no atomics.
// The gate g = p_task + gx Q is NEVER written to memory: gx Q is a second, short K loop (K = d_s, 64 in MoORE)
// of the same pipeline into a second accumulator with the same fragment layout, combined in the epilogue.
//
// Tile geometry: block = 8 warps (256 threads) owns a 64 (tokens) x 128 (R) tile of S; warps are 2 (M) x 4 (N),
// each 32 x 32 = 2 x 4 m16n8k16 tiles, i.e. 2 x 32 fp32 accumulators (z and gx Q) per lane. K steps of 32:
// first ceil(d_in / 32) steps of (x, V), then ceil(d_s / 32) steps of (gx, Q), all through one cp.async double
// buffer (A tile [64][32+8], B tile [32][128+8] stored K x N as in memory, read with ldmatrix.trans; the padded
// rows make every ldmatrix phase bank-conflict free). Edges (T, R, d_in, d_s not multiples of the tile) are
// zero-filled in shared memory. Rows not 16-byte aligned (d_in, R or d_s not a multiple of 8, offset pointers)
// take the same kernel with synchronous element loads (ASYNC = false): slower, same math.
// 1-D grid, R tiles fastest (consecutive blocks share the x tile), int64 token indexing.
//
// Estimate (no GPU in this session: geometry, bytes and FLOPs, not a measurement). H100 SXM: ~990 TFLOP/s dense
// bf16 peak (mma.sync reaches perhaps 60-70 % of it; wgmma more), 3.0 TB/s measured HBM.
//   Square MoORE layer d_in = d_out = R = 4096, d_s = 64, T = 4096 tokens, bf16, H merged into V:
//   * base nn.Linear: 2·T·d_in·d_out = 137 GFLOP, ~0.2 ms at ~700 TFLOP/s (cuBLAS).
//   * floor (issue): two GEMMs of the same size, (d_in + d_out)·R / (d_in·d_out) = 2x the base. The gate adds
//     2·T·d_s·R = 2.1 GFLOP (1.6 %) inside this kernel and no [T, R] gate traffic; S is written once
//     (T·R·2 = 32 MiB) and read once by the second GEMM: ~20 µs of HBM at 3 TB/s against ~200 µs of FLOPs.
//   * this kernel: 64 x 128 tiles -> 64 · 32 = 2048 blocks on 132 SMs; static shared memory 2 x 13.8 KiB =
//     27.6 KiB per block and <= 128 registers (launch bounds 256 x 2) give 2 blocks = 16 warps per SM. Arithmetic
//     intensity per K step: (64 + 128) · 32 · 2 bytes loaded for 2 · 64 · 128 · 32 FLOP = 43 FLOP/byte of
//     L2/shared traffic — enough for mma.sync at ~60 % of peak only if L2 keeps up (V, 32 MiB, and x, 32 MiB,
//     both stay resident in the 50 MiB L2 only partly). A cuBLAS-class GEMM uses 128 x 256 tiles with 3-4
//     stages; this one is likely 1.2-1.6x slower than cuBLAS for the first GEMM, so the layer is estimated at
//     ~2.2-2.6x the base Linear (target 2.0 x 1.05 = 2.1x). Closing the gap: 128 x 128 tiles with 3 stages
//     (64 accumulators per lane more: needs 8 warps as 4 x 2 and a 255-register budget), or wgmma on sm_90a.
//   * the composition it replaces writes and reads z, gx Q, g and the scaled z ([T, R] each, ~4 x 64 MiB
//     round trips: ~90 µs) and runs three GEMMs.
//   * 32 tokens (decode-like): the layer is bandwidth bound on U and V (2 x 32 MiB): ~22 µs floor. One token tile
//     gives only R / 128 = 32 blocks, each a chain of 128 dependent K steps (~1 µs each: latency, not bandwidth):
//     so below one wave the d_in loop is split (fwd_ksplit: 9 splits here, 288 blocks of ~14 + 2 gate steps),
//     fp32 partials of z_s ⊙ c (S is linear in z) go to a [ksplit, T, R] workspace (4.5 MiB at T = 32) and a
//     reduce kernel adds them in order. V is then read once (32 MiB, ~11 µs) + U by cuBLAS: estimated ~30 µs,
//     ~1.4x the floor (the 64-row tile wastes half its mma work at T = 32; a 16- or 32-row tile variant is next).
//   Backward: dS = dy U, dU = dyᵀ S, dx = dz Vᵀ (+ dV = xᵀ dz when V is trained) are cuBLAS GEMMs, this kernel
//   recomputes z and gx Q (one GEMM's worth) instead of reading a saved z: ~4 GEMMs vs the forward's 2, ~2-2.5x.
// Status: compiled for sm_80 and sm_90a (nvcc 13.0: 125-128 registers at the 256 x 2 launch bound, no spills),
// emulated in CI (plain, ASan, TSan strict) against the reference; NOT yet run on a GPU, nothing above is measured.
#pragma once

#include <algorithm>
#include <numeric>

#include "common/async.cuh"
#include "common/mma.cuh"
#include "common/vec.cuh"
#include "rank_one.cuh"

namespace mk::moore {

namespace tile {
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kBlock = kWarpSize * kWarpsM * kWarpsN;  // 256
constexpr int kBM = 64, kBN = 128, kBK = 32;           // block tile (tokens x R) and K step
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 32 x 32 per warp
constexpr int kMT = kWM / 16, kNT = kWN / 8;           // 2 x 4 mma tiles per warp
constexpr int kLdA = kBK + 8;                          // 80-byte rows: conflict-free ldmatrix
constexpr int kLdB = kBN + 8;                          // 272-byte rows
constexpr int kStageA = kBM * kLdA, kStage = kStageA + kBK * kLdB;
static_assert((kLdA * 2) % 16 == 0 && (kLdB * 2) % 16 == 0 && (kStageA * 2) % 16 == 0 && (kStage * 2) % 16 == 0,
              "16-byte aligned shared rows (cp.async, ldmatrix)");
static_assert(kNT % 2 == 0, "B fragments come in pairs of n8 tiles (ldmatrix.x4.trans)");
}  // namespace tile

template <class T>
struct Args {
  const T* x;      // [T, d_in]
  const T* V;      // [d_in, R]
  const T* sigma;  // [R]
  const T* gx;     // [T, d_s] or nullptr (then Q is not read)
  const T* Q;      // [d_s, R]
  const T* p;      // [R] or [T, R] (p_per_token) or nullptr
  int64_t tokens = 0;
  int d_in = 0, R = 0, d_s = 0;
  bool p_per_token = false, clip = false;
  bool pairs = false;          // R even and S, dS, dz, dg, a per-token p 4-byte aligned: 32-bit pair accesses
  T* S = nullptr;              // forward output [T, R]
  const T* dS = nullptr;       // backward input [T, R]
  T* dz = nullptr;             // backward outputs [T, R], nullptr: not written
  T* dg = nullptr;
  float* partial = nullptr;    // [ceil(T / 64), R] fp32 column sums of dg per token tile, nullptr: none
  float* ws = nullptr;         // forward split-K: [ksplit, T, R] fp32 partial S (nullptr: S written directly)
  int ksplit = 1;              // forward: d_in split (grid.y); each split recomputes the short gate loop
};

#if defined(MOKERNELS_EMULATION)
#define MK_MOORE_BOUNDS
#else
#define MK_MOORE_BOUNDS __launch_bounds__(tile::kBlock, 2)
#endif

// sass-budget: mk::moore::experts_gate_kernel block=256 regs<=128 spill=0 hot
template <class T, bool ASYNC, bool BWD>
MK_GLOBAL void MK_MOORE_BOUNDS experts_gate_kernel(const Args<T> a) {
  using namespace tile;
  MK_SHARED_ARRAY_ALIGNED(16, T, stage, 2 * kStage);
  MK_SHARED_ARRAY(float, colsum, kWarpsM * kBN);  // backward: per warp row, dg summed over its 32 tokens
  const int lane = lane_id(), warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t n_tiles = ceil_div(a.R, kBN);
  const int64_t mt = static_cast<int64_t>(blockIdx.x) / n_tiles;
  const int64_t m0 = mt * kBM;
  const int n0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) % n_tiles) * kBN;
  const int nkx = static_cast<int>(ceil_div(a.d_in, kBK));
  const int nkg = a.gx != nullptr ? static_cast<int>(ceil_div(a.d_s, kBK)) : 0;
  // split-K (forward, grid.y = a.ksplit): this block's x steps [kx0, kx1), then all nkg gate steps
  const int sps = static_cast<int>(ceil_div(nkx, a.ksplit));
  const int kx0 = std::min(nkx, static_cast<int>(blockIdx.y) * sps), kx1 = std::min(nkx, kx0 + sps);
  const int nk = (kx1 - kx0) + nkg;
  const T zero = from_acc<T>(0.f);

  // K step kt < nkx: x[m0.., kt*32..] and V[kt*32.., n0..]; then gx / Q over d_s
  auto load = [&](int s, int i) {  // the block's i-th step: K step kt of x (kt < nkx) or of the gate
    const int kt = i < kx1 - kx0 ? kx0 + i : nkx + (i - (kx1 - kx0));
    T* sa = stage + s * kStage;
    T* sb = sa + kStageA;
    const bool gate = kt >= nkx;
    const T* A = gate ? a.gx : a.x;
    const T* B = gate ? a.Q : a.V;
    const int K = gate ? a.d_s : a.d_in, k0 = (gate ? kt - nkx : kt) * kBK;
    if constexpr (ASYNC) {
      for (int c = threadIdx.x; c < kBM * (kBK / 8); c += kBlock) {
        const int row = c / (kBK / 8), col = (c % (kBK / 8)) * 8, kg = k0 + col;
        const int64_t t = m0 + row;
        const bool ok = t < a.tokens && kg < K;
        cp_async_cg_zfill<16>(sa + row * kLdA + col, ok ? A + t * K + kg : A, ok ? 16 : 0);
      }
      for (int c = threadIdx.x; c < kBK * (kBN / 8); c += kBlock) {
        const int row = c / (kBN / 8), col = (c % (kBN / 8)) * 8, kg = k0 + row, n = n0 + col;
        const bool ok = kg < K && n < a.R;
        cp_async_cg_zfill<16>(sb + row * kLdB + col, ok ? B + static_cast<int64_t>(kg) * a.R + n : B, ok ? 16 : 0);
      }
    } else {
      for (int e = threadIdx.x; e < kBM * kBK; e += kBlock) {
        const int row = e / kBK, col = e % kBK, kg = k0 + col;
        const int64_t t = m0 + row;
        sa[row * kLdA + col] = (t < a.tokens && kg < K) ? A[t * K + kg] : zero;
      }
      for (int e = threadIdx.x; e < kBK * kBN; e += kBlock) {
        const int row = e / kBN, col = e % kBN, kg = k0 + row, n = n0 + col;
        sb[row * kLdB + col] = (kg < K && n < a.R) ? B[static_cast<int64_t>(kg) * a.R + n] : zero;
      }
    }
  };

  float accz[kMT][kNT][4] = {}, accg[kMT][kNT][4] = {};
  if (nk > 0) load(0, 0);
  cp_async_commit_group();
  for (int kt = 0; kt < nk; ++kt) {
    const int s = kt & 1;
    if (kt + 1 < nk) load(s ^ 1, kt + 1);
    cp_async_commit_group();
    cp_async_wait_group<1>();  // step kt's tiles have landed (this thread's copies)
    if (MK_MUTABLE("moore.raw_barrier")) block_sync();  // ... and every thread's
    const T* sa = stage + s * kStage;
    const T* sb = sa + kStageA;
    const bool gate = kt >= kx1 - kx0;  // block-uniform
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[kMT][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
        ldmatrix<4>(af[mi], &sa[(wm * kWM + mi * 16 + lane % 16) * kLdA + kk + (lane / 16) * 8]);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bf[4];  // (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        ldmatrix_trans<4>(bf, &sb[(kk + lane % 8 + ((lane / 8) % 2) * 8) * kLdB + wn * kWN + np * 16 + (lane / 16) * 8]);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          if (gate) {
            mma_m16n8k16<T>(accg[mi][2 * np], af[mi], b0, accg[mi][2 * np]);
            mma_m16n8k16<T>(accg[mi][2 * np + 1], af[mi], b1, accg[mi][2 * np + 1]);
          } else {
            mma_m16n8k16<T>(accz[mi][2 * np], af[mi], b0, accz[mi][2 * np]);
            mma_m16n8k16<T>(accz[mi][2 * np + 1], af[mi], b1, accz[mi][2 * np + 1]);
          }
        }
      }
    }
    if (MK_MUTABLE("moore.war_barrier")) block_sync();  // the next step's copies overwrite the other stage
  }

  // epilogue: c = σ + p + gx Q, formed in registers only. Lane holds columns n, n + 1 (n even) of rows g, g + 8:
  // with a.pairs (R even, 4-byte aligned [T, R] pointers) each pair moves as one 32-bit access.
  float cb[kNT][2];  // σ (+ a task gate shared by all tokens) of this lane's columns, loaded once
#pragma unroll
  for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = n0 + wn * kWN + ni * 8 + 2 * (lane % 4) + j;
      cb[ni][j] = n < a.R ? to_acc(a.sigma[n]) + (a.p != nullptr && !a.p_per_token ? to_acc(a.p[n]) : 0.f) : 0.f;
    }
  const bool p_tok = a.p != nullptr && a.p_per_token;
  auto load2 = [&](const T* src, int64_t idx, bool two, float (&v)[2]) {
    if (a.pairs) {
      const Vec<T, 2> w = load_vec<2>(src + idx);
      v[0] = to_acc(w.v[0]);
      v[1] = to_acc(w.v[1]);
    } else {
      v[0] = to_acc(src[idx]);
      v[1] = two ? to_acc(src[idx + 1]) : 0.f;
    }
  };
  auto store2 = [&](T* dst, int64_t idx, bool two, float v0, float v1) {
    if (a.pairs) {
      store_vec<2>(dst + idx, Vec<T, 2>{{from_acc<T>(v0), from_acc<T>(v1)}});
    } else {
      dst[idx] = from_acc<T>(v0);
      if (two) dst[idx + 1] = from_acc<T>(v1);
    }
  };
  float csum[kNT][2] = {};  // backward: this lane's dg column sums
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = mma_c_coord(lane, 2 * h);
        const int64_t t = m0 + wm * kWM + mi * 16 + rc.row;
        const int n = n0 + wn * kWN + ni * 8 + rc.col;
        if (t >= a.tokens || n >= a.R) continue;
        const bool two = n + 1 < a.R;
        const int64_t idx = t * a.R + n;
        float c[2] = {cb[ni][0] + accg[mi][ni][2 * h], cb[ni][1] + accg[mi][ni][2 * h + 1]};
        if (p_tok) {
          float pv[2];
          load2(a.p, idx, two, pv);
          c[0] += pv[0];
          c[1] += pv[1];
        }
        const float z[2] = {accz[mi][ni][2 * h], accz[mi][ni][2 * h + 1]};
        if constexpr (!BWD) {
          if (a.clip) {
            c[0] = c[0] > 0.f ? c[0] : 0.f;
            c[1] = c[1] > 0.f ? c[1] : 0.f;
          }
          if (a.ws != nullptr) {  // split-K: S is linear in z, the splits' z_s ⊙ c add up (fixed order)
            float* w = a.ws + static_cast<int64_t>(blockIdx.y) * a.tokens * a.R + idx;
            w[0] = z[0] * c[0];
            if (two) w[1] = z[1] * c[1];
          } else {
            store2(a.S, idx, two, z[0] * c[0], z[1] * c[1]);
          }
        } else {
          float d[2];
          load2(a.dS, idx, two, d);
          float dz[2], dg[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const bool pass = !a.clip || c[j] > 0.f;  // relu'(c) = 1[c > 0], as torch
            dz[j] = pass ? d[j] * c[j] : 0.f;
            dg[j] = pass ? d[j] * z[j] : 0.f;
            csum[ni][j] += dg[j];  // 0 for a column past R (d = 0 there)
          }
          if (a.dz != nullptr) store2(a.dz, idx, two, dz[0], dz[1]);
          if (a.dg != nullptr) store2(a.dg, idx, two, dg[0], dg[1]);
        }
      }
  if constexpr (BWD) {
    if (a.partial == nullptr) return;  // block-uniform
    // rows of the warp's 32 tokens: lanes with equal lane % 4 hold the same columns (xor 4, 8, 16)
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float v = csum[ni][j];
        v += shfl_xor(v, 4);
        v += shfl_xor(v, 8);
        v += shfl_xor(v, 16);
        if (lane < 4) colsum[wm * kBN + wn * kWN + ni * 8 + 2 * lane + j] = v;
      }
    block_sync();
    for (int c = threadIdx.x; c < kBN; c += kBlock) {
      const int n = n0 + c;
      if (n >= a.R) continue;
      float v = 0.f;
      for (int w = 0; w < kWarpsM; ++w) v += colsum[w * kBN + c];
      a.partial[mt * a.R + n] = v;
    }
  }
}

// Split-K forward: S[i] = Σ_s ws[s, i] in split order, rounded once.
// sass-budget: mk::moore::splitk_reduce_kernel block=256 regs<=40 spill=0
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(256)
    splitk_reduce_kernel(const float* __restrict__ ws, T* __restrict__ S, int64_t n, int ksplit) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < ksplit; ++s)
      if (s > 0 || MK_MUTABLE("moore.splitk_first")) v += ws[s * n + i];
    S[i] = from_acc<T>(v);
  }
}

// Host: the 16-byte cp.async path needs 16-byte aligned rows of x, V, gx, Q.
template <class T>
inline bool can_async(const Args<T>& a) {
  const int64_t n = std::gcd(std::gcd(a.d_in, a.R), a.gx != nullptr ? a.d_s : 0);
  return pick_vec<T>(n, {a.x, a.V, a.gx, a.Q}) * sizeof(T) == 16;
}

// Host: may the epilogue move column pairs as 32-bit accesses?
template <class T>
inline bool can_pair(const Args<T>& a) {
  return pick_vec<T>(a.R, {a.S, a.dS, a.dz, a.dg, a.p_per_token ? a.p : nullptr}) >= 2;
}

inline int64_t token_tiles(int64_t tokens) { return ceil_div(tokens, tile::kBM); }
// Blocks of one launch (1-D grid): at most 2^31 - 1.
inline int64_t grid_blocks(int64_t tokens, int R) { return token_tiles(tokens) * ceil_div(R, tile::kBN); }

// Forward d_in split: below one wave of blocks (decode: T = 32, R = 4096 gives 32 tiles on 132 SMs, each a chain of
// d_in / 32 = 128 dependent K steps) the x steps are split over up to 16 blocks per tile, >= 4 steps each, and
// the fp32 partials [ksplit, T, R] are added by splitk_reduce_kernel. The caller allocates the workspace.
inline int fwd_ksplit(int64_t tokens, int R, int d_in, int num_sms) {
  const int64_t blocks = grid_blocks(tokens, R), nkx = ceil_div(d_in, tile::kBK);
  const int64_t want = ceil_div(2 * static_cast<int64_t>(num_sms), blocks);
  return static_cast<int>(std::clamp<int64_t>(std::min(want, ceil_div(nkx, 4)), 1, 16));
}

// tokens > 0, R > 0, grid_blocks(tokens, R) <= INT32_MAX; forward writes a.S (a.ksplit > 1: a.ws is
// [a.ksplit, T, R] fp32).
template <class T>
cudaError_t launch_fwd(const Args<T>& a, int num_sms, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    auto k = can_async(a) ? experts_gate_kernel<T, true, false> : experts_gate_kernel<T, false, false>;
    MK_LAUNCH(k, dim3(static_cast<unsigned>(grid_blocks(a.tokens, a.R)), static_cast<unsigned>(a.ksplit)),
              dim3(tile::kBlock), 0, stream, a);
    if (a.ksplit > 1) {
      if (const cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
      const int64_t n = a.tokens * a.R;
      const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 8 * static_cast<int64_t>(num_sms));
      auto reduce = splitk_reduce_kernel<T>;
      MK_LAUNCH(reduce, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, stream, a.ws, a.S, n, a.ksplit);
    }
  }
  return last_launch_error();
}

// As launch_fwd; a.dS set, a.dz / a.dg / a.partial optional; with dsigma != nullptr (then a.partial is
// [token_tiles(T), R] fp32) the column sums of dg are added into dsigma [R] (x's dtype).
template <class T>
cudaError_t launch_bwd(const Args<T>& a, T* dsigma, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    auto k = can_async(a) ? experts_gate_kernel<T, true, true> : experts_gate_kernel<T, false, true>;
    MK_LAUNCH(k, dim3(static_cast<unsigned>(grid_blocks(a.tokens, a.R))), dim3(tile::kBlock), 0, stream, a);
    if (const cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
    if (dsigma != nullptr) {
      using namespace rank_one;
      auto reduce = column_sum_kernel<T>;
      MK_LAUNCH(reduce, dim3(static_cast<unsigned>(ceil_div(a.R, kSumCols))), dim3(kSumCols, kSumLanes), 0, stream,
                a.partial, dsigma, token_tiles(a.tokens), static_cast<int64_t>(a.R));
    }
  }
  return last_launch_error();
}

}  // namespace mk::moore
