// Segmented multi-adapter LoRA, decode path (METHODS.md §1). Two designs live here:
//  * decode_kernel (below): fused SIMT, shrink -> expand per (token, d_out chunk), h on chip. Since the
//    issue-10 speed work it runs the shared-A form only (h = A x once per token, no adapter gather).
//  * the split path (shrink_kernel -> workspace -> expand_kernel, further down, with the analysis of why
//    decode_kernel was slow for per-adapter A): every other form.
// Measured on an H200 before the redesign (CUDA events, L2 flushed; d = 4096, r = 16, bf16, 32 tokens
// over 26 adapters): 121 µs for F.linear + lora_apply vs 18 µs for the base alone. Besides the kernel
// (~20-30 µs by the latency estimate below), the call was host bound: the benchmark's 256 MiB L2 flush
// gives the host ~55-65 µs of head start, and the host spent ~40-50 µs of Python per lora_apply (form
// canonicalisation and checks; dev CPU) + ~10-15 µs in the register_autograd layer + F.linear + 2
// extra launches (clamp and int32 cast of int64 ids); see ops/lora.py "Hot path".
//
// decode_kernel, as first written:
//
//   y[t, :] = (base[t, :] | y[t, :] | 0) + Σ_j coef_j · B[id_j] (A[id_j] x[t])
//   coef_j = w_j · scale[id_j]      (ids outside [0, N) and tokens outside every segment: skipped)
//
// One block (128 threads) per (token, chunk of d_out):
//   0. the token's routing row (itself, or its segment by binary search over offsets), its k
//      (id, coef) pairs into shared memory; ids out of range and zero coefficients are dropped, so
//      A/B of an invalid id are never read;
//   1. the token's x row is staged in shared memory once (16-byte vectors) when it fits;
//   2. shrink: one warp per rank row (k·r rows, r for shared A), lanes split d_in with 16-byte
//      loads of x and A, fp32 accumulation, warp-shuffle reduction -> h [k, r] in shared memory;
//   3. expand: one thread per output column o; B[id, o, :] is an r-long contiguous row, read with
//      16-byte vectors along r and dotted with h (shared-memory broadcast); Σ_j in a register; one
//      write of y (out of place: base + delta; in place: y + delta).
//
// Why the d_out split recomputes h instead of a split-K shrink + separate expand (bytes/FLOPs, d=4096,
// r=16, bf16, 32 decode tokens over 26 adapters): each adapter's A and B are 128 KiB; the unique
// adapters are 6.5 MiB of HBM traffic (>= 2.2 µs at 3 TB/s) whatever the split. With C chunks per
// token every chunk re-reads A (from L2 after the first) and 1/C of B: C = 4 -> 32·4·128 KiB = 16 MiB
// of L2 reads, ~2 µs at H100 L2 bandwidth and overlapped with the HBM stream, and 2·r·d_in = 131 kFLOP
// of extra shrink per block (negligible). A split-K shrink would save those L2 re-reads but needs a
// second launch (~2-3 µs on the critical path at decode) and a global round trip of h. So: C chunks
// chosen on the host to fill about one wave of blocks (C = ceil(SMs / T), at most 8 and at most
// ceil(d_out / 128)); at T >= SMs every block owns a whole token and h is computed once.
// Prefill (many tokens per adapter) belongs on tensor cores (not this kernel; it is correct there,
// just not fast: A is re-read from L2 per token).
#pragma once

#include <algorithm>
#include <numeric>

#include "common/dtype.cuh"
#include "common/segments.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"

