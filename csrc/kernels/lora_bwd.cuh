// Segmented multi-adapter LoRA, backward (METHODS.md §1; forward: lora.cuh / lora_prefill.cuh).
// For a token t routed to slots j (adapter i_j, coef_j = w_j · s_i, slots with an id outside [0, N)
// or a token outside every segment dropped):
//
//   u_j      = B_iᵀ dy[t]                      (r values)         h_j = A_i x[t]  (r values)
//   dx[t]    = Σ_j coef_j A_iᵀ u_j
//   dw[t, j] = s_i · u_j · h_j                 (segment forms: summed over the segment's tokens)
//   dA_i     = Σ_(t,j on i) coef_j u_j x[t]ᵀ   dB_i = Σ_(t,j on i) coef_j dy[t] h_jᵀ
//   shared A: h = A x[t] once, dh = Σ_j coef_j u_j, dx = Aᵀ dh, dA = Σ_t dh x[t]ᵀ (one group, all tokens).
//
// Slots with coef 0 are skipped for dx / dA / dB (their adapter is not read, as in the forward) but
// still get their weight's gradient dw (then A_i and B_i are read). Everything is deterministic
// without atomics: every output element is written by exactly one thread, summing in a fixed order.
//
// Launches (all 128-thread blocks):
//   1. token_kernel, one block per token (the forward's fused SIMT kernel with A and B swapped):
//      routing row -> (id, coef) per slot; dy row staged in shared memory; u by one warp per
//      (slot, VEC ranks) with 16-byte loads of B rows along r; h by one warp per rank row (16-byte
//      loads of A and x, warp-shuffle sums); then dw, the per-slot codes gu = coef·u, gh = coef·h
//      (fp32, [T, k, r]: global, read by the reductions) and dx, one thread per VEC input columns,
//      A rows read with 16-byte loads. pair_id[t, k] = adapter of each live (coef != 0) slot, else -1.
//   2. count_kernel + list_kernel, one block per adapter: a device-side counting sort of the (token,
//      slot) pairs by adapter id: counts, then each block computes its start (sum of the lower
//      adapters' counts) and compacts its pairs in ascending pair order (ballot + warp prefix).
//      Pair order = token order: the reductions below sum over each adapter's tokens in that order.
//   3. reduce_kernel, grid (adapter, rank block of 8, column tile of 128·VEC): a block owns that tile
//      of dA_i ([r, d_in]) or dB_i ([d_out, r]); it stages 32 pairs' (token, code rows) in shared
//      memory at a time and each thread accumulates 8 × VEC outputs in fp32 registers from 16-byte
//      loads of x (dA) or dy (dB) rows. Adapters without tokens get zeros.
//   4. seg_dw_kernel (segment forms with weight gradients): one thread per (segment, slot) sums the
//      per-token dw of its tokens in token order.
// Bytes: x, dy, and each used adapter's A and B are read once per (token, slot) from L2 in step 1
// (the SIMT decode shape; prefill-sized backward would want the tensor-core path), once per rank block
// in step 3; the fp32 codes are T·k·r·8 bytes, small next to x and dy for r << d.
#pragma once

#include <algorithm>
#include <numeric>

#include "common/dtype.cuh"
#include "common/segments.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"

