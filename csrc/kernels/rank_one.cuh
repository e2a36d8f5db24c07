// Rank-one expert scaling (MoORE, METHODS.md §4): out = z ⊙ (σ + g), z, g: [T, R], σ: [R].
// Memory bound: each element is read once and written once with 16-byte vector accesses where the
// row length and pointers allow. Backward fuses dz, dg and the column reduction dσ = Σ_t grad ⊙ z
// (fixed row chunks summed in fp32, then a parallel fixed-order second pass — no atomics; the bits
// of dσ do not depend on the grid, i.e. on the GPU's SM count).
#pragma once

#include <algorithm>

#include "common/dtype.cuh"
#include "common/vec.cuh"

namespace mk::rank_one {

constexpr int kThreads = 256;

// Block = (bx column vectors) x (by rows); grid.x covers the columns, grid.y strides over rows.
struct Plan {
  dim3 grid, block;
  int vec = 1;
  int64_t partial_rows = 0;  // backward: rows of the fp32 dσ partial-sum workspace (row chunks)
  int64_t chunk_rows = 0;    // backward: rows per chunk (a multiple of block.y)
};

inline Plan make_plan(int64_t rows, int64_t cols, int vec, int64_t max_grid_y) {
  const int64_t chunks = ceil_div(cols, vec);
  int bx = 1;
  while (bx < chunks && bx < kThreads) bx *= 2;
  const int by = kThreads / bx;
  Plan p;
  p.vec = vec;
  p.block = dim3(bx, by);
  const int64_t gy = std::clamp<int64_t>(ceil_div(rows, by), 1, std::min<int64_t>(max_grid_y, 65535));
  p.grid = dim3(static_cast<unsigned>(ceil_div(chunks, bx)), static_cast<unsigned>(gy));
  p.partial_rows = gy;
  return p;
}

// sass-budget: mk::rank_one::scale_fwd_kernel block=256 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    scale_fwd_kernel(const T* __restrict__ z, const T* __restrict__ sigma, const T* __restrict__ g,
                     T* __restrict__ out, int64_t rows, int64_t cols) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols && MK_MUTABLE("rank_one.fwd.guard")) return;  // no barrier below: early exit is safe
  const Vec<T, VEC> s = load_vec<VEC>(sigma + c);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t off = r * cols + c;
    const Vec<T, VEC> zv = load_vec<VEC>(z + off), gv = load_vec<VEC>(g + off);
    Vec<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_acc<T>(to_acc(zv.v[i]) * (to_acc(s.v[i]) + to_acc(gv.v[i])));
    store_vec(out + off, o);
  }
}