namespace mk::lora {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxRank = 128;
constexpr int kMaxChunks = 8;
constexpr int kMaxSlices = 8;  // output slices per launch (q/k/v, gate/up, ...)
constexpr size_t kMaxSmem = 48 * 1024;  // dynamic shared memory without an opt-in attribute

template <class T>
struct Args {
  using A_ = acc_t<T>;
  const T* x;            // [T, d_in]
  const T* A;            // [N, r, d_in], or [r, d_in] when shared_a
  const T* B;            // [N, d_out, r]
  const A_* scale;       // [N], or nullptr -> scale_value for every adapter
  A_ scale_value;
  const int32_t* ids;    // [R, k]; nullptr: dense (id = j, k = N)
  const A_* weights;     // [R, k], or nullptr (= 1)
  const int32_t* offsets;  // [S + 1]: rows are segments; nullptr: rows are tokens
  const T* base;         // [T, d_out] or nullptr (out of place only)
  T* y;                  // [T, d_out]
  int64_t tokens;
  int d_in, d_out, r, N, k, segs;
  bool shared_a;         // one A for every adapter: h computed once per token
  bool accumulate;       // y += delta (in place); else y = base + delta
  int x_bytes;           // bytes of the staged x row in shared memory (0: read x from global)
  // Mixed ranks (split decode and prefill paths): adapter n uses only the first ranks[n] rows of A[n] and
  // columns of B[n] (clamped into [0, r]; rows/columns beyond are never read); nullptr: every rank is r.
  const int32_t* ranks;
  // Output slices (split decode and prefill paths; the slice is grid dimension z): slices > 0 -> slice s
  // has its own sA[s] [N, r, d_in] and sB[s] [N, d_out_s, r] and writes y's columns [col[s], col[s+1])
  // (d_out = col[slices] is y's row length); slices == 0: the single slice (A, B, all d_out columns).
  int slices;
  const T* sA[kMaxSlices];
  const T* sB[kMaxSlices];
  int col[kMaxSlices + 1];
};

// One output slice of the arguments: its A, B, output width and first output column.
template <class T>
struct SliceView {
  const T* A;
  const T* B;
  int d_out, col;
};
template <class T>
MK_DEVICE SliceView<T> slice_view(const Args<T>& a, int s) {
  if (a.slices == 0) return {a.A, a.B, a.d_out, 0};
  return {a.sA[s], a.sB[s], a.col[s + 1] - a.col[s], a.col[s]};
}
template <class T> inline int num_slices(const Args<T>& a) { return a.slices == 0 ? 1 : a.slices; }
// The widest slice (the expand kernels' grid covers it).
template <class T> inline int max_slice_d_out(const Args<T>& a) {
  int m = a.slices == 0 ? a.d_out : 0;
  for (int s = 0; s < a.slices; ++s) m = std::max(m, a.col[s + 1] - a.col[s]);
  return m;
}

// Adapter id's rank (valid id): ranks[id] clamped into [0, r], or r.
template <class T>
MK_DEVICE int rank_of(const Args<T>& a, int id) {
  return a.ranks == nullptr ? a.r : std::min(a.r, std::max(0, a.ranks[id]));
}

// Dynamic shared memory: [x row (x_bytes, 16-aligned)] [h: hrows acc] [coef: k acc] [ids: k int32].
template <class T> inline size_t smem_tail_bytes(int r, int k, bool shared_a) {
  const size_t hrows = shared_a ? static_cast<size_t>(r) : static_cast<size_t>(k) * r;
  return (hrows + k) * sizeof(acc_t<T>) + static_cast<size_t>(k) * sizeof(int32_t);
}
template <class T> inline int staged_x_bytes(int d_in, int r, int k, bool shared_a) {
  const size_t x = (static_cast<size_t>(d_in) * sizeof(T) + 15) / 16 * 16;
  return x + smem_tail_bytes<T>(r, k, shared_a) <= kMaxSmem ? static_cast<int>(x) : 0;
}

// The routing row of token t (itself, or its segment) and whether the token is covered (common/segments.cuh).
template <class T>
MK_DEVICE int64_t routing_row(const Args<T>& a, int64_t t, bool& covered) {
  return ::mk::routing_row(a.offsets, a.segs, t, covered);
}

// Slot j of routing row `row`: its adapter id and coefficient c = w_j · scale[id]; -1 (c = 0) when the
// token is not covered, the id is outside [0, N) or the coefficient is 0 (that adapter is never read).
template <class T>
MK_DEVICE int slot_adapter(const Args<T>& a, int64_t row, bool covered, int j, acc_t<T>& c) {
  using Acc = acc_t<T>;
  c = Acc(0);
  int id = -1;
  if (covered) {
    id = a.ids != nullptr ? a.ids[row * a.k + j] : j;
    if (id >= 0 && id < a.N)
      c = (a.weights != nullptr ? a.weights[row * a.k + j] : Acc(1)) * (a.scale != nullptr ? a.scale[id] : a.scale_value);
  }
  if (!(id >= 0 && id < a.N) || c == Acc(0)) {
    c = Acc(0);
    return -1;
  }
  return id;
}

// 8 blocks of 128 threads per SM (<= 64 registers, half occupancy): with only the 128-thread bound,
// ptxas (CUDA 13.0) targeted 32-40 registers on sm_90a and spilled (fp16 VEC=8, fp64 VEC=2).
#if defined(MOKERNELS_EMULATION)
#define MK_LORA_BOUNDS
#else
#define MK_LORA_BOUNDS __launch_bounds__(kThreads, 8)
#endif

// sass-budget: mk::lora::decode_kernel block=128 smem=8264 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LORA_BOUNDS decode_kernel(const Args<T> a) {
  using Acc = acc_t<T>;
  using V = Vec<T, VEC>;
  const int64_t t = blockIdx.x;
  MK_DYNAMIC_SHARED(unsigned char, smem);
  T* xs = reinterpret_cast<T*>(smem);
  const int hrows = a.shared_a ? a.r : a.k * a.r;
  Acc* hs = reinterpret_cast<Acc*>(smem + a.x_bytes);
  Acc* coef = hs + hrows;
  int32_t* sid = reinterpret_cast<int32_t*>(coef + a.k);

