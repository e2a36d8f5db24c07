// Rank-one expert scaling (MoORE, METHODS.md §4): out = z ⊙ (σ + g), z, g: [T, R], σ: [R].
// Memory bound: each element is read once and written once with 16-byte vector accesses where the
// row length and pointers allow. Backward fuses dz, dg and the column reduction dσ = Σ_t grad ⊙ z
// (per-block partial sums in fp32, then a deterministic second pass — no atomics).
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
  int64_t partial_rows = 0;  // backward: rows of the fp32 dσ partial-sum workspace (= grid.y)
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

// dz = grad ⊙ (σ + g), dg = grad ⊙ z, partial[blockIdx.y, c] = Σ over this block's rows of grad ⊙ z.
// Dynamic shared memory: blockDim.x * blockDim.y * VEC accumulators.
template <class T, int VEC>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    scale_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ z, const T* __restrict__ sigma,
                     const T* __restrict__ g, T* __restrict__ dz, T* __restrict__ dg,
                     acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < cols;  // inactive threads still reach the barrier
  A acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = A(0);
  if (active) {
    const Vec<T, VEC> s = load_vec<VEC>(sigma + c);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
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
  MK_DYNAMIC_SHARED(A, red);
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) red[slot + i] = acc[i];
  if (MK_MUTABLE("rank_one.bwd.barrier")) block_sync();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      A s = A(0);
      for (unsigned y = 0; y < blockDim.y; ++y) s += red[(y * blockDim.x + threadIdx.x) * VEC + i];
      partial[static_cast<int64_t>(blockIdx.y) * cols + c + i] = s;
    }
  }
}

// out[c] = Σ_p partial[p, c], summed in a fixed order (deterministic).
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    column_sum_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t parts, int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  acc_t<T> s = 0;
  for (int64_t p = 0; p < parts; ++p) s += partial[p * cols + c];
  out[c] = from_acc<T>(s);
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

// Plan for the backward; the caller allocates p.partial_rows * cols accumulators (acc_t<T>).
template <class T>
Plan plan_bwd(const T* grad, const T* z, const T* sigma, const T* g, const T* dz, const T* dg, int64_t rows,
              int64_t cols, int num_sms) {
  const int vec = pick_vec<T>(cols, {grad, z, sigma, g, dz, dg});
  // ~4 blocks per SM, no more: the dσ partial sums (one row per row-block) stay small.
  return make_plan(rows, cols, vec, row_blocks_for(make_plan(rows, cols, vec, 65535), num_sms, 4));
}

template <class T>
cudaError_t launch_bwd(const Plan& p, const T* grad, const T* z, const T* sigma, const T* g, T* dz, T* dg,
                       acc_t<T>* partial, T* dsigma, int64_t rows, int64_t cols, cudaStream_t stream) {
  dispatch_vec<T>(p.vec, [&](auto V) {
    constexpr int VEC = decltype(V)::value;
    auto kernel = scale_bwd_kernel<T, VEC>;
    const size_t smem = static_cast<size_t>(p.block.x) * p.block.y * VEC * sizeof(acc_t<T>);
    MK_LAUNCH(kernel, p.grid, p.block, smem, stream, grad, z, sigma, g, dz, dg, partial, rows, cols);
  });
  if (cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
  auto reduce = column_sum_kernel<T>;
  MK_LAUNCH(reduce, dim3(static_cast<unsigned>(ceil_div(cols, kThreads))), dim3(kThreads), 0, stream, partial,
            dsigma, p.partial_rows, cols);
  return last_launch_error();
}

}  // namespace mk::rank_one