namespace mk::lora_bwd {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxRank = 128;
constexpr int kRankBlock = 8;  // rank rows per reduce_kernel block (register tile 8 × VEC)
constexpr int kChunk = 32;     // pairs staged per step of reduce_kernel
constexpr size_t kMaxSmem = 48 * 1024;

template <class T>
struct Args {
  using A_ = acc_t<T>;
  const T* x;              // [T, d_in]
  const T* A;              // [N, r, d_in], or [r, d_in] when shared_a
  const T* B;              // [N, d_out, r]
  const T* dy;             // [T, d_out]
  const A_* scale;         // [N], or nullptr -> scale_value
  A_ scale_value;
  const int32_t* ids;      // [R, k]; nullptr: dense (id = j, k = N)
  const A_* weights;       // [R, k] or nullptr (= 1)
  const int32_t* offsets;  // [S + 1] (rows are segments) or nullptr (rows are tokens)
  T* dx;                   // [T, d_in] or nullptr (not needed)
  A_* dw_tok;              // [T, k] or nullptr: the weights' gradient per token slot
  A_* gu;                  // [T, k, r] coef·u per live slot (shared A: [T, r] dh), or nullptr
  A_* gh;                  // [T, k, r] coef·h per live slot, or nullptr
  int32_t* pair_id;        // [T, k] adapter of each live slot, -1 otherwise, or nullptr
  int64_t tokens;
  int d_in, d_out, r, N, k, segs;
  bool shared_a;
  int dy_bytes;            // bytes of the staged dy row in shared memory (0: read dy from global)
};

// token_kernel dynamic shared memory: [dy row (dy_bytes, 16-aligned)] [u: k·r] [h: k·r or r]
// [dh: r if shared] [coef: k] (acc) [sid: k int32].
template <class T> inline size_t token_tail_bytes(int r, int k, bool shared_a) {
  const size_t kr = static_cast<size_t>(k) * r;
  return (kr + (shared_a ? 2 * static_cast<size_t>(r) : kr) + k) * sizeof(acc_t<T>) + static_cast<size_t>(k) * 4;
}
template <class T> inline int staged_dy_bytes(int d_out, int r, int k, bool shared_a) {
  const size_t b = (static_cast<size_t>(d_out) * sizeof(T) + 15) / 16 * 16;
  return b + token_tail_bytes<T>(r, k, shared_a) <= kMaxSmem ? static_cast<int>(b) : 0;
}

MK_DEVICE int popc(uint32_t m) {
#if defined(MOKERNELS_EMULATION)
  return __builtin_popcount(m);
#else
  return __popc(m);
#endif
}

// Block sum of one value per thread (fixed order: deterministic); every thread gets the total.
template <class V> MK_DEVICE V block_sum(V v, V* red /* kWarps */) {
  v = warp_reduce(v, SumOp{});
  if (lane_id() == 0) red[threadIdx.x / kWarpSize] = v;
  block_sync();
  V s = V(0);
  for (int w = 0; w < kWarps; ++w) s += red[w];
  block_sync();
  return s;
}

#if defined(MOKERNELS_EMULATION)
#define MK_LORA_BWD_BOUNDS(n)
#else
#define MK_LORA_BWD_BOUNDS(n) __launch_bounds__(kThreads, n)
#endif

// nvcc 13.0 --resource-usage (sm_80 and sm_90a, no spills): token_kernel 56-64 registers (bounded by the 8 blocks
// of 128 threads per SM), reduce_kernel 66-125 (8 x VEC fp32 accumulators; bound: 4 blocks per SM),
// count/list/seg_dw 29-34.
// sass-budget: mk::lora_bwd::token_kernel block=128 smem=8448 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LORA_BWD_BOUNDS(8) token_kernel(const Args<T> a) {
  using Acc = acc_t<T>;
  using V = Vec<T, VEC>;
  const int64_t t = blockIdx.x;
  MK_DYNAMIC_SHARED(unsigned char, smem);
  T* dys = reinterpret_cast<T*>(smem);
  const int kr = a.k * a.r;
  Acc* us = reinterpret_cast<Acc*>(smem + a.dy_bytes);
  Acc* hs = us + kr;
  Acc* dh = hs + (a.shared_a ? a.r : kr);
  Acc* coef = dh + (a.shared_a ? a.r : 0);
  int32_t* sid = reinterpret_cast<int32_t*>(coef + a.k);
  const bool need_w = a.dw_tok != nullptr;