  // 0. routing row of this token; (id, coef) per slot, -1 where nothing is to be done
  bool covered = true;
  const int64_t row = routing_row(a, t, covered);
  for (int j = threadIdx.x; j < a.k; j += kThreads) {
    Acc c = Acc(0);
    sid[j] = slot_adapter(a, row, covered, j, c);
    coef[j] = c;
  }
  block_sync();
  bool any = false;
  for (int j = 0; j < a.k && !any; ++j) any = sid[j] >= 0;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t ostep = static_cast<int64_t>(gridDim.y) * kThreads;
  T* yrow = a.y + t * a.d_out;
  if (!any) {  // block-uniform: no adapter for this token
    if (!a.accumulate)
      for (int64_t o = o0; o < a.d_out; o += ostep) yrow[o] = a.base != nullptr ? a.base[t * a.d_out + o] : from_acc<T>(Acc(0));
    return;
  }

  // 1. stage the x row (16-byte vectors) when it fits
  const T* xrow = a.x + t * a.d_in;
  const T* xsrc = xrow;
  if (a.x_bytes > 0) {
    for (int v = threadIdx.x * VEC; v < a.d_in; v += kThreads * VEC) store_vec(xs + v, load_vec<VEC>(xrow + v));
    xsrc = xs;
    block_sync();
  }

