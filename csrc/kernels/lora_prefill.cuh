// Segmented multi-adapter LoRA, prefill path (METHODS.md §1): a grouped tensor-core GEMM over segments
// for fp16/bf16 when many tokens share an adapter (segments and segment mixtures: every token of a
// segment uses the segment's k adapters). Two launches: a split-K shrink into a small fp32 workspace,
// then the expand.
//
//   y[t, :] = (base[t, :] | y[t, :] | 0) + Σ_j coef_j · B[id_j] (A[id_j] x[t])     (as lora.cuh)
//
// Why the single fused kernel it replaces was ~290 µs over the base GEMM (H200, d = 4096, r = 16, bf16,
// 4096 tokens in 32 segments of 128; no GPU in this session: SASS, geometry and latency reasoning):
//  * grid: 64 real 64-token tiles x 2 d_out chunks = 128 blocks of 4 warps on 132 SMs — one block, 4
//    warps, per SM; each block recomputed its tile's whole shrink (the 2 chunks twice).
//  * the shrink was a chain of d_in / 32 = 128 dependent steps (double buffer: one 5 KiB cp.async step in
//    flight, two block_syncs per step): ~128 HBM/L2 round trips, ~100 µs, whatever the bandwidth.
//  * the expand then walked its 2048 columns in 64 steps of a 1 KiB B tile, again one round trip each,
//    with the epilogue's base reads and y writes serialised behind them: ~50+ µs more.
//  * x (32 MiB) was the only big operand streamed; A (128 KiB per adapter) was re-read from L2 per
//    tile. So the kernel was latency bound at ~4 warps per SM, not bandwidth or FLOP bound.
// Now:
//   0. tile metadata on the device, no host sync (both kernels, prefill_tile): warp 0 walks the segments
//      (32 per step) and finds the tile whose index is blockIdx.x among the pieces [gap before segment 0]
//      [segment 0][gap]...[segment S-1][gap to T] (offsets clamped into [0, T] and made monotone, so any
//      offsets stay in bounds and every token lies in exactly one piece); the grid is the upper bound
//      ceil(T/64) + 2S + 1, blocks past the last tile exit.
//   1. prefill_shrink_kernel, grid (tiles, ksplit): block (tile, s) multiplies x_tile [64, d_in slice s]
//      · A_jᵀ for every valid slot j (mma.sync m16n8k16, warp w owns token rows 16w..16w+15, cp.async
//      double buffer of 32-column steps) over d_in / ksplit columns only, and writes coef_j · its partial
//      h to hp [ksplit, T, k·r16] (fp32; 2 MiB at ksplit = 8). ksplit fills ~4 blocks per SM (8 at
//      the benchmark shape: 512 blocks, 16 steps each instead of 128). Deterministic: no atomics.
//   2. prefill_expand_kernel, grid (tiles, chunks): sums the ksplit partials of its tile's rows (read
//      from L2), rounds H [64, KH] (KH = k_valid · r16 <= 128: the k adapters of a segment mixture are
//      one GEMM with K = KH) to the activation dtype in shared memory, then y_tile [64, 32] += H · Bcatᵀ
//      per 32 output columns (Bcat [32, KH] = the rows of every B_j, double buffered through cp.async);
//      the epilogue adds base (or y in place) and writes y once. No shrink is recomputed per chunk, so
//      chunks fill ~4 blocks per SM (8 chunks: 512 blocks of 16 steps each). Gap tiles and tiles without
//      a valid adapter write y = base (out of place).
// Inputs whose rows are not 16-byte aligned (d_in or r not a multiple of 8, shifted pointers) take the
// same kernels with synchronous element loads into the tiles (ASYNC = false): slower, same math.
//
// Bytes (the floor: everything is memory bound, ~16 FLOP/byte vs the H100's ~300 ridge): shrink reads x
// once (32 MiB) + A per tile from L2; expand reads base (32 MiB) + writes y (32 MiB) + B per tile from
// L2; the workspace round trip is 2 x 2 MiB. ~100 MiB: ~30-35 µs at 3 TB/s, vs the base GEMM's ~180 µs.
// MultiLoRALinear without bias drops the base read: lora_apply writes the delta (base_out=None) and the
// base GEMM accumulates into it (addmm_, beta = 1, cuBLAS reads C in its epilogue).
// Status: compiled (sm_80/sm_90a, no spills), emulated in CI; NOT yet run on a GPU.
#pragma once