  // 0. routing row; sid[j] = adapter of a slot with work (live, or a weight gradient wanted), else -1
  bool covered = true;
  const int64_t row = routing_row(a.offsets, a.segs, t, covered);
  for (int j = threadIdx.x; j < a.k; j += kThreads) {
    Acc c = Acc(0);
    int id = -1;
    if (covered) {
      const int cand = a.ids != nullptr ? a.ids[row * a.k + j] : j;
      if (cand >= 0 && cand < a.N) {
        id = cand;
        c = (a.weights != nullptr ? a.weights[row * a.k + j] : Acc(1)) * (a.scale != nullptr ? a.scale[id] : a.scale_value);
      }
    }
    if (a.pair_id != nullptr) a.pair_id[t * a.k + j] = c != Acc(0) ? id : -1;
    if (c == Acc(0) && !need_w) id = -1;
    coef[j] = c;
    sid[j] = id;
  }
  block_sync();
  bool any = false;
  for (int j = 0; j < a.k && !any; ++j) any = sid[j] >= 0;
  if (!any) {  // block-uniform: zero dx / dw rows (and dh, which the shared-A dA sums over every token)
    if (a.dx != nullptr)
      for (int64_t c = threadIdx.x; c < a.d_in; c += kThreads) a.dx[t * a.d_in + c] = from_acc<T>(Acc(0));
    if (need_w)
      for (int j = threadIdx.x; j < a.k; j += kThreads) a.dw_tok[t * a.k + j] = Acc(0);
    if (a.shared_a && a.gu != nullptr)
      for (int q = threadIdx.x; q < a.r; q += kThreads) a.gu[t * a.r + q] = Acc(0);
    return;
  }

  // 1. stage the dy row (16-byte vectors) when it fits
  const T* dyrow = a.dy + t * a.d_out;
  const T* dysrc = dyrow;
  if (a.dy_bytes > 0) {
    for (int v = threadIdx.x * VEC; v < a.d_out; v += kThreads * VEC) store_vec(dys + v, load_vec<VEC>(dyrow + v));
    dysrc = dys;
    block_sync();
  }