  // 2. shrink: warp per rank row
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  for (int q = warp; q < hrows; q += kWarps) {
    const int j = a.shared_a ? 0 : q / a.r, rr = a.shared_a ? q : q % a.r;
    if (!a.shared_a && sid[j] < 0) continue;  // warp-uniform
    const T* arow = a.A + ((a.shared_a ? int64_t(0) : static_cast<int64_t>(sid[j]) * a.r) + rr) * a.d_in;
    Acc s = Acc(0);
    for (int v = lane * VEC; v < a.d_in; v += kWarpSize * VEC) {
      const V xv = load_vec<VEC>(xsrc + v), av = load_vec<VEC>(arow + v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += to_acc(xv.v[i]) * to_acc(av.v[i]);
    }
    s = warp_reduce(s, SumOp{});
    if (lane == 0) hs[q] = s;
  }
  block_sync();

  // 3. expand: thread per output column, B rows vectorised along r
  for (int64_t o = o0; o < a.d_out; o += ostep) {
    Acc acc = Acc(0);
    for (int j = 0; j < a.k; ++j) {
      const int id = sid[j];
      if (id < 0) continue;
      const T* brow = a.B + (static_cast<int64_t>(id) * a.d_out + o) * a.r;
      const Acc* h = hs + (a.shared_a ? 0 : j * a.r);
      Acc d = Acc(0);
      for (int v = 0; v < a.r; v += VEC) {
        const V bv = load_vec<VEC>(brow + v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d += to_acc(bv.v[i]) * h[v + i];
      }
      acc += coef[j] * d;
    }
    const Acc prev = a.accumulate ? to_acc(yrow[o]) : (a.base != nullptr ? to_acc(a.base[t * a.d_out + o]) : Acc(0));
    yrow[o] = from_acc<T>(prev + acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Split decode path (the default for every form but shared A): shrink_kernel writes each token's
// coef-scaled codes h [T, k, r] and resolved ids [T, k] to a tiny workspace (2 KiB at T = 32, k = 1,
// r = 16; one round trip through L2), expand_kernel applies them. Why, vs decode_kernel above (analysis
// for d = 4096, r = 16, bf16, 32 tokens over 26 adapters, 132 SMs; see also the header):
//  * decode_kernel's grid is 32 tokens x 5 chunks = 160 blocks of 4 warps; each block recomputes the
//    token's whole shrink (16 rows of 8 KiB, 4 per warp, one after another) before its expand, so the
//    kernel is a chain of ~4 x 16 dependent 512-byte warp loads (the runtime-bound loop keeps few in
//    flight) then ~7 dependent rounds of B loads (820 columns / 128 threads): ~20-30 µs of latency for
//    6.5 MiB of bytes (2 µs at 3 TB/s). Per SM only 4-8 warps with 1-4 loads each are in flight.
//  * shrink_kernel: one row of A (token, slot, rank row) per group of tpr = 128 threads (d_in split
//    over 4 warps, each thread a fixed batch of U = 4 16-byte loads of A and of x issued before any
//    FMA): at d_in = 4096 the whole row is ONE batch, so the kernel is ~one HBM round trip deep;
//    T·k·r = 512 blocks (~4 per SM, 16 warps, 8 KiB of A + 8 KiB of x in flight per block).
//  * expand_kernel: one thread per (token, output column), grid ceil(d_out/128) x T = 1024 blocks;
//    B[id, o, :] is r contiguous elements (2 x 16-byte loads at r = 16), h is read from L1 (the same
//    address in every thread of the block: a broadcast). ~one round trip deep.
//  Each used adapter's A and B are read once from HBM; tokens sharing an adapter re-read it from L2
//  (50 MB on H100: the 6.5 MiB of used adapters stay resident), so tokens are not regrouped by adapter
//  (a sort + scatter launch would cost more than the L2 re-reads at decode sizes). Two launches instead
//  of one add ~1-2 µs of launch latency; the fused pass over W (lora_fused_w.cuh) reuses shrink_kernel.

template <class T>
struct Workspace {
  Args<T> l;
  acc_t<T>* h;       // [T, k, r] coef · A[id] x   (0 for no adapter)
  int32_t* hid;      // [T, k] resolved id, -1: no adapter (invalid id, zero weight, token outside segments)
  int tpr;           // threads per A row in shrink_kernel: 32, 64 or 128
};

constexpr int kShrinkUnroll = 4;

// Threads per A row: enough for one batch of U vectors per thread, a warp at least, the block at most.
inline int shrink_tpr(int d_in, int vec) {
  const int64_t need = ceil_div(d_in, static_cast<int64_t>(vec) * kShrinkUnroll);
  return need <= kWarpSize ? kWarpSize : need <= 2 * kWarpSize ? 2 * kWarpSize : kThreads;
}

// sass-budget: mk::lora::shrink_kernel block=128 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LORA_BOUNDS shrink_kernel(const Workspace<T> f) {
  using Acc = acc_t<T>;
  using V = Vec<T, VEC>;
  const Args<T>& a = f.l;
  MK_SHARED_ARRAY(Acc, red, kWarps);
  const int tpr = f.tpr, rpb = kThreads / tpr, wpr = tpr / kWarpSize;
  const int sub = threadIdx.x % tpr, slot = threadIdx.x / tpr;
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  const int64_t kr = static_cast<int64_t>(a.k) * a.r, rows = a.tokens * kr, groups = ceil_div(rows, rpb);
  const SliceView<T> sv = slice_view(a, blockIdx.y);  // grid.y: the output slice (its own A)
  Acc* hs = f.h + static_cast<int64_t>(blockIdx.y) * rows;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // block-uniform
    const int64_t q = g * rpb + slot;
    Acc s = Acc(0), c = Acc(0);
    int id = -1, j = 0, rr = 0;
    int64_t t = 0;
    if (q < rows) {  // warp-uniform (tpr >= 32)
      t = q / kr;
      j = static_cast<int>((q / a.r) % a.k);
      rr = static_cast<int>(q % a.r);
      bool covered = true;
      const int64_t row = routing_row(a, t, covered);
      id = slot_adapter(a, row, covered, j, c);
      if (id >= 0 && rr < rank_of(a, id)) {  // rows past the adapter's rank: h = 0, A not read
        const T* arow = sv.A + (static_cast<int64_t>(id) * a.r + rr) * a.d_in;
        const T* xrow = a.x + t * a.d_in;
        for (int64_t b0 = static_cast<int64_t>(sub) * VEC; b0 < a.d_in; b0 += static_cast<int64_t>(tpr) * VEC * kShrinkUnroll) {
          V av[kShrinkUnroll], xv[kShrinkUnroll];
#pragma unroll
          for (int u = 0; u < kShrinkUnroll; ++u) {  // the batch's loads, all issued before any FMA
            const int64_t v = b0 + static_cast<int64_t>(u) * tpr * VEC;
            if (v < a.d_in) {
              av[u] = load_vec<VEC>(arow + v);
              xv[u] = load_vec<VEC>(xrow + v);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) av[u].v[i] = xv[u].v[i] = from_acc<T>(Acc(0));
            }
          }
#pragma unroll
          for (int u = 0; u < kShrinkUnroll; ++u)
#pragma unroll
            for (int i = 0; i < VEC; ++i) s += to_acc(xv[u].v[i]) * to_acc(av[u].v[i]);
        }
      }
    }
    s = warp_reduce(s, SumOp{});
    if (wpr > 1) {  // block-uniform
      if (lane == 0) red[warp] = s;
      block_sync();
      if (sub == 0) {
        s = Acc(0);
        for (int w = 0; w < wpr; ++w) s += red[slot * wpr + w];
      }
      block_sync();  // red is reused by the next group
    }
    if (sub == 0 && q < rows) {
      hs[q] = c * s;
      if (rr == 0 && blockIdx.y == 0) f.hid[t * a.k + j] = id;
    }
  }
}

// sass-budget: mk::lora::expand_kernel block=128 regs<=64 spill=0 hot
template <class T, int VEC>
MK_GLOBAL void MK_LORA_BOUNDS expand_kernel(const Workspace<T> f) {
  using Acc = acc_t<T>;
  using V = Vec<T, VEC>;
  const Args<T>& a = f.l;
  const SliceView<T> sv = slice_view(a, blockIdx.z);  // grid.z: the output slice
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= sv.d_out) return;
  const Acc* hsl = f.h + static_cast<int64_t>(blockIdx.z) * a.tokens * a.k * a.r;
  for (int64_t t = blockIdx.y; t < a.tokens; t += gridDim.y) {
    Acc v = Acc(0);
    for (int j = 0; j < a.k; ++j) {
      const int id = f.hid[t * a.k + j];
      if (id < 0) continue;
      const Acc* h = hsl + (t * a.k + j) * a.r;
      const T* brow = sv.B + (static_cast<int64_t>(id) * sv.d_out + o) * a.r;
      const int rn = rank_of(a, id);  // B's columns past it are never read
      Acc d = Acc(0);
      int q = 0;
      for (; q + VEC <= rn; q += VEC) {
        const V bv = load_vec<VEC>(brow + q);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d += to_acc(bv.v[i]) * h[q + i];
      }
      for (; q < rn; ++q) d += to_acc(brow[q]) * h[q];  // mixed ranks: the tail below one vector
      v += d;
    }
    const int64_t yo = t * a.d_out + sv.col + o;
    T* yp = a.y + yo;
    const Acc prev = a.accumulate ? to_acc(*yp) : (a.base != nullptr ? to_acc(a.base[yo]) : Acc(0));
    *yp = from_acc<T>(prev + v);
  }
}

// Workspace bytes of the split path: h [T, k, r] (acc), 16-aligned, then hid [T, k] int32.
// With output slices: h [slices, T, k, r] (each slice's own A), one hid.
template <class T> inline size_t workspace_h_bytes(int64_t tokens, int k, int r, int slices = 1) {
  return (static_cast<size_t>(slices) * tokens * k * r * sizeof(acc_t<T>) + 15) / 16 * 16;
}
template <class T> inline size_t workspace_bytes(int64_t tokens, int k, int r, int slices = 1) {
  return workspace_h_bytes<T>(tokens, k, r, slices) + static_cast<size_t>(tokens) * k * sizeof(int32_t);
}
template <class T> inline void set_workspace(Workspace<T>& f, void* buf) {
  f.h = static_cast<acc_t<T>*>(buf);
  f.hid = reinterpret_cast<int32_t*>(static_cast<unsigned char*>(buf) +
                                     workspace_h_bytes<T>(f.l.tokens, f.l.k, f.l.r, num_slices(f.l)));
}

// Shrink only (the fused pass over W launches its own expand): f.l as for launch, !shared_a.
template <class T>
cudaError_t launch_shrink(Workspace<T>& f, int num_sms, cudaStream_t stream) {
  const Args<T>& a = f.l;
  int vec = pick_vec<T>(a.d_in, {a.x, a.A});
  for (int s = 0; s < a.slices; ++s) vec = std::min(vec, pick_vec<T>(a.d_in, {a.sA[s]}));
  f.tpr = shrink_tpr(a.d_in, vec);
  const int64_t groups = ceil_div(a.tokens * a.k * a.r, kThreads / f.tpr);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(groups, 32 * static_cast<int64_t>(num_sms)));
  dispatch_vec<T>(vec, [&](auto V) {
    auto kernel = shrink_kernel<T, decltype(V)::value>;
    MK_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(num_slices(a))), dim3(kThreads), 0,
              stream, f);
  });
  return last_launch_error();
}