// dσ = Σ_t grad ⊙ z, deterministic and independent of the GPU's SM count (issue 8):
//  * the rows are cut into `parts` fixed chunks of `chunk_rows` rows (a multiple of blockDim.y),
//    chosen from the shape alone (plan_bwd), never from the grid; a block walks chunks
//    blockIdx.y, blockIdx.y + gridDim.y, ... (the grid only decides *who* sums a chunk, not how);
//  * inside a chunk thread (x, y) sums rows y, y + blockDim.y, ... in order, then the block adds its
//    blockDim.y accumulators by a fixed shared-memory tree -> partial[chunk, c];
//  * column_sum_kernel adds the `parts` partial rows per column, in parallel across threads and
//    blocks (32 columns x 8 row-lanes per block, each lane a fixed stride, a fixed tree over the
//    lanes): no atomics, no single-thread chain of ~parts dependent L2 round trips.
// Bytes per backward: 5·T·R·elt (grad, z, g in; dz, dg out) + 2·parts·R·4 (partial out and in),
// parts <= kMaxParts = 256 -> at T = 65536, R = 4096, bf16: 2.68 GB + 8 MB (0.3 %).
// Instructions per element: ~6 (2 cvt, 3 FMA/FMUL, 2 cvt back) per 16-byte vector of 8 bf16 plus
// the loop; memory bound by ~10x on an H100 at 1 element per ~0.2 ns. Registers (SASS report, bf16
// VEC 8, sm_80 / sm_90a): scale_bwd 48 / 48 (4 LDG.E.128 per iteration: σ, grad, z, g), column_sum
// 32 / 32, scale_fwd 30 / 32; no spills.
// sass-budget: mk::rank_one::scale_bwd_kernel block=256 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    scale_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ z, const T* __restrict__ sigma,
                     const T* __restrict__ g, T* __restrict__ dz, T* __restrict__ dg,
                     acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols, int64_t chunk_rows,
                     int64_t parts) {
  using A = acc_t<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < cols;  // inactive threads still reach the barriers
  Vec<T, VEC> s{};
  if (active) s = load_vec<VEC>(sigma + c);
  MK_DYNAMIC_SHARED(A, red);  // [blockDim.y][blockDim.x * VEC]
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
  const int stride = blockDim.x * VEC;
  for (int64_t part = blockIdx.y; part < parts; part += gridDim.y) {  // block-uniform
    A acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = A(0);
    const int64_t r1 = (part + 1) * chunk_rows < rows ? (part + 1) * chunk_rows : rows;
    if (active) {
      for (int64_t r = part * chunk_rows + threadIdx.y; r < r1; r += blockDim.y) {
        const int64_t off = r * cols + c;
        const Vec<T, VEC> gr = load_vec<VEC>(grad + off), zv = load_vec<VEC>(z + off), gv = load_vec<VEC>(g + off);
        Vec<T, VEC> dzv, dgv;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const A go = to_acc(gr.v[i]);
          const A prod = go * to_acc(zv.v[i]);
          dzv.v[i] = from_acc<T>(go * (to_acc(s.v[i]) + to_acc(gv.v[i])));
          dgv.v[i] = from_acc<T>(prod);
          acc[i] += prod;
        }
        store_vec(dz + off, dzv);
        store_vec(dg + off, dgv);
      }
    }
    if (blockDim.y == 1) {  // block-uniform: nothing to combine
      if (active)
#pragma unroll
        for (int i = 0; i < VEC; ++i) partial[part * cols + c + i] = acc[i];
      continue;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) red[slot + i] = acc[i];
    if (MK_MUTABLE("rank_one.bwd.barrier")) block_sync();
    for (unsigned h = blockDim.y / 2; h > 0; h /= 2) {  // blockDim.y is a power of two
      if (threadIdx.y < h)
#pragma unroll
        for (int i = 0; i < VEC; ++i) red[slot + i] += red[slot + h * stride + i];
      block_sync();
    }
    if (threadIdx.y == 0 && active)
#pragma unroll
      for (int i = 0; i < VEC; ++i) partial[part * cols + c + i] = red[slot + i];
    block_sync();  // red is rewritten by the next chunk
  }
}

constexpr int kSumCols = 32, kSumLanes = 8;  // column_sum_kernel block: 32 columns x 8 lanes

// out[c] = Σ_p partial[p, c]: lane y of a column adds p = y, y + 8, ... in order, then a fixed tree
// over the 8 lanes. Deterministic; 256 threads per 32 columns, coalesced 128-byte rows.
// sass-budget: mk::rank_one::column_sum_kernel block=256 regs<=64 spill=0
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kSumCols* kSumLanes)
    column_sum_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t parts, int64_t cols) {
  using A = acc_t<T>;
  MK_SHARED_ARRAY(A, red, kSumLanes * kSumCols);  // [lane][column]
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  A s = A(0);
  if (c < cols)
    for (int64_t p = threadIdx.y; p < parts; p += kSumLanes) s += partial[p * cols + c];
  red[threadIdx.y * kSumCols + threadIdx.x] = s;
  block_sync();
#pragma unroll
  for (int h = kSumLanes / 2; h > 0; h /= 2) {
    if (static_cast<int>(threadIdx.y) < h)
      red[threadIdx.y * kSumCols + threadIdx.x] += red[(threadIdx.y + h) * kSumCols + threadIdx.x];
    block_sync();
  }
  if (threadIdx.y == 0 && c < cols) out[c] = from_acc<T>(red[threadIdx.x]);
}