#include "common/async.cuh"
#include "common/mma.cuh"
#include "lora.cuh"

namespace mk::lora {

namespace prefill {
constexpr int kBlock = 128;
constexpr int kBM = 64;                        // tokens per tile: 16 rows per warp
constexpr int kBK = 32;                        // d_in columns per shrink step
constexpr int kBN = 32;                        // d_out columns per expand step
constexpr int kMaxKH = 128;                    // k_valid · ceil16(r): H's width
constexpr int kMaxSlots = kMaxKH / 16;         // adapters per segment on this path
constexpr int kLdS = kBK + 8;                  // padded rows (elements): 80 bytes, 16-byte aligned
constexpr int kLdH = kMaxKH + 8;               // 272 bytes
constexpr int kStage = (kBM + kMaxKH) * kLdS;  // one shrink stage: x tile [64][kLdS], A tile [r16][kLdS]
constexpr int kMinTokensPerSegment = 32;       // auto switch: average tokens per segment for this path
constexpr int kMaxKSplit = 16;                 // d_in split of the shrink
constexpr int kMaxChunksExpand = 16;           // d_out split of the expand
// Tile metadata in shared memory: m0, m1, row, k_valid, then per valid slot its id, rank and first column
// in H (ceil16 of the ranks before it: mixed ranks are padded only to the 16-wide mma tile), then KH.
constexpr int kMetaIds = 4, kMetaRanks = kMetaIds + kMaxSlots, kMetaCols = kMetaRanks + kMaxSlots;
constexpr int kMetaLen = kMetaCols + kMaxSlots + 1;
static_assert(2 * kBN * kLdH <= 2 * kStage, "the expand's B stages reuse the shrink's buffer");
static_assert((kLdS * 2) % 16 == 0 && (kLdH * 2) % 16 == 0 && (kStage * 2) % 16 == 0, "16-byte rows");
}  // namespace prefill

// Host: can this path run these arguments? (nullptr: yes; else the reason, for a forced path's error)
template <class T> inline const char* prefill_unsupported(const Args<T>& a) {
  if constexpr (sizeof(T) != 2) {
    return "the tensor-core prefill path takes fp16/bf16 activations";
  } else {
    if (a.offsets == nullptr) return "the tensor-core prefill path needs segments (offsets)";
    if (a.ids == nullptr || a.shared_a) return "the tensor-core prefill path does not take shared A";
    if (static_cast<int64_t>(a.k) * ceil_div(a.r, 16) * 16 > prefill::kMaxKH)
      return "the tensor-core prefill path needs k * ceil16(r) <= 128";
    return nullptr;
  }
}

template <class T>
struct PrefillArgs {
  Args<T> l;
  float* hp;   // [ksplit, T, kh] partial codes (coef folded in), fp32
  int ksplit;  // d_in split of the shrink (grid.y of prefill_shrink_kernel)
  int kh;      // k · ceil16(r): hp's row stride
};

// At least 2 blocks of 128 threads per SM (<= 255 registers): with only the 128-thread bound ptxas
// (CUDA 13.0) capped the sm_90a element-load variant at 128 registers and spilled 16 bytes. 48 KiB of
// static shared memory per block allows 4 blocks per SM on sm_90 (H100), 3 on sm_80 (A100).
#if defined(MOKERNELS_EMULATION)
#define MK_LORA_PREFILL_BOUNDS
#else
#define MK_LORA_PREFILL_BOUNDS __launch_bounds__(prefill::kBlock, 2)
#endif

// Phase 0 of both kernels, all threads: which tile blockIdx.x is (see the header) -> meta = {m0, m1, row
// (-1 gap, -2 past the end), k_valid, ids, ranks, H columns, KH} (prefill::kMeta*), scoef = the valid
// slots' coefficients. A slot whose adapter has rank 0 is dropped like an invalid id.
struct TileInfo {
  int64_t m0, m1;  // the tile's tokens [m0, m1)
  int row, nv;     // routing row (-1 gap, -2 past the end), valid slots
};
template <class T>
MK_DEVICE TileInfo prefill_tile(const Args<T>& a, int32_t* meta, float* scoef) {
  using namespace prefill;
  const int64_t T_ = a.tokens;
  // warp 0 walks the pieces 32 at a time, one per lane (max-scan of the
  // clamped ends, sum-scan of their tile counts, ballot for the piece holding tile blockIdx.x)
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  if (warp == 0) {
    const int64_t b = blockIdx.x, np = 2 * static_cast<int64_t>(a.segs) + 1;
    int64_t cur = 0, first = 0, m0 = 0, m1 = 0;  // end of the pieces walked so far, their tiles
    int row = -2;
    for (int64_t p0 = 0; p0 < np; p0 += kWarpSize) {
      const int64_t p = p0 + lane, s = p / 2;
      int64_t end = cur;
      if (p < np) {
        const int64_t raw = p % 2 == 1 ? a.offsets[s + 1] : (s < a.segs ? a.offsets[s] : T_);
        end = std::min(T_, std::max(cur, raw));
      }
      for (int d = 1; d < kWarpSize; d *= 2) {
        const int64_t v = shfl_idx(end, lane - d);
        if (lane >= d) end = std::max(end, v);
      }
      int64_t start = shfl_idx(end, lane - 1);
      if (lane == 0) start = cur;
      const int64_t n = ceil_div(end - start, kBM);
      int64_t incl = n;
      for (int d = 1; d < kWarpSize; d *= 2) {
        const int64_t v = shfl_idx(incl, lane - d);
        if (lane >= d) incl += v;
      }
      const uint32_t hit = ballot(b >= first + incl - n && b < first + incl);
      if (hit != 0) {  // warp-uniform
        int L = 0;
        while (((hit >> L) & 1u) == 0) ++L;
        const int64_t ps = shfl_idx(p, L), st = shfl_idx(start, L), en = shfl_idx(end, L);
        const int64_t f = shfl_idx(first + incl - n, L);
        row = ps % 2 == 1 ? static_cast<int>(ps / 2) : -1;
        m0 = st + (b - f) * kBM;
        m1 = std::min(en, m0 + kBM);
        break;
      }
      first += shfl_idx(incl, kWarpSize - 1);
      cur = shfl_idx(end, kWarpSize - 1);
    }
    if (lane == 0) {
      int nv = 0, kh = 0;
      for (int j = 0; row >= 0 && j < a.k; ++j) {
        float c = 0.f;
        const int id = slot_adapter(a, row, true, j, c);
        const int rn = id >= 0 ? rank_of(a, id) : 0;
        if (rn == 0) continue;
        meta[kMetaIds + nv] = id;
        meta[kMetaRanks + nv] = rn;
        meta[kMetaCols + nv] = kh;
        kh += static_cast<int>(ceil_div(rn, 16)) * 16;
        scoef[nv] = c;
        ++nv;
      }
      meta[kMetaCols + nv] = kh;
      meta[0] = static_cast<int32_t>(m0);
      meta[1] = static_cast<int32_t>(m1);
      meta[2] = row;
      meta[3] = nv;
    }
  }
  block_sync();
  return {meta[0], meta[1], meta[2], meta[3]};
}

// sass-budget: mk::lora::prefill_shrink_kernel block=128 regs<=160 spill=0 hot
template <class T, bool ASYNC>
MK_GLOBAL void MK_LORA_PREFILL_BOUNDS prefill_shrink_kernel(const PrefillArgs<T> p) {
  using namespace prefill;
  const Args<T>& a = p.l;
  MK_SHARED_ARRAY_ALIGNED(16, T, stage, 2 * kStage);
  MK_SHARED_ARRAY(int32_t, meta, kMetaLen);
  MK_SHARED_ARRAY(float, scoef, kMaxSlots);
  const int64_t T_ = a.tokens;
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  const TileInfo ti = prefill_tile(a, meta, scoef);
  const int64_t m0 = ti.m0, m1 = ti.m1;
  const int nv = ti.nv;
  if (ti.row < 0 || nv == 0) return;  // block-uniform: gap, past the end, or no adapter (H not read)
  const SliceView<T> sv = slice_view(a, blockIdx.z);  // grid.z: the output slice (its own A)
  const int d_in = a.d_in;
  float* hp = p.hp + static_cast<int64_t>(blockIdx.z) * p.ksplit * T_ * p.kh;
  const T zero = from_acc<T>(0.f);
  const int ks = blockIdx.y, nk = static_cast<int>(ceil_div(d_in, kBK));
  const int sps = static_cast<int>(ceil_div(nk, p.ksplit));
  const int kt0 = std::min(nk, ks * sps), kt1 = std::min(nk, kt0 + sps);  // empty: writes zeros

  // shrink, slot by slot, over this block's d_in steps [kt0, kt1), into its partial of H
  for (int j = 0; j < nv; ++j) {
    const T* Aj = sv.A + static_cast<int64_t>(meta[kMetaIds + j]) * a.r * d_in;
    const int r = meta[kMetaRanks + j], r16 = static_cast<int>(ceil_div(r, 16)) * 16;  // rows past r: not read
    auto load = [&](int s, int k0) {  // x rows [m0, m0+64) and A_j rows [0, r16), columns [k0, k0+32)
      T* sx = stage + s * kStage;
      T* sa = sx + kBM * kLdS;
      if constexpr (ASYNC) {
        for (int c = threadIdx.x; c < (kBM + r16) * (kBK / 8); c += kBlock) {
          const int row = c / (kBK / 8), col = (c % (kBK / 8)) * 8, kg = k0 + col;
          if (row < kBM) {
            const bool ok = m0 + row < m1 && kg < d_in;
            cp_async_cg_zfill<16>(sx + row * kLdS + col, ok ? a.x + (m0 + row) * d_in + kg : a.x, ok ? 16 : 0);
          } else {
            const int rr = row - kBM;
            const bool ok = rr < r && kg < d_in;
            cp_async_cg_zfill<16>(sa + rr * kLdS + col, ok ? Aj + static_cast<int64_t>(rr) * d_in + kg : Aj, ok ? 16 : 0);
          }
        }
      } else {
        for (int e = threadIdx.x; e < (kBM + r16) * kBK; e += kBlock) {
          const int row = e / kBK, col = e % kBK, kg = k0 + col;
          if (row < kBM)
            sx[row * kLdS + col] = (m0 + row < m1 && kg < d_in) ? a.x[(m0 + row) * d_in + kg] : zero;
          else
            sa[(row - kBM) * kLdS + col] = (row - kBM < r && kg < d_in) ? Aj[static_cast<int64_t>(row - kBM) * d_in + kg] : zero;
        }
      }
    };
    float acc[kMaxKH / 8][4] = {};
    if (kt0 < kt1) load(0, kt0 * kBK);
    cp_async_commit_group();
    for (int kt = kt0; kt < kt1; ++kt) {
      const int s = (kt - kt0) & 1;
      if (kt + 1 < kt1) load(s ^ 1, (kt + 1) * kBK);
      cp_async_commit_group();
      cp_async_wait_group<1>();  // step kt's tiles have landed (this thread's copies)
      block_sync();              // ... and every thread's
      const T* sx = stage + s * kStage;
      const T* sa = sx + kBM * kLdS;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[4];
        ldmatrix<4>(af, &sx[(warp * 16 + lane % 16) * kLdS + kk + (lane / 16) * 8]);
#pragma unroll
        for (int np = 0; np < kMaxKH / 16; ++np) {
          if (np * 16 >= r16) break;
          uint32_t bf[4];
          ldmatrix<4>(bf, &sa[(np * 16 + lane % 8 + (lane / 16) * 8) * kLdS + kk + ((lane / 8) % 2) * 8]);
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          mma_m16n8k16<T>(acc[2 * np], af, b0, acc[2 * np]);
          mma_m16n8k16<T>(acc[2 * np + 1], af, b1, acc[2 * np + 1]);
        }
      }
      block_sync();  // the next step's copies overwrite the other stage; the one after, this one
    }
    const float cj = scoef[j];
#pragma unroll
    for (int nt = 0; nt < kMaxKH / 8; ++nt) {
      if (nt * 8 >= r16) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        const int64_t t = m0 + warp * 16 + rc.row;  // rows past m1 belong to the next tile: not written
        if (t < m1) hp[(static_cast<int64_t>(ks) * T_ + t) * p.kh + meta[kMetaCols + j] + nt * 8 + rc.col] = cj * acc[nt][i];
      }
    }
  }
}