  // 2a. u[j, rr0 .. rr0 + VEC) = B_iᵀ dy: warp per (slot, VEC ranks), lanes over d_out, 16-byte B loads
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  const int groups = a.r / VEC;
  for (int q = warp; q < a.k * groups; q += kWarps) {
    const int j = q / groups, rr0 = (q % groups) * VEC;
    const int id = sid[j];
    if (id < 0) continue;  // warp-uniform
    const T* bcol = a.B + static_cast<int64_t>(id) * a.d_out * a.r + rr0;
    Acc p[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = Acc(0);
    for (int o = lane; o < a.d_out; o += kWarpSize) {
      const V bv = load_vec<VEC>(bcol + static_cast<int64_t>(o) * a.r);
      const Acc d = to_acc(dysrc[o]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) p[i] += to_acc(bv.v[i]) * d;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const Acc s = warp_reduce(p[i], SumOp{});
      if (lane == 0) us[j * a.r + rr0 + i] = s;
    }
  }
  // 2b. h = A_i x: warp per rank row (shared A: r rows once), lanes over d_in
  const T* xrow = a.x + t * a.d_in;
  const int hrows = a.shared_a ? a.r : kr;
  for (int q = warp; q < hrows; q += kWarps) {
    const int j = a.shared_a ? 0 : q / a.r, rr = a.shared_a ? q : q % a.r;
    if (!a.shared_a && sid[j] < 0) continue;  // warp-uniform
    const T* arow = a.A + ((a.shared_a ? int64_t(0) : static_cast<int64_t>(sid[j]) * a.r) + rr) * a.d_in;
    Acc s = Acc(0);
    for (int v = lane * VEC; v < a.d_in; v += kWarpSize * VEC) {
      const V xv = load_vec<VEC>(xrow + v), av = load_vec<VEC>(arow + v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += to_acc(xv.v[i]) * to_acc(av.v[i]);
    }
    s = warp_reduce(s, SumOp{});
    if (lane == 0) hs[q] = s;
  }
  block_sync();

  // 3. dw (thread per slot), the codes for the reductions, dh (shared A: thread per rank, slots in order)
  for (int j = threadIdx.x; j < a.k && need_w; j += kThreads) {
    const int id = sid[j];
    Acc s = Acc(0);
    if (id >= 0) {
      const Acc* h = hs + (a.shared_a ? 0 : j * a.r);
      for (int rr = 0; rr < a.r; ++rr) s += us[j * a.r + rr] * h[rr];
      s *= a.scale != nullptr ? a.scale[id] : a.scale_value;
    }
    a.dw_tok[t * a.k + j] = s;
  }
  for (int e = threadIdx.x; e < kr; e += kThreads) {
    const int j = e / a.r, rr = e % a.r;
    const bool live = sid[j] >= 0 && coef[j] != Acc(0);
    if (a.gh != nullptr) a.gh[t * kr + e] = live ? coef[j] * hs[(a.shared_a ? 0 : j * a.r) + rr] : Acc(0);
    if (!a.shared_a && a.gu != nullptr) a.gu[t * kr + e] = live ? coef[j] * us[e] : Acc(0);
  }
  if (a.shared_a) {
    for (int rr = threadIdx.x; rr < a.r; rr += kThreads) {
      Acc s = Acc(0);
      for (int j = 0; j < a.k; ++j)
        if (sid[j] >= 0 && coef[j] != Acc(0)) s += coef[j] * us[j * a.r + rr];
      dh[rr] = s;
      if (a.gu != nullptr) a.gu[t * a.r + rr] = s;
    }
    block_sync();
  }

  // 4. dx: thread per VEC input columns; A rows with 16-byte loads
  if (a.dx == nullptr) return;
  for (int c0 = threadIdx.x * VEC; c0 < a.d_in; c0 += kThreads * VEC) {
    Acc acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = Acc(0);
    const int nslots = a.shared_a ? 1 : a.k;
    for (int j = 0; j < nslots; ++j) {
      if (!a.shared_a && (sid[j] < 0 || coef[j] == Acc(0))) continue;
      const T* abase = a.A + (a.shared_a ? int64_t(0) : static_cast<int64_t>(sid[j]) * a.r) * a.d_in + c0;
      for (int rr = 0; rr < a.r; ++rr) {
        const Acc g = a.shared_a ? dh[rr] : coef[j] * us[j * a.r + rr];
        const V av = load_vec<VEC>(abase + static_cast<int64_t>(rr) * a.d_in);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += g * to_acc(av.v[i]);
      }
    }
    V out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = from_acc<T>(acc[i]);
    store_vec(a.dx + t * a.d_in + c0, out);
  }
}

// 2. Counting sort of the pairs p = t·k + j by adapter (pair_id[p], -1 = none).
// sass-budget: mk::lora_bwd::count_kernel block=128 regs<=40 spill=0
MK_GLOBAL void MK_LORA_BWD_BOUNDS(8) count_kernel(const int32_t* pair_id, int64_t pairs, int32_t* counts) {
  MK_SHARED_ARRAY(int32_t, red, kWarps);
  const int g = blockIdx.x;
  int32_t n = 0;
  for (int64_t p = threadIdx.x; p < pairs; p += kThreads) n += pair_id[p] == g ? 1 : 0;
  n = block_sum(n, red);
  if (threadIdx.x == 0) counts[g] = n;
}

// starts[g] = Σ_{g' < g} counts[g'] (starts[G] = all live pairs); list[starts[g] ..] = g's pairs ascending.
// sass-budget: mk::lora_bwd::list_kernel block=128 regs<=40 spill=0
MK_GLOBAL void MK_LORA_BWD_BOUNDS(8) list_kernel(const int32_t* pair_id, int64_t pairs, const int32_t* counts,
                                                 int groups, int32_t* starts, int32_t* list) {
  MK_SHARED_ARRAY(int32_t, red, kWarps);
  MK_SHARED_ARRAY(int32_t, wsum, kWarps);
  const int g = blockIdx.x;
  int32_t s = 0;
  for (int i = threadIdx.x; i < g; i += kThreads) s += counts[i];
  const int32_t start = block_sum(s, red);
  if (threadIdx.x == 0) {
    starts[g] = start;
    if (g == groups - 1) starts[groups] = start + counts[g];
  }
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  int32_t done = 0;
  for (int64_t base = 0; base < pairs; base += kThreads) {  // block-uniform trip count
    const int64_t p = base + threadIdx.x;
    const bool mine = p < pairs && pair_id[p] == g;
    const uint32_t m = ballot(mine);
    if (lane == 0) wsum[warp] = popc(m);
    block_sync();
    int32_t before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? wsum[w] : 0;
      total += wsum[w];
    }
    if (mine) list[start + done + before + popc(m & ((1u << lane) - 1u))] = static_cast<int32_t>(p);
    done += total;
    block_sync();
  }
}

// 3. Grouped reductions. out_g = Σ_{pairs p of group g, in list order} L[p, :]ᵀ ⊗ M[p / k, :], i.e.
// dA_g[rr, c] = Σ L[p, rr] x[t, c] (RD: out [G, r, D]) or dB_g[o, rr] = Σ dy[t, o] L[p, rr] ([G, D, r]).
template <class T>
struct RedArgs {
  const acc_t<T>* L;      // [P, r] fp32 codes (gu or gh)
  const T* M;             // [T, D] (x or dy)
  const int32_t* list;    // pairs grouped by adapter, or nullptr: group 0 = pairs 0 .. P
  const int32_t* starts;  // [G + 1] (with list)
  int64_t pairs;
  int k;                  // pairs per token (token = p / k)
  int r, D;
  T* out;
};

// sass-budget: mk::lora_bwd::reduce_kernel block=128 regs<=128 spill=0 hot
template <class T, int VEC, bool RD>
MK_GLOBAL void MK_LORA_BWD_BOUNDS(4) reduce_kernel(const RedArgs<T> a) {
  using Acc = acc_t<T>;
  using V = Vec<T, VEC>;
  using Row = Acc[kRankBlock];
  MK_SHARED_ARRAY(int32_t, tok, kChunk);
  MK_SHARED_ARRAY(Row, lv, kChunk);
  const int64_t g = blockIdx.x;
  const int rr0 = blockIdx.y * kRankBlock;
  const int64_t begin = a.list != nullptr ? a.starts[g] : 0;
  const int64_t end = a.list != nullptr ? a.starts[g + 1] : a.pairs;
  // column tiles of kThreads·VEC: grid.z of them, grid-stride past 65535 (D > ~8.4 M at VEC = 1)
  const int64_t tiles = ceil_div(static_cast<int64_t>(a.D), static_cast<int64_t>(kThreads) * VEC);
  for (int64_t zt = blockIdx.z; zt < tiles; zt += gridDim.z) {  // block-uniform
  const int64_t c0 = (zt * kThreads + threadIdx.x) * VEC;
  const bool cols = c0 < a.D;
  Acc acc[kRankBlock][VEC];
#pragma unroll
  for (int b = 0; b < kRankBlock; ++b)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[b][i] = Acc(0);
  for (int64_t base = begin; base < end; base += kChunk) {  // block-uniform
    const int n = end - base < kChunk ? static_cast<int>(end - base) : kChunk;
    for (int e = threadIdx.x; e < kChunk * kRankBlock; e += kThreads) {
      const int q = e / kRankBlock, b = e % kRankBlock;
      Acc v = Acc(0);
      int32_t tk = 0;
      if (q < n) {
        const int64_t p = a.list != nullptr ? a.list[base + q] : base + q;
        tk = static_cast<int32_t>(p / a.k);
        if (rr0 + b < a.r) v = a.L[p * a.r + rr0 + b];
      }
      lv[q][b] = v;
      if (b == 0) tok[q] = tk;
    }
    block_sync();
    if (cols) {
      for (int q = 0; q < n; ++q) {
        const V m = load_vec<VEC>(a.M + static_cast<int64_t>(tok[q]) * a.D + c0);
#pragma unroll
        for (int b = 0; b < kRankBlock; ++b) {
          const Acc l = lv[q][b];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[b][i] += l * to_acc(m.v[i]);
        }
      }
    }
    block_sync();
  }
  if (!cols) continue;
#pragma unroll
  for (int b = 0; b < kRankBlock; ++b) {
    const int rr = rr0 + b;
    if (rr >= a.r) break;
    if constexpr (RD) {
      V o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = from_acc<T>(acc[b][i]);
      store_vec(a.out + (g * a.r + rr) * a.D + c0, o);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a.out[(g * a.D + c0 + i) * a.r + rr] = from_acc<T>(acc[b][i]);
    }
  }
  }  // column tiles
}

// 4. dw[s, j] = Σ_{t in segment s} dw_tok[t, j] (tokens whose routing row is s, in token order).
// sass-budget: mk::lora_bwd::seg_dw_kernel block=128 regs<=40 spill=0
template <class Acc>
MK_GLOBAL void MK_LORA_BWD_BOUNDS(8) seg_dw_kernel(const Acc* dw_tok, const int32_t* offsets, int segs, int64_t tokens,
                                                   int k, Acc* dw) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= static_cast<int64_t>(segs) * k) return;
  const int s = static_cast<int>(e / k), j = static_cast<int>(e % k);
  const int64_t o0 = offsets[s], o1 = offsets[s + 1];
  const int64_t lo = o0 < 0 ? 0 : (o0 > tokens ? tokens : o0);
  const int64_t hi = o1 < lo ? lo : (o1 > tokens ? tokens : o1);
  Acc sum = Acc(0);
  for (int64_t t = lo; t < hi; ++t) {
    bool covered = true;
    if (routing_row(offsets, segs, t, covered) == s && covered) sum += dw_tok[t * k + j];
  }
  dw[e] = sum;
}