// ---- launchers (raw pointers; rows * cols > 0; contiguous row-major [rows, cols]) ----

// Row-blocks for about `blocks_per_sm` blocks per SM in all; threads then stride over the rest of the rows.
inline int64_t row_blocks_for(const Plan& probe, int num_sms, int blocks_per_sm) {
  return std::max<int64_t>(1, ceil_div(static_cast<int64_t>(blocks_per_sm) * num_sms, probe.grid.x));
}

template <class T>
cudaError_t launch_fwd(const T* z, const T* sigma, const T* g, T* out, int64_t rows, int64_t cols, int num_sms,
                       cudaStream_t stream) {
  const int vec = pick_vec<T>(cols, {z, sigma, g, out});
  // 16 blocks of 256 threads per SM: two waves of full occupancy, then a grid-stride loop over rows.
  const Plan p = make_plan(rows, cols, vec, row_blocks_for(make_plan(rows, cols, vec, 65535), num_sms, 16));
  dispatch_vec<T>(p.vec, [&](auto V) {
    auto kernel = scale_fwd_kernel<T, decltype(V)::value>;
    MK_LAUNCH(kernel, p.grid, p.block, 0, stream, z, sigma, g, out, rows, cols);
  });
  return last_launch_error();
}

constexpr int64_t kMaxParts = 256;  // most dσ partial rows (fp32 workspace: kMaxParts x cols)

// Plan for the backward; the caller allocates p.partial_rows * cols accumulators (acc_t<T>).
// The chunking (chunk_rows, partial_rows) depends on (rows, cols, alignment) only; num_sms only sets
// how many blocks share the chunks, so dσ has the same bits on every GPU.
template <class T>
Plan plan_bwd(const T* grad, const T* z, const T* sigma, const T* g, const T* dz, const T* dg, int64_t rows,
              int64_t cols, int num_sms) {
  const int vec = pick_vec<T>(cols, {grad, z, sigma, g, dz, dg});
  Plan p = make_plan(rows, cols, vec, 65535);
  const int64_t by = p.block.y;
  // chunks of whole block-rows, at least 4 rows per thread, at most kMaxParts chunks
  p.chunk_rows = by * std::max<int64_t>(4, ceil_div(rows, by * kMaxParts));
  p.partial_rows = ceil_div(rows, p.chunk_rows);
  // ~4 blocks per SM in all; blocks loop over the chunks beyond that
  const int64_t gy = std::min<int64_t>(p.partial_rows, row_blocks_for(p, num_sms, 4));
  p.grid.y = static_cast<unsigned>(std::clamp<int64_t>(gy, 1, 65535));
  return p;
}

template <class T>
cudaError_t launch_bwd(const Plan& p, const T* grad, const T* z, const T* sigma, const T* g, T* dz, T* dg,
                       acc_t<T>* partial, T* dsigma, int64_t rows, int64_t cols, cudaStream_t stream) {
  dispatch_vec<T>(p.vec, [&](auto V) {
    constexpr int VEC = decltype(V)::value;
    auto kernel = scale_bwd_kernel<T, VEC>;
    const size_t smem = static_cast<size_t>(p.block.x) * p.block.y * VEC * sizeof(acc_t<T>);
    MK_LAUNCH(kernel, p.grid, p.block, smem, stream, grad, z, sigma, g, dz, dg, partial, rows, cols, p.chunk_rows,
              p.partial_rows);
  });
  if (cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
  auto reduce = column_sum_kernel<T>;
  MK_LAUNCH(reduce, dim3(static_cast<unsigned>(ceil_div(cols, kSumCols))), dim3(kSumCols, kSumLanes), 0, stream,
            partial, dsigma, p.partial_rows, cols);
  return last_launch_error();
}

}  // namespace mk::rank_one