// sass-budget: mk::lora::prefill_expand_kernel block=128 regs<=160 spill=0 hot
template <class T, bool ASYNC>
MK_GLOBAL void MK_LORA_PREFILL_BOUNDS prefill_expand_kernel(const PrefillArgs<T> p) {
  using namespace prefill;
  const Args<T>& a = p.l;
  MK_SHARED_ARRAY_ALIGNED(16, T, stage, 2 * kBN * kLdH);
  MK_SHARED_ARRAY_ALIGNED(16, T, hs, kBM * kLdH);
  MK_SHARED_ARRAY(int32_t, meta, kMetaLen);
  MK_SHARED_ARRAY(float, scoef, kMaxSlots);
  const int64_t T_ = a.tokens;
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  const TileInfo ti = prefill_tile(a, meta, scoef);
  const int64_t m0 = ti.m0, m1 = ti.m1;
  const int nv = ti.nv;
  if (ti.row == -2) return;  // block-uniform: past the last tile
  // grid.z: the output slice, its columns [sv.col, sv.col + sv.d_out) of y; o below is slice-local
  const SliceView<T> sv = slice_view(a, blockIdx.z);
  T* const ys = a.y + sv.col;
  const T* const bs = a.base != nullptr ? a.base + sv.col : nullptr;
  const float* hp = p.hp + static_cast<int64_t>(blockIdx.z) * p.ksplit * T_ * p.kh;
  const int64_t cw = ceil_div(ceil_div(sv.d_out, gridDim.y), kBN) * kBN;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * cw, c1 = std::min<int64_t>(sv.d_out, c0 + cw);
  if (c0 >= c1) return;
  if (nv == 0) {  // gap or no adapter: the base passes through
    if (!a.accumulate)
      for (int64_t e = threadIdx.x; e < (m1 - m0) * (c1 - c0); e += kBlock) {
        const int64_t t = m0 + e / (c1 - c0), o = c0 + e % (c1 - c0);
        ys[t * a.d_out + o] = bs != nullptr ? bs[t * a.d_out + o] : from_acc<T>(0.f);
      }
    return;
  }
  const int r = a.r, KH = meta[kMetaCols + nv];  // H: the valid slots' ceil16(rank) columns each
  const T zero = from_acc<T>(0.f);
  // H tile [64, KH] = the sum of the shrink's ksplit partials (fp32, L2), rounded once to T
  for (int e = threadIdx.x; e < kBM * KH; e += kBlock) {
    const int m = e / KH, c = e % KH;
    float v = 0.f;
    if (m0 + m < m1)
      for (int ks = 0; ks < p.ksplit; ++ks) v += hp[(static_cast<int64_t>(ks) * T_ + m0 + m) * p.kh + c];
    hs[m * kLdH + c] = from_acc<T>(v);
  }
  block_sync();

  // 2. expand: 32 output columns per step, B tiles double buffered
  auto slot_of = [&](int col) {  // the valid slot whose H columns hold col
    int j = 0;
    while (j + 1 < nv && col >= meta[kMetaCols + j + 1]) ++j;
    return j;
  };
  auto load_b = [&](int s, int64_t o0) {  // Bcat rows [o0, o0+32), columns [0, KH); B columns past a rank: 0, not read
    T* sb = stage + s * (kBN * kLdH);
    if constexpr (ASYNC) {
      for (int c = threadIdx.x; c < kBN * (KH / 8); c += kBlock) {
        const int row = c / (KH / 8), col = (c % (KH / 8)) * 8, j = slot_of(col), q = col - meta[kMetaCols + j];
        const int64_t o = o0 + row;
        const int bytes = o < c1 ? std::max(0, std::min(8, meta[kMetaRanks + j] - q)) * static_cast<int>(sizeof(T)) : 0;
        const T* src = sv.B + (static_cast<int64_t>(meta[kMetaIds + j]) * sv.d_out + (bytes > 0 ? o : 0)) * r + (bytes > 0 ? q : 0);
        cp_async_cg_zfill<16>(sb + row * kLdH + col, src, bytes);
      }
    } else {
      for (int e = threadIdx.x; e < kBN * KH; e += kBlock) {
        const int row = e / KH, col = e % KH, j = slot_of(col), q = col - meta[kMetaCols + j];
        const int64_t o = o0 + row;
        sb[row * kLdH + col] = (o < c1 && q < meta[kMetaRanks + j])
                                   ? sv.B[(static_cast<int64_t>(meta[kMetaIds + j]) * sv.d_out + o) * r + q] : zero;
      }
    }
  };
  const int nct = static_cast<int>(ceil_div(c1 - c0, kBN));
  load_b(0, c0);
  cp_async_commit_group();
  for (int ct = 0; ct < nct; ++ct) {
    if (ct + 1 < nct) load_b((ct + 1) & 1, c0 + static_cast<int64_t>(ct + 1) * kBN);
    cp_async_commit_group();
    cp_async_wait_group<1>();
    block_sync();
    const T* sb = stage + (ct & 1) * (kBN * kLdH);
    float acc[kBN / 8][4] = {};
    for (int kk = 0; kk < KH; kk += 16) {
      uint32_t af[4];
      ldmatrix<4>(af, &hs[(warp * 16 + lane % 16) * kLdH + kk + (lane / 16) * 8]);
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix<4>(bf, &sb[(np * 16 + lane % 8 + (lane / 16) * 8) * kLdH + kk + ((lane / 8) % 2) * 8]);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma_m16n8k16<T>(acc[2 * np], af, b0, acc[2 * np]);
        mma_m16n8k16<T>(acc[2 * np + 1], af, b1, acc[2 * np + 1]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        const int64_t t = m0 + warp * 16 + rc.row, o = c0 + static_cast<int64_t>(ct) * kBN + nt * 8 + rc.col;
        if (t < m1 && o < c1) {
          T* yp = ys + t * a.d_out + o;
          const float prev = a.accumulate ? to_acc(*yp) : (bs != nullptr ? to_acc(bs[t * a.d_out + o]) : 0.f);
          *yp = from_acc<T>(prev + acc[nt][i]);
        }
      }
    block_sync();  // the next step's copies overwrite the other stage; the one after, this one
  }
}

// Workspace of the prefill path: the shrink's partials [ksplit, T, k · ceil16(r)] fp32.
inline int prefill_ksplit(int64_t tokens, int segs, int d_in, int num_sms) {
  using namespace prefill;
  const int64_t real_tiles = ceil_div(tokens, kBM) + segs;  // about: one partial tile per segment
  const int64_t nk = ceil_div(d_in, kBK);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * int64_t(num_sms), real_tiles), nk, kMaxKSplit})));
}
inline size_t prefill_workspace_bytes(int64_t tokens, int k, int r, int ksplit, int slices = 1) {
  return static_cast<size_t>(slices) * ksplit * tokens * k * ceil_div(r, 16) * 16 * sizeof(float);
}