// ------------------------------------------------------------------------------------------------
// Launchers (a.tokens > 0; all arrays contiguous; the caller checked the shared-memory budget).

template <class T>
cudaError_t launch_token(const Args<T>& a, cudaStream_t stream) {
  const int n = std::gcd(std::gcd(a.d_in, a.r), a.d_out);
  const int vec = pick_vec<T>(n, {a.x, a.A, a.B, a.dy, a.dx});
  const size_t smem = static_cast<size_t>(a.dy_bytes) + token_tail_bytes<T>(a.r, a.k, a.shared_a);
  dispatch_vec<T>(vec, [&](auto Vc) {
    auto kernel = token_kernel<T, decltype(Vc)::value>;
    MK_LAUNCH(kernel, dim3(static_cast<unsigned>(a.tokens)), dim3(kThreads), smem, stream, a);
  });
  return last_launch_error();
}

// pairs >= 0, groups >= 1; counts [groups], starts [groups + 1], list [pairs] int32.
inline cudaError_t launch_sort(const int32_t* pair_id, int64_t pairs, int groups, int32_t* counts, int32_t* starts,
                               int32_t* list, cudaStream_t stream) {
  MK_LAUNCH(count_kernel, dim3(static_cast<unsigned>(groups)), dim3(kThreads), 0, stream, pair_id, pairs, counts);
  MK_LAUNCH(list_kernel, dim3(static_cast<unsigned>(groups)), dim3(kThreads), 0, stream, pair_id, pairs, counts, groups,
            starts, list);
  return last_launch_error();
}