// Split decode path: f.l as for launch (!shared_a), workspace set (set_workspace).
template <class T>
cudaError_t launch_split(Workspace<T>& f, int num_sms, cudaStream_t stream) {
  if (const cudaError_t e = launch_shrink(f, num_sms, stream); e != cudaSuccess) return e;
  const Args<T>& a = f.l;
  int vec = pick_vec<T>(a.r, {a.B});
  for (int s = 0; s < a.slices; ++s) vec = std::min(vec, pick_vec<T>(a.r, {a.sB[s]}));
  const dim3 grid(static_cast<unsigned>(ceil_div(max_slice_d_out(a), kThreads)),
                  static_cast<unsigned>(std::min<int64_t>(a.tokens, 65535)), static_cast<unsigned>(num_slices(a)));
  dispatch_vec<T>(vec, [&](auto V) {
    auto kernel = expand_kernel<T, decltype(V)::value>;
    MK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, f);
  });
  return last_launch_error();
}

// Chunks of d_out per token (grid.y): about one wave of blocks, see the header comment.
inline int chunks_for(int64_t tokens, int d_out, int num_sms) {
  const int64_t by_sms = ceil_div(num_sms, std::max<int64_t>(tokens, 1));
  const int64_t by_cols = ceil_div(d_out, kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({by_sms, by_cols, kMaxChunks})));
}

// Launcher: a.tokens > 0, a.d_out > 0, 1 <= a.r <= kMaxRank, all arrays contiguous; a.x_bytes from
// staged_x_bytes; the caller checked x_bytes + smem_tail_bytes <= kMaxSmem.
template <class T>
cudaError_t launch(const Args<T>& a, int num_sms, cudaStream_t stream) {
  const int n = std::gcd(a.d_in, a.r);
  const int vec = pick_vec<T>(n, {a.x, a.A, a.B});
  const size_t smem = static_cast<size_t>(a.x_bytes) + smem_tail_bytes<T>(a.r, a.k, a.shared_a);
  const dim3 grid(static_cast<unsigned>(a.tokens), static_cast<unsigned>(chunks_for(a.tokens, a.d_out, num_sms)));
  dispatch_vec<T>(vec, [&](auto V) {
    auto kernel = decode_kernel<T, decltype(V)::value>;
    MK_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, a);
  });
  return last_launch_error();
}

}  // namespace mk::lora