// Launcher: prefill_unsupported(p.l) == nullptr, tokens > 0, d_out > 0; p.hp sized by
// prefill_workspace_bytes(.., p.ksplit), p.kh = k · ceil16(r).
template <class T>
cudaError_t launch_prefill(const PrefillArgs<T>& p, int num_sms, cudaStream_t stream) {
  using namespace prefill;
  const Args<T>& a = p.l;
  const int64_t tiles = ceil_div(a.tokens, kBM) + 2 * static_cast<int64_t>(a.segs) + 1;  // upper bound
  const int64_t real_tiles = ceil_div(a.tokens, kBM) + a.segs;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * int64_t(num_sms), real_tiles),
                                                                  ceil_div(max_slice_d_out(a), 2 * kBN), kMaxChunksExpand}));
  bool async = pick_vec<T>(std::gcd(a.d_in, a.r), {a.x, a.A, a.B}) * sizeof(T) == 16;
  for (int s = 0; s < a.slices; ++s) async = async && pick_vec<T>(std::gcd(a.d_in, a.r), {a.sA[s], a.sB[s]}) * sizeof(T) == 16;
  const unsigned nsl = static_cast<unsigned>(num_slices(a));
  if constexpr (sizeof(T) == 2) {
    auto shrink = async ? prefill_shrink_kernel<T, true> : prefill_shrink_kernel<T, false>;
    MK_LAUNCH(shrink, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.ksplit), nsl), dim3(kBlock), 0, stream, p);
    if (const cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
    auto expand = async ? prefill_expand_kernel<T, true> : prefill_expand_kernel<T, false>;
    MK_LAUNCH(expand, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks), nsl), dim3(kBlock), 0, stream, p);
  }
  return last_launch_error();
}

}  // namespace mk::lora