// groups >= 1, a.D > 0. RD: out [groups, r, D] (dA); else [groups, D, r] (dB).
template <class T, bool RD>
cudaError_t launch_reduce(const RedArgs<T>& a, int groups, cudaStream_t stream) {
  const int vec = pick_vec<T>(a.D, {a.M, RD ? static_cast<const void*>(a.out) : nullptr});
  dispatch_vec<T>(vec, [&](auto Vc) {
    constexpr int VEC = decltype(Vc)::value;
    auto kernel = reduce_kernel<T, VEC, RD>;
    const int64_t tiles = ceil_div(a.D, static_cast<int64_t>(kThreads) * VEC);  // the kernel strides past 65535
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ceil_div(a.r, kRankBlock)),
                    static_cast<unsigned>(std::min<int64_t>(tiles, 65535)));
    MK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, a);
  });
  return last_launch_error();
}

template <class Acc>
cudaError_t launch_seg_dw(const Acc* dw_tok, const int32_t* offsets, int segs, int64_t tokens, int k, Acc* dw,
                          cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(segs) * k;
  if (n == 0) return cudaSuccess;
  auto kernel = seg_dw_kernel<Acc>;
  MK_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(n, kThreads))), dim3(kThreads), 0, stream, dw_tok, offsets,
            segs, tokens, k, dw);
  return last_launch_error();
}

}  // namespace mk::lora_bwd
