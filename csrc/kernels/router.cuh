// Fused router (METHODS.md §2, selection rules: the agreed spec in router_rules / mokernels/ops/router.py):
// x = z·r (r = 1/τ rounded once to the accumulation type A; τ == 1: x = z, no multiply), order by x
// descending with ties -> lower expert index, e_i = exp(x_i - max x), S = Σ e; keep the shortest prefix
// of that order whose sequential running sum of e reaches fl_A(top_p·S) (top_p >= 1: all live experts,
// no sums), at least 1, at most kmax; p = e/S; renormalise ("sum" | "softmax" | "none"); write the
// compact form (ids [T,kmax] int32 with -1 padding, weights [T,kmax], counts [T]) and optionally the
// dense weights [T,N]. Experts with x = -inf are masked. Rows with a NaN or +inf in x, or only -inf,
// are invalid: count 0, ids -1, weights 0, dense 0 (and a zero gradient).
//
// Forward kernels (launch_fwd picks one per call from N and kmax, fwd_path; all emulated-tested against the
// reference in tests/test_router_kernels.py):
//
//  route_fwd_topk<TI, TO, K, LPR> — the common case: N <= 256 and min(kmax, N) <= K in {2, 8, 16}.
//    * LPR = next_pow2(ceil(N / 8)) lanes per row (1..32), each lane owns 8 *contiguous* logits,
//      loaded first, all of them, as 16-byte vectors (bf16/fp16: 1 LDG.E.128, fp32: 2, fp64: 4; rows
//      whose start is not 16-byte aligned use scalar loads, still all issued before any math). N = 8
//      is one thread per row (no shuffles); 128 / LPR rows per block of 128 threads.
//    * x = z·r (skipped for τ == 1), no division anywhere in the selection.
//    * Each lane sorts its 8 keys in registers with a 19-comparator odd-even merge network; a key
//      orders (x desc, index asc): for fp32 the 64-bit integer (monotone(x bits) << 32 | ~index), so
//      one unsigned compare is the whole order (fp64: (x, index) pairs). -0 is keyed as +0 (equal x).
//    * The group merges the lanes' sorted lists: round j takes the group max of the lanes' heads
//      (log2(LPR) 64-bit shuffle steps), the owning lane pops its head; after round 0, m = x_0 is the
//      row max and one pass over the registers gives S (8 exp per lane). The rounds run the top-p prefix
//      rule sequentially (e_j = exp(x_j - m), running sum vs fl(top_p·S)) and stop when every row of
//      the warp is done (ballot), so top-2 costs 2 rounds whatever K is.
//    * Winner j is kept by lane j mod LPR, which writes ids[j] / weights[j] (coalesced); the dense row
//      is written by the owners of the experts (kept bitmask per lane).
//    Paper roofline, H100 (3.0 TB/s), bf16, T = 65536, N = 64, top-p 0.6, max_k 8: bytes per row =
//    128 (logits) + 8·4 + 8·2 (ids, weights) + 4 (count) = 180 B -> 11.8 MB -> 3.9 µs. Instructions per
//    lane: ~25 load/convert/key, ~115 sort network, ~30 S pass, ~25 per merge round (3 shuffle steps on
//    64-bit keys, pop, running sum, exp) x ~3 rounds, ~20 writes: ~265 -> ~66 warp-instructions per row
//    (4 rows per warp) -> 4.3 M warp-instructions = ~3.2 µs on 132 SMs x 4 schedulers x 1.75 GHz if
//    one issues per cycle per scheduler: issue and memory time are comparable, both under the 8 µs
//    target. N = 8 (1 thread/row): 16 B + outputs per row, ~200 instructions per row / 32 rows per
//    warp. Registers (nvcc 13.0, sm_80 / sm_90a, scripts/sass_report.py; budget 64, no spill, checked
//    in CI for fp16/bf16/fp32): bf16 K=8 (max_k 8) LPR=8 (N=64) 56 / 48, K=2 (top-2) 48 / 40, N=8
//    (LPR=1) 48 / 48, the largest K=16 LPR=2 64 / 64 (the winner slots); no local memory. fp64 (not
//    hot) 72-115 registers with small spills on some instances.
//
//  route_fwd_warp<TI, TO, KPL> — keep-many rows: min(kmax, N) > 16 at N <= 256 (wide top-p with
//    an uncapped kmax, keep-all, kmax > 16). One warp per row (4 rows per block of 128), no shared
//    memory, no barriers. KPL = next_pow2(ceil(N / 32)) in {1, 2, 4, 8} keys per lane, lane l owning
//    the contiguous logits [l·KPL, (l+1)·KPL) (loaded first, 16-byte vectors where aligned), keyed as
//    above (padding and -inf: "no expert", sorted last).
//    * A descending bitonic sort of the 32·KPL keys written out at compile time: distances < KPL
//      compare-exchange inside a lane's registers, distances >= KPL exchange with lane ^ (J / KPL)
//      by one shuffle per key (the blocked layout keeps the short distances, the most frequent, in
//      registers: for N = 256, 21 of the 36 steps; 15 shuffle). Sorted position j = lane·KPL + r.
//    * m = position 0 (broadcast), e_j = exp(x_j - m), S and the live count by warp reductions.
//    * The cut (top_p_cut), bit-exact to rule 4's *sequential* fp32 running sum: an fp64 warp scan of
//      the sorted e gives every prefix to ~1e-14 relative; the sequential fp32 sum of c terms differs
//      from the exact one by at most (c-1)·2^-24·prefix, so when the fp64 prefix at the candidate c
//      is above fl(top_p·S) and the one at c-1 below, each by more than that band, c is the rule's
//      cut (the sequential sum is monotone, e >= 0). Otherwise (a prefix within rounding of the
//      threshold: exact ties such as uniform rows, a tail too small for the fp32 sum to see) the
//      lanes redo the sequential sum in order, one lane at a time, stopping at the cut (~KPL + 6
//      instructions per lane step, <= 32 steps). fp64 rows always take that sequential path.
//    * ids/weights of position j by lane j / KPL (the warp's stores cover one contiguous range),
//      pads past 32·KPL, count by lane 0; dense: the owners re-read their logits (L1/L2) and keep an
//      expert iff its key is not below the last kept one (rebuilt from that expert's logit).
//    Estimate, H100 (132 SMs x 4 schedulers x 1.75 GHz; no GPU run), T = 65536, N = 256, top-p 0.95
//    (kmax = N), bf16: bytes per row 512 (logits) + 256·(4 + 2) (ids, weights) + 4 = 2.05 KB -> 134 MB
//    -> 45 µs roofline at 3.0 TB/s. Instructions per lane (= warp-instructions per row): ~50 load /
//    key, sort ~1430 (84 in-register compare-exchanges x ~7 on 64-bit keys, 15 shuffle steps x 8 keys
//    x ~7: 2 SHFL, 64-bit compare, selects), ~100 e / S / live, ~70 cut (fast path), ~80 renorm sums
//    and stores: ~1750 -> 115 M warp-instructions -> ~125 µs issue-bound (SHFL alone: ~270 per row ->
//    ~77 µs at one warp-shuffle per SM-cycle), i.e. ~2.8x the roofline. route_fwd_sort counted the
//    same way: 36 barrier steps x 8 warps x ~12 instructions + one thread's ~240-step scan (~1 K,
//    also ~7 K cycles of latency per row) + ~800 other -> ~5 K warp-instructions per row, ~350 µs
//    (the ~160 µs above counted latency only): the warp kernel issues ~3x fewer instructions and
//    has no barriers. Next step if a GPU run shows the sort dominating: 32-bit keys (x's top 24 bits
//    | 8-bit index; rows with equal prefixes fixed up by an odd-even pass on the full key), halving
//    the sort (~75 µs). Registers (nvcc 13.0, sm_80 / sm_90a, __launch_bounds__(128, 8): 8 blocks
//    per SM; with the block size alone sm_80 took 72 for KPL = 8): KPL = 8 64 / 64, KPL = 4 48 / 48,
//    KPL = 1 40 / 40 (fp16, bf16, fp32), no local memory; fp64 (not hot, 4 blocks) 69 / 76.
//    N > 256 stays on route_fwd_sort: KPL = 16 needs 32 registers of keys alone (spills at 64).
//
//  route_fwd_sort<TI, TO> — everything else up to N = 4096 (fp64: 2048): keep-many rows at N > 256
//    and large N. One block of 256 threads per row: the keys of the
//    row in shared memory (next_pow2(N) x 8 B, fp64 x 16 B), a bitonic sort (log2²(N)/2 barrier steps),
//    e_j in shared memory, S and the renorm sums by fixed-order block reductions, the top-p prefix by
//    one thread's sequential scan of the sorted e (the rule's summation order), stopping at the cut.
//    Bytes per row: N·elt in, outputs; N = 256 top-p 0.95: 36 bitonic barrier steps (~1.5 K cycles)
//    + ~240 dependent adds of the scan (~2.5 K cycles) -> ~4-5 K cycles per row, 8 blocks (rows) per
//    SM in flight -> ~160 µs at T = 65536 on an H100 (estimate; latency bound, 3 KB smem per row; the
//    roofline is 45 µs; see route_fwd_warp for an instruction count). The peer is torch's softmax +
//    segmented sort + cumsum.
//    Registers: 32 (fp64 48), dynamic smem next_pow2(N)·12 B (fp64 24 B); above 32 KiB (N = 4096 fp32,
//    2048 fp64: 48 KiB + 64 B static) the launcher opts in (MK_SET_MAX_DYNAMIC_SMEM; the emulator
//    checks static + dynamic against 48 KiB and the opt-in like the GPU).
//
//  cosine_logits_kernel — SAMoRA: cos(h_t, k_i) in A into a [T, N] workspace that the kernels above
//    then route (the keys of a 32-expert chunk transposed in shared memory with their norms, computed
//    once per block; |h_t|² once per row; h tile of 32 rows staged in shared memory). Writing and
//    reading the fp32 [T, N] logits costs 8·N bytes per row more than a fully fused kernel (N = 8,
//    r = 8 bf16: 16 B of h + 64 B workspace + the router's outputs per row; fusing it into
//    route_fwd_topk is the next step). ~2·r FMA per (row, expert) from shared memory, conflict-free;
//    registers 40 (fp64 64 / 48), static smem 17 KB (fp64 34 KB), sm_80 / sm_90a.
//
// Backward (route_bwd_kernel, N <= 1024; route_bwd_large above, block per row, see there): selection held fixed (read back from ids), p recomputed from
// the logits (x = z·r), the kept experts' p fetched from the owning lane by shuffle (no re-read, no
// exp per kept expert), gradient through the renormalisation, dz_i = r·p_i (g_i - Σ_l g_l p_l).
// Per row: N·elt read (the logits, once), kmax·(4 + elt) (ids, grads), N·elt written; ~N/GROUP
// exp per lane, ~VPL shuffles per kept slot chunk, 2·GROUP shuffles per chunk for the scatter.
// Registers (bf16, sm_80 / sm_90a): N <= 64: 40 / 39, N = 1024 (VPL 32): 96 / 95, not hot; the
// register-resident [VPL] row is the old layout (a vectorised layout like route_fwd_topk's is open).
#pragma once

#include <climits>
#include <cstring>
#include <type_traits>

#include "common/dtype.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "common/warp.cuh"

namespace mk::router {

enum Renorm : int { kSum = 0, kSoftmax = 1, kNone = 2 };

constexpr int kThreads = 128;       // route_fwd_topk, route_bwd_kernel
constexpr int kSortThreads = 256;   // route_fwd_sort: one block per row
constexpr int kLaneElems = 8;       // route_fwd_topk: contiguous logits per lane
constexpr int kTopkMaxN = 32 * kLaneElems;  // 256
constexpr int kTopkMaxK = 16;
constexpr int kWarpMaxN = 256;      // route_fwd_warp: 32·KPL keys in registers, KPL <= 8
constexpr int kMaxN = 4096;         // forward, fp16/bf16/fp32 (fp64: kMaxN / 2)
constexpr int kBwdMaxN = 1024;      // route_bwd_kernel (larger N, up to max_n: route_bwd_large)
constexpr int kSortSmemBytes = 48 * 1024;

template <class A> constexpr int max_n() { return sizeof(A) == 8 ? kMaxN / 2 : kMaxN; }

// ---- order keys: (x desc, index asc) as one comparable value ----

MK_DEVICE uint32_t float_bits(float x) {
#if defined(MOKERNELS_EMULATION)
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#else
  return __float_as_uint(x);
#endif
}
MK_DEVICE float bits_float(uint32_t u) {
#if defined(MOKERNELS_EMULATION)
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#else
  return __uint_as_float(u);
#endif
}

template <class A> struct Order;

// fp32: monotone uint32 of the float bits (sign flips all bits of negatives, sets the top bit of
// positives) in the high word, ~index in the low word: a larger key = larger x, then lower index.
// 0 is "no expert" (every real key has a non-zero high word). Only non-NaN x > -inf are keyed.
template <> struct Order<float> {
  using Key = uint64_t;
  MK_DEVICE static Key none() { return 0; }
  MK_DEVICE static Key make(float x, int i) {
    uint32_t u = float_bits(x == 0.0f ? 0.0f : x);  // -0 == +0: the same key, ties by index
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
  }
  MK_DEVICE static bool is_none(Key k) { return k == 0; }
  MK_DEVICE static bool gt(Key a, Key b) { return a > b; }
  MK_DEVICE static bool eq(Key a, Key b) { return a == b; }
  MK_DEVICE static float x(Key k) {
    const uint32_t u = static_cast<uint32_t>(k >> 32);
    return bits_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
  }
  MK_DEVICE static int idx(Key k) { return static_cast<int>(0xffffffffu - static_cast<uint32_t>(k)); }
  MK_DEVICE static Key shfl(Key k, int m) { return shfl_xor(k, m); }
  MK_DEVICE static Key bcast(Key k, int src) { return shfl_idx(k, src); }
};

// fp64: no room for the index next to 64 float bits: (x, index) pairs.
template <> struct Order<double> {
  struct Key {
    double x;
    int i;
  };
  MK_DEVICE static Key none() { return {-infinity<double>(), INT_MAX}; }
  MK_DEVICE static Key make(double x, int i) { return {x == 0.0 ? 0.0 : x, i}; }
  MK_DEVICE static bool is_none(Key k) { return k.i == INT_MAX; }
  MK_DEVICE static bool gt(Key a, Key b) { return a.x > b.x || (a.x == b.x && a.i < b.i); }
  MK_DEVICE static bool eq(Key a, Key b) { return a.i == b.i; }
  MK_DEVICE static double x(Key k) { return k.x; }
  MK_DEVICE static int idx(Key k) { return k.i; }
  MK_DEVICE static Key shfl(Key k, int m) { return {shfl_xor(k.x, m), shfl_xor(k.i, m)}; }
  MK_DEVICE static Key bcast(Key k, int src) { return {shfl_idx(k.x, src), shfl_idx(k.i, src)}; }
};

template <class O> MK_DEVICE void cas_desc(typename O::Key& a, typename O::Key& b) {
  const typename O::Key x = a, y = b;
  const bool sw = O::gt(y, x);
  a = sw ? y : x;
  b = sw ? x : y;
}

// Descending sort of the 8 keys of a lane in registers: Batcher's odd-even merge sort, 19
// compare-exchanges written out (loops over a comparator table left the keys in local memory).
template <class O> MK_DEVICE void sort8_desc(typename O::Key (&k)[8]) {
  cas_desc<O>(k[0], k[1]); cas_desc<O>(k[2], k[3]); cas_desc<O>(k[4], k[5]); cas_desc<O>(k[6], k[7]);
  cas_desc<O>(k[0], k[2]); cas_desc<O>(k[1], k[3]); cas_desc<O>(k[4], k[6]); cas_desc<O>(k[5], k[7]);
  cas_desc<O>(k[1], k[2]); cas_desc<O>(k[5], k[6]);
  cas_desc<O>(k[0], k[4]); cas_desc<O>(k[1], k[5]); cas_desc<O>(k[2], k[6]); cas_desc<O>(k[3], k[7]);
  cas_desc<O>(k[2], k[4]); cas_desc<O>(k[3], k[5]);
  cas_desc<O>(k[1], k[2]); cas_desc<O>(k[3], k[4]); cas_desc<O>(k[5], k[6]);
}

template <class T> MK_DEVICE T neg_inf() { return from_acc<T>(-infinity<acc_t<T>>()); }

// The 8 logits of a lane, [p, p + avail) of the row (avail <= 0: none), -inf beyond; every load is
// issued before any of them is used. vec_ok: p is 16-byte aligned and avail a multiple of the vector.
template <class T, int E> MK_DEVICE void load_lane(T (&raw)[E], const T* p, int avail, bool vec_ok) {
  const T ninf = neg_inf<T>();
  if (vec_ok) {
    constexpr int V = kVec16<T> < E ? kVec16<T> : E;
#pragma unroll
    for (int v = 0; v < E / V; ++v) {
      Vec<T, V> x;
      if (v * V < avail) {
        x = load_vec<V>(p + v * V);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) x.v[i] = ninf;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) raw[v * V + i] = x.v[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) raw[j] = j < avail ? p[j] : ninf;
  }
}

// x = z·r in A (τ == 1: unit, x = z exactly).
template <class A, class T> MK_DEVICE A scaled(T z, A r, bool unit) {
  const A x = to_acc(z);
  return unit ? x : x * r;
}

// The renormalised weight of a kept expert from its e = exp(x - m).
template <class A> struct Renormer {
  int renorm;
  A inv_s, inv_sel, inv_z;
  MK_DEVICE A operator()(A e) const {
    if (renorm == kSum) return e * inv_sel;
    if (renorm == kSoftmax) return exp_acc(e * inv_s - inv_s) * inv_z;  // softmax over p_sel, max p = 1/S
    return e * inv_s;
  }
};

// Forward outputs and options shared by the forward kernels.
template <class TO> struct FwdOut {
  int32_t* __restrict__ ids;
  TO* __restrict__ weights;
  int32_t* __restrict__ counts;
  TO* __restrict__ dense;  // null: no dense output
};
template <class A> struct FwdOpts {
  int64_t rows;
  int n, kmax;
  A r;        // 1/τ rounded once to A
  bool unit;  // τ == 1: x = z
  A top_p;    // >= 1: keep all
  int renorm;
};

// sass-budget: mk::router::route_fwd_topk<__nv_bfloat16,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_topk<__half,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_topk<float,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_topk<double,*> block=128 regs<=128
template <class TI, class TO, int K, int LPR>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    route_fwd_topk(const TI* __restrict__ z, FwdOut<TO> out, FwdOpts<acc_t<TO>> o, bool vec_ok) {
  using A = acc_t<TO>;
  using O = Order<A>;
  using Key = typename O::Key;
  constexpr int E = kLaneElems;
  constexpr int KL = K < E ? K : E;              // a lane never contributes more than E winners
  constexpr int SLOTS = (K + LPR - 1) / LPR;     // winners kept per lane (winner j -> lane j % LPR)
  static_assert(LPR > 1 || K <= E, "one lane per row: the winners are its sorted list");
  static_assert(LPR >= 1 && LPR <= 32 && (LPR & (LPR - 1)) == 0, "LPR: power of two <= 32");
  const int glane = lane_id() & (LPR - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / LPR) + threadIdx.x / LPR;
  const bool active = row < o.rows;
  const int base = glane * E;
  const int n = o.n;

  // 1. every load of the lane first
  TI raw[E];
  load_lane<TI, E>(raw, z + (active ? row : 0) * n + base, active ? n - base : 0, vec_ok);

  // 2. keys, NaN/+inf check, per-lane sort
  bool bad = false;
  Key list[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const A x = scaled(raw[j], o.r, o.unit);
    bad = bad || x != x || x == infinity<A>();
    list[j] = x > -infinity<A>() ? O::make(x, base + j) : O::none();
  }
  static_assert(E == 8, "sort8_desc sorts 8 keys per lane");
  sort8_desc<O>(list);
  bad = group_reduce<LPR>(static_cast<int>(bad), MaxOp{}) != 0;

  auto group_max = [&](Key k) {
#pragma unroll
    for (int m = LPR / 2; m > 0; m >>= 1) {
      const Key other = O::shfl(k, m);
      if (O::gt(other, k)) k = other;
    }
    return k;
  };

  // 3. round 0 gives the row max m; S = Σ exp(x - m) over the lane's registers, then the group
  Key w = group_max(list[0]);
  const bool valid = active && !bad && !O::is_none(w);
  const A m = valid ? O::x(w) : A(0);
  A s = A(0);
#pragma unroll
  for (int j = 0; j < E; ++j) s += exp_acc(scaled(raw[j], o.r, o.unit) - m);  // masked: exp(-inf) = 0
  s = group_reduce<LPR>(s, SumOp{});
  const A inv_s = valid ? A(1) / s : A(0);
  const bool use_p = o.top_p < A(1);
  const A thr = o.top_p * s;  // fl_A(top_p · S)

  // 4. merge rounds: winner j = the group max of the heads; the top-p prefix rule, in order
  bool done = !valid;
  int count = 0;
  A s_sel = A(0), z_soft = A(0);
  A wx[SLOTS];   // LPR > 1 only
  int wi[SLOTS];
#pragma unroll
  for (int q = 0; q < SLOTS; ++q) {
    wx[q] = A(0);
    wi[q] = -1;
  }
  uint32_t kept = 0;  // bit j: this lane's logit base + j was selected
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (j > 0) {
      if (ballot(!done) == 0u) break;  // warp-uniform
      if constexpr (LPR == 1) w = list[j];  // one lane per row: its sorted list is the order
      else w = group_max(list[0]);
    }
    if (!done) {
      if (O::is_none(w)) {
        done = true;  // no live expert left
      } else {
        const A xw = O::x(w);
        const A e = exp_acc(xw - m);
        if constexpr (LPR == 1) {
          kept |= 1u << (O::idx(w) - base);
        } else {
          if ((j & (LPR - 1)) == glane) {
            wx[j / LPR] = xw;
            wi[j / LPR] = O::idx(w);
          }
          if (O::eq(list[0], w)) {  // the owner pops its head
            kept |= 1u << (O::idx(w) - base);
#pragma unroll
            for (int i = 0; i + 1 < KL; ++i) list[i] = list[i + 1];
            list[KL - 1] = O::none();
          }
        }
        count = j + 1;
        s_sel += e;  // the running sum, sequential in the order
        if (o.renorm == kSoftmax) z_soft += exp_acc(e * inv_s - inv_s);
        if (count >= o.kmax || (use_p && s_sel >= thr)) done = true;
      }
    }
  }
  if (!active) return;  // no collective below

  // 5. writes: winner j by lane j % LPR (coalesced), pads, count, dense by the owners
  const Renormer<A> wt{o.renorm, inv_s, s_sel > A(0) ? A(1) / s_sel : A(0), z_soft > A(0) ? A(1) / z_soft : A(0)};
  const int64_t cb = row * o.kmax;
#pragma unroll
  for (int q = 0; q < SLOTS; ++q) {
    const int j = q * LPR + glane;
    if (j < o.kmax) {
      const bool k = j < count;
      int id;
      A xw;
      if constexpr (LPR == 1) {  // winner q is list[q] (K <= E here)
        id = O::idx(list[q]);
        xw = O::x(list[q]);
      } else {
        id = wi[q];
        xw = wx[q];
      }
      out.ids[cb + j] = k ? id : -1;
      out.weights[cb + j] = from_acc<TO>(k ? wt(exp_acc(xw - m)) : A(0));
    }
  }
  for (int j = SLOTS * LPR + glane; j < o.kmax; j += LPR) {
    out.ids[cb + j] = -1;
    out.weights[cb + j] = from_acc<TO>(A(0));
  }
  if (glane == 0) out.counts[row] = count;
  if (out.dense != nullptr) {
    TO* d = out.dense + row * n + base;
#pragma unroll
    for (int j = 0; j < E; ++j)
      if (base + j < n)
        d[j] = from_acc<TO>(((kept >> j) & 1u) ? wt(exp_acc(scaled(raw[j], o.r, o.unit) - m)) : A(0));
  }
}

// op over the block (kSortThreads threads), in a fixed order; every thread gets the result.
// `red` holds one value per warp; the trailing barrier lets the caller reuse it at once.
template <class V, class Op> MK_DEVICE V block_reduce(V v, V* red, Op op) {
  constexpr int kWarps = kSortThreads / kWarpSize;
  v = warp_reduce(v, op);
  if (lane_id() == 0) red[threadIdx.x / kWarpSize] = v;
  block_sync();
  V t = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) t = op(t, red[w]);
  block_sync();
  return t;
}
template <class V> MK_DEVICE V block_sum(V v, V* red) { return block_reduce(v, red, SumOp{}); }

// Dynamic shared memory of route_fwd_sort for row length n: keys and e of next_pow2(n) slots.
template <class A> inline size_t sort_smem_bytes(int np) {
  return static_cast<size_t>(np) * (sizeof(typename Order<A>::Key) + sizeof(A));
}

// One block per row: keys sorted in shared memory, the top-p cut by a sequential scan (see the header).
// fp64 (not hot): nvcc 13.0 sm_90a spills 8 B at 48 registers (sm_80: none), exempted below.
// sass-budget: mk::router::route_fwd_sort<__nv_bfloat16,*> block=256 smem=49152 regs<=64 spill=0
// sass-budget: mk::router::route_fwd_sort<__half,*> block=256 smem=49152 regs<=64 spill=0
// sass-budget: mk::router::route_fwd_sort<float,*> block=256 smem=49152 regs<=64 spill=0
// sass-budget: mk::router::route_fwd_sort<double,*> block=256 smem=49152 regs<=64 spill=8
template <class TI, class TO>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kSortThreads)
    route_fwd_sort(const TI* __restrict__ z, FwdOut<TO> out, FwdOpts<acc_t<TO>> o, int np) {
  using A = acc_t<TO>;
  using O = Order<A>;
  using Key = typename O::Key;
  constexpr int kWarps = kSortThreads / kWarpSize;
  MK_DYNAMIC_SHARED(unsigned char, smem);
  Key* keys = reinterpret_cast<Key*>(smem);
  A* ev = reinterpret_cast<A*>(smem + static_cast<size_t>(np) * sizeof(Key));
  MK_SHARED_ARRAY(A, red_a, kWarps);
  MK_SHARED_ARRAY(int, red_i, kWarps);
  MK_SHARED_ARRAY(int, cut, 1);
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int n = o.n;
  const TI* zr = z + row * n;

  // keys of the row (-inf and the padding to np: none), NaN/+inf flag
  int bad = 0;
  for (int i = tid; i < np; i += kSortThreads) {
    Key k = O::none();
    if (i < n) {
      const A x = scaled(zr[i], o.r, o.unit);
      if (x != x || x == infinity<A>()) bad = 1;
      if (x > -infinity<A>()) k = O::make(x, i);
    }
    keys[i] = k;
  }
  bad = block_sum(bad, red_i);  // also the barrier after the key writes

  // bitonic sort, descending
  for (int kk = 2; kk <= np; kk <<= 1) {
    for (int j = kk >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < np; i += kSortThreads) {
        const int l = i ^ j;
        if (l > i) {
          const Key a = keys[i], b = keys[l];
          if ((i & kk) == 0 ? O::gt(b, a) : O::gt(a, b)) {
            keys[i] = b;
            keys[l] = a;
          }
        }
      }
      block_sync();
    }
  }

  const Key top = keys[0];
  const bool valid = bad == 0 && !O::is_none(top);
  const A m = valid ? O::x(top) : A(0);
  A s = A(0);
  int live = 0;
  for (int i = tid; i < np; i += kSortThreads) {
    const Key k = keys[i];
    const A e = O::is_none(k) ? A(0) : exp_acc(O::x(k) - m);
    ev[i] = e;
    s += e;
    live += O::is_none(k) ? 0 : 1;
  }
  s = block_sum(s, red_a);  // also the barrier after the ev writes
  live = block_sum(live, red_i);
  const A inv_s = valid ? A(1) / s : A(0);
  const int cap = o.kmax < live ? o.kmax : live;
  if (tid == 0) {
    int c = valid ? cap : 0;
    if (valid && o.top_p < A(1)) {  // the shortest prefix whose sequential running sum reaches top_p·S
      const A thr = o.top_p * s;
      A cum = A(0);
      for (int j = 0; j < cap; ++j) {
        cum += ev[j];
        if (cum >= thr) {
          c = j + 1;
          break;
        }
      }
    }
    cut[0] = c;
  }
  block_sync();
  const int count = cut[0];
  A ss = A(0), zs = A(0);
  for (int j = tid; j < count; j += kSortThreads) {
    ss += ev[j];
    if (o.renorm == kSoftmax) zs += exp_acc(ev[j] * inv_s - inv_s);
  }
  ss = block_sum(ss, red_a);
  zs = block_sum(zs, red_a);
  const Renormer<A> wt{o.renorm, inv_s, ss > A(0) ? A(1) / ss : A(0), zs > A(0) ? A(1) / zs : A(0)};
  const int64_t cb = row * o.kmax;
  for (int j = tid; j < o.kmax; j += kSortThreads) {
    const bool k = j < count;
    out.ids[cb + j] = k ? O::idx(keys[j]) : -1;
    out.weights[cb + j] = from_acc<TO>(k ? wt(ev[j]) : A(0));
  }
  if (tid == 0) out.counts[row] = count;
  if (out.dense != nullptr) {
    const Key last = count > 0 ? keys[count - 1] : O::none();
    for (int i = tid; i < n; i += kSortThreads) {
      const A x = scaled(zr[i], o.r, o.unit);
      // kept iff its key is not below the last kept key (keys are unique)
      const bool k = count > 0 && x > -infinity<A>() && !O::gt(last, O::make(x, i));
      out.dense[row * n + i] = from_acc<TO>(k ? wt(exp_acc(x - m)) : A(0));
    }
  }
}

// ---- keep-many rows, one warp per row (route_fwd_warp) ----

// 8 blocks of 128 threads per SM (<= 64 registers): with the block size alone ptxas (CUDA 13.0) took
// 72 registers on sm_80 for KPL = 8 (61 on sm_90a). fp64 (not hot): 4 blocks, no cap at 64.
#if defined(MOKERNELS_EMULATION)
#define MK_ROUTER_WARP_BOUNDS
#else
#define MK_ROUTER_WARP_BOUNDS __launch_bounds__(kThreads, sizeof(acc_t<TO>) == 8 ? 4 : 8)
#endif

// One compare-exchange step (stage KK, distance J) of a descending bitonic sort of the warp's
// 32·KPL keys, element e = lane·KPL + r in k[r] of `lane` (blocked: each lane's keys are contiguous).
// J < KPL: inside a lane's registers; J >= KPL: with lane (lane ^ J/KPL) by one shuffle per key.
// Sub-sequences whose e has bit KK clear are ordered descending, the others ascending.
template <class O, int KPL, int KK, int J>
MK_DEVICE void bitonic_step(typename O::Key (&k)[KPL], int lane) {
  using Key = typename O::Key;
  if constexpr (J >= KPL) {
    constexpr int LM = J / KPL;
    const bool lower = (lane & LM) == 0;
    const bool desc = ((lane * KPL) & KK) == 0;  // KK > J >= KPL: the lane decides
    const bool keep_max = lower == desc;
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      const Key o = O::shfl(k[r], LM);
      k[r] = O::gt(o, k[r]) == keep_max ? o : k[r];
    }
  } else {
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      if ((r & J) != 0) continue;
      const bool desc = ((lane * KPL + r) & KK) == 0;
      const Key a = k[r], b = k[r | J];
      const bool sw = O::gt(b, a) == desc;  // values, not references: the keys stay in registers
      k[r] = sw ? b : a;
      k[r | J] = sw ? a : b;
    }
  }
}

// Stages KK..32·KPL (distance J first), all written out at compile time (the keys stay in registers).
template <class O, int KPL, int KK, int J>
MK_DEVICE void bitonic_from(typename O::Key (&k)[KPL], int lane) {
  if constexpr (KK <= 32 * KPL) {
    bitonic_step<O, KPL, KK, J>(k, lane);
    if constexpr (J > 1) bitonic_from<O, KPL, KK, J / 2>(k, lane);
    else bitonic_from<O, KPL, KK * 2, KK>(k, lane);
  }
}

// The top-p cut (rule 4) over the sorted e of the warp (blocked, e[r] = e of position lane·KPL + r):
// the shortest prefix whose *sequential* running sum in A reaches thr, capped at cap (>= 1).
// fp32: a warp scan in fp64 gives every prefix to ~1e-14 relative; the sequential fp32 sum of c terms
// differs from the exact one by at most (c-1)·2^-24·prefix (+ c·2^-149 for subnormal terms), so when
// the fp64 prefix at the candidate c is above thr and the one at c-1 below by more than that band,
// c is the cut of the sequential sum (which is monotone: e >= 0). Otherwise (a prefix within rounding
// of thr: exact ties such as uniform rows, or top_p·S landing on a partial sum) the lanes redo the
// sequential sum in order, one lane at a time (`chain`). fp64 (not hot) always takes the chain.
template <class A, int KPL> MK_DEVICE int top_p_cut(const A (&e)[KPL], A thr, int cap, int lane) {
  const int base = lane * KPL;
  if constexpr (std::is_same_v<A, float>) {
    double tot = 0.0;
#pragma unroll
    for (int r = 0; r < KPL; ++r) tot += static_cast<double>(e[r]);
    double inc = tot;  // inclusive scan of the lane totals
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const double t = shfl_idx(inc, lane - d);
      if (lane >= d) inc += t;
    }
    double run = shfl_idx(inc, lane - 1);
    if (lane == 0) run = 0.0;
    // per lane: the first position whose fp64 prefix reaches thr (hit), else its last one below cap;
    // dh = the fp64 prefix there, eh = its term (the prefix before it is dh - eh)
    int hit = -1;
    double dh = 0.0;
    A eh = A(0);
    const double th = thr;
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      run += static_cast<double>(e[r]);
      if (base + r < cap && hit < 0) {
        dh = run;
        eh = e[r];
        if (run >= th) hit = r;
      }
    }
    // band(c, D): bound on |sequential fp32 sum of c terms - D| (D ~ the exact prefix sum)
    auto band = [](int c, double d) { return d * ((c - 1) * 5.9619e-8 + 1.5e-14) + c * 1.5e-45; };
    const bool banded = MK_MUTABLE("router.warp_band");  // the mutant trusts the fp64 candidate as is
    const uint32_t hb = ballot(hit >= 0);
    if (hb == 0u) {
      const double dc = shfl_idx(dh, (cap - 1) / KPL);
      if (!banded || dc + band(cap, dc) < th) return cap;  // even the whole capped prefix stays below thr
    } else {
      const int L = lowest_lane(hb);
      const int c = L * KPL + shfl_idx(hit, L) + 1;
      const double dhc = shfl_idx(dh, L), dpc = dhc - static_cast<double>(shfl_idx(eh, L));
      if (!banded || (dhc - band(c, dhc) >= th && (c == 1 || dpc + band(c - 1, dpc) < th))) return c;
    }
  }
  // chain: lane L continues the running sum of lanes < L over its KPL terms, in order
  A carry = A(0);
  for (int L = 0; L * KPL < cap; ++L) {  // uniform
    A run = carry;
    int h = -1;
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      run += e[r];
      if (h < 0 && base + r < cap && run >= thr) h = r;
    }
    const int hl = shfl_idx(h, L);
    carry = shfl_idx(run, L);
    if (hl >= 0) return L * KPL + hl + 1;
  }
  return cap;
}

// Keep-many rows (kmax > 16 after capping at N, N <= kWarpMaxN): one warp per row, 4 rows per block.
// Lane l owns the KPL contiguous logits [l·KPL, (l+1)·KPL) (loaded first, 16-byte vectors where
// aligned), keys as in route_fwd_topk, a bitonic sort of the 32·KPL keys in registers + shuffles,
// S and the renorm sums by warp reductions, the cut by top_p_cut, ids/weights of sorted position j
// written by lane j / KPL (the warp's stores cover one contiguous range), dense by the experts' owners.
// sass-budget: mk::router::route_fwd_warp<__nv_bfloat16,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_warp<__half,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_warp<float,*> block=128 regs<=64 spill=0 hot
// sass-budget: mk::router::route_fwd_warp<double,*> block=128 regs<=128
template <class TI, class TO, int KPL>
MK_GLOBAL void MK_ROUTER_WARP_BOUNDS
    route_fwd_warp(const TI* __restrict__ z, FwdOut<TO> out, FwdOpts<acc_t<TO>> o, bool vec_ok) {
  using A = acc_t<TO>;
  using O = Order<A>;
  using Key = typename O::Key;
  const int lane = lane_id();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= o.rows) return;  // the whole warp: no collective is split
  const int n = o.n;
  const int base = lane * KPL;
  const TI* zr = z + row * n;

  Key k[KPL];
  bool bad = false;
  {
    TI raw[KPL];
    load_lane<TI, KPL>(raw, zr + base, n - base, vec_ok);
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      const A x = scaled(raw[r], o.r, o.unit);
      bad = bad || x != x || x == infinity<A>();
      k[r] = x > -infinity<A>() ? O::make(x, base + r) : O::none();
    }
  }
  bitonic_from<O, KPL, 2, 1>(k, lane);
  bad = ballot(bad) != 0u;

  const Key top = O::bcast(k[0], 0);
  const bool valid = !bad && !O::is_none(top);
  const A m = valid ? O::x(top) : A(0);
  A e[KPL];
  A s = A(0);
  int live = 0;
#pragma unroll
  for (int r = 0; r < KPL; ++r) {
    const bool none = O::is_none(k[r]);
    e[r] = none ? A(0) : exp_acc(O::x(k[r]) - m);
    s += e[r];
    live += none ? 0 : 1;
  }
  s = warp_reduce(s, SumOp{});
  live = warp_reduce(live, SumOp{});
  const A inv_s = valid ? A(1) / s : A(0);
  const int cap = o.kmax < live ? o.kmax : live;
  int count = valid ? cap : 0;
  if (valid && o.top_p < A(1)) count = top_p_cut<A, KPL>(e, o.top_p * s, cap, lane);

  A ss = A(0), zs = A(0);
#pragma unroll
  for (int r = 0; r < KPL; ++r) {
    if (base + r < count) {
      ss += e[r];
      if (o.renorm == kSoftmax) zs += exp_acc(e[r] * inv_s - inv_s);
    }
  }
  ss = warp_reduce(ss, SumOp{});
  if (o.renorm == kSoftmax) zs = warp_reduce(zs, SumOp{});  // uniform
  const Renormer<A> wt{o.renorm, inv_s, ss > A(0) ? A(1) / ss : A(0), zs > A(0) ? A(1) / zs : A(0)};

  const int64_t cb = row * o.kmax;
  int id[KPL];  // from here on only the expert ids of the sorted keys are needed
#pragma unroll
  for (int r = 0; r < KPL; ++r) id[r] = O::idx(k[r]);
#pragma unroll
  for (int r = 0; r < KPL; ++r) {
    const int j = base + r;
    if (j < o.kmax) {
      const bool kept = j < count;
      out.ids[cb + j] = kept ? id[r] : -1;
      out.weights[cb + j] = from_acc<TO>(kept ? wt(e[r]) : A(0));
    }
  }
  for (int j = 32 * KPL + lane; j < o.kmax; j += kWarpSize) {
    out.ids[cb + j] = -1;
    out.weights[cb + j] = from_acc<TO>(A(0));
  }
  if (lane == 0) out.counts[row] = count;
  if (out.dense != nullptr) {
    // kept iff its key is not below the last kept key (keys are unique); the logits again (L1/L2),
    // the last kept key rebuilt from its expert's logit
    Key last = O::none();
    if (count > 0) {  // uniform
      int t = id[0];  // the lane's last kept id (not id[(count-1) % KPL]: a dynamic index would put
#pragma unroll      // the array in local memory)
      for (int r = 1; r < KPL; ++r)
        if (base + r < count) t = id[r];
      const int il = shfl_idx(t, (count - 1) / KPL);
      last = O::make(scaled(zr[il], o.r, o.unit), il);
    }
    TI raw[KPL];
    load_lane<TI, KPL>(raw, zr + base, n - base, vec_ok);
    TO* d = out.dense + row * n + base;
#pragma unroll
    for (int r = 0; r < KPL; ++r) {
      if (base + r < n) {
        const A x = scaled(raw[r], o.r, o.unit);
        const bool kept = count > 0 && x > -infinity<A>() && !O::gt(last, O::make(x, base + r));
        d[r] = from_acc<TO>(kept ? wt(exp_acc(x - m)) : A(0));
      }
    }
  }
}

// ---- cosine logits (SAMoRA) ----

constexpr int kCosExperts = 32, kCosRows = 32, kCosY = 8, kCosChunk = 64;

// out[t, i] = <h_t, k_i> / (max(|h_t|, eps) · max(|k_i|, eps)) in A. Block (32 experts) x (8 rows at
// a time, 32 rows in all); r walked in chunks of 64: the chunk of the 32 keys transposed and the
// chunk of the 32 h rows staged in shared memory (padded: conflict-free reads), each thread 4 dots.
// |h_t|² and |k_i|² accumulate in the same pass (once per row and key per block).
// sass-budget: mk::router::cosine_logits_kernel<*> block=256 regs<=64 spill=0
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kCosExperts* kCosY)
    cosine_logits_kernel(const T* __restrict__ h, const T* __restrict__ keys, acc_t<T>* __restrict__ out,
                         int64_t rows, int n, int rdim, acc_t<T> eps) {
  using A = acc_t<T>;
  constexpr int KR = kCosRows / kCosY;
  constexpr int KS = kCosExperts + 1, HS = kCosChunk + 1;  // padded row strides: conflict-free
  MK_SHARED_ARRAY(A, ks, kCosChunk * KS);  // [j][expert]
  MK_SHARED_ARRAY(A, hs, kCosRows * HS);   // [row][j]
  MK_SHARED_ARRAY(A, inv_k, kCosExperts);
  MK_SHARED_ARRAY(A, inv_h, kCosRows);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kCosExperts + tx;
  const int e0 = blockIdx.x * kCosExperts;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kCosRows;
  A dot[KR], hh[KR], kk[KR];
#pragma unroll
  for (int k = 0; k < KR; ++k) dot[k] = hh[k] = kk[k] = A(0);
  for (int c0 = 0; c0 < rdim; c0 += kCosChunk) {
    const int rc = rdim - c0 < kCosChunk ? rdim - c0 : kCosChunk;
    block_sync();  // the previous chunk is consumed
    for (int idx = tid; idx < kCosExperts * rc; idx += kCosExperts * kCosY) {
      const int e = idx / rc, j = idx % rc;
      ks[j * KS + e] = e0 + e < n ? to_acc(keys[static_cast<int64_t>(e0 + e) * rdim + c0 + j]) : A(0);
      hs[e * HS + j] = r0 + e < rows ? to_acc(h[(r0 + e) * rdim + c0 + j]) : A(0);  // kCosRows == kCosExperts
    }
    block_sync();
#pragma unroll
    for (int k = 0; k < KR; ++k) {
      const int q = ty + k * kCosY;
      for (int j = tx; j < rc; j += kCosExperts) {
        hh[k] += hs[q * HS + j] * hs[q * HS + j];
        kk[k] += ks[j * KS + q] * ks[j * KS + q];
      }
      A d = dot[k];
      for (int j = 0; j < rc; ++j) d += hs[q * HS + j] * ks[j * KS + tx];
      dot[k] = d;
    }
  }
#pragma unroll
  for (int k = 0; k < KR; ++k) {
    const A a = warp_reduce(hh[k], SumOp{}), b = warp_reduce(kk[k], SumOp{});
    if (tx == 0) {
      const A nh = sqrt_acc(a), nk = sqrt_acc(b);
      inv_h[ty + k * kCosY] = A(1) / (nh > eps ? nh : eps);
      inv_k[ty + k * kCosY] = A(1) / (nk > eps ? nk : eps);
    }
  }
  block_sync();
  const int e = e0 + tx;
#pragma unroll
  for (int k = 0; k < KR; ++k) {
    const int q = ty + k * kCosY;
    if (r0 + q < rows && e < n) out[(r0 + q) * n + e] = dot[k] * inv_h[q] * inv_k[tx];
  }
}
static_assert(kCosRows == kCosExperts, "cosine staging loop loads one h row per key row");

// ---- backward ----

// The gradient through the renormalisation, shared by the backward kernels. Over the kept slots
// (g = dL/dw_j [+ the dense gradient], p = p_j, pmax = max p_sel, S = Σ p_sel) the sums
// sgp = Σ g p and, for softmax, with e' = exp(p - pmax): Z = Σ e', a1 = Σ e' g, a2 = Σ e' g p,
// a3 = Σ e' p; then g_j = dL/dp_j for the kept experts and c = Σ_l g_l p_l:
//   none:    g = gw                              c = Σ gw p
//   sum:     g = (gw - D) / S,  D = Σ gw p / S     c = 0 (w is invariant to scaling p)
//   softmax: g = w (gw - D),    w = e'/Z, D = Σ w gw   c = (Σ e' gw p - D Σ e' p) / Z
template <class A> struct RenormGrad {
  int renorm;
  A pmax;
  A sgp = A(0), zs = A(0), a1 = A(0), a2 = A(0), a3 = A(0);
  A D = A(0), c = A(0), inv_z = A(0), inv_s = A(0);

  MK_DEVICE void add(A g, A p) {  // one kept slot
    sgp += g * p;
    if (renorm == kSoftmax) {
      const A ep = exp_acc(p - pmax);
      zs += ep;
      a1 += ep * g;
      a2 += ep * g * p;
      a3 += ep * p;
    }
  }
  template <class F> MK_DEVICE void reduce(F&& f) {  // f: the (collective) sum over the row's threads
    sgp = f(sgp);
    if (renorm == kSoftmax) {  // uniform
      zs = f(zs);
      a1 = f(a1);
      a2 = f(a2);
      a3 = f(a3);
    }
  }
  MK_DEVICE void finish(bool rowok, A S) {  // D, c from the reduced sums
    if (!rowok) return;
    inv_s = A(1) / S;
    if (renorm == kNone) c = sgp;
    else if (renorm == kSum) D = sgp * inv_s;
    else {
      inv_z = A(1) / zs;
      D = a1 * inv_z;
      c = (a2 - D * a3) * inv_z;
    }
  }
  MK_DEVICE A grad(A g, A p) const {  // g_j of a kept slot
    if (renorm == kNone) return g;
    if (renorm == kSum) return (g - D) * inv_s;
    return exp_acc(p - pmax) * inv_z * (g - D);
  }
};

// The row in registers (expert i = v·GROUP + lane, v < VPL), x = z·r, and its softmax statistics.
// Every lane of the warp calls it.
template <class T, int GROUP, int VPL>
struct RowStats {
  using A = acc_t<T>;
  A e[VPL];           // exp(x - max x), 0 for masked (-inf) and out-of-row slots
  A inv_sum = A(0);
  bool valid = false;  // active row with no NaN/+inf and at least one finite logit

  MK_DEVICE void load(const T* __restrict__ z, int64_t row, bool active, int n, A r, bool unit, int glane) {
    A x[VPL];
    // a NaN or +inf anywhere makes the row's max +inf: one reduction finds both
    A m = MK_MUTABLE("router.max_init") ? -infinity<A>() : A(0);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {  // all loads first
      const int i = v * GROUP + glane;
      x[v] = active && i < n ? to_acc(z[row * n + i]) : -infinity<A>();
    }
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      if (!unit) x[v] *= r;
      if (x[v] != x[v]) m = infinity<A>();
      else if (x[v] > m) m = x[v];
    }
    m = group_reduce<GROUP>(m, MaxOp{});
    valid = active && m > -infinity<A>() && m < infinity<A>();
    A sum = A(0);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      e[v] = valid && x[v] > -infinity<A>() ? exp_acc(x[v] - m) : A(0);
      sum += e[v];
    }
    sum = group_reduce<GROUP>(sum, SumOp{});
    inv_sum = valid ? A(1) / sum : A(0);
  }

  // p of expert `id` (any id of the row, or -1: 0) from the lane that holds it: VPL shuffles, no
  // memory access, no exp. A collective: every lane of the warp calls it.
  MK_DEVICE A prob_of(int id, int gbase) const {
    const int src = gbase + (id >= 0 ? (id & (GROUP - 1)) : 0);
    const int vw = id >= 0 ? id / GROUP : -1;
    A p = A(0);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const A t = shfl_idx(e[v], src);
      if (v == vw) p = t;
    }
    return p * inv_sum;
  }
};

// dlogits from the gradients of the compact weights (grad_w [T,kmax]) and, optionally, of the dense
// weights (grad_dense [T,N], may be null), the selection read from ids (entries outside [0, N) are
// "no expert"). ids and grad_w are read once per kept slot (kmax <= GROUP: once in all).
// Bytes per row: N·elt (logits) + kmax·(4 + elt) + N·elt (dlogits) [+ kmax·elt gathered grad_dense].
// sass-budget: mk::router::route_bwd_kernel<*> block=128 regs<=255
template <class T, int GROUP, int VPL>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    route_bwd_kernel(const T* __restrict__ grad_w, const T* __restrict__ grad_dense, const T* __restrict__ logits,
                     const int32_t* __restrict__ ids, T* __restrict__ dlogits, int64_t rows, int n, int kmax,
                     acc_t<T> r, bool unit, int renorm) {
  using A = acc_t<T>;
  const int glane = lane_id() & (GROUP - 1);
  const int gbase = lane_id() & ~(GROUP - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  const bool active = row < rows;

  RowStats<T, GROUP, VPL> st;
  st.load(logits, row, active, n, r, unit, glane);
  const int64_t cbase = row * kmax;

  // Slot j = j0 + glane of each chunk of GROUP slots: its id, g = dL/dw_j (+ dense), p_j.
  struct Slot {
    int id;
    A g, p;
  };
  auto slot = [&](int j0) {  // warp-uniform call (kmax is the same for every row)
    const int j = j0 + glane;
    Slot s{-1, A(0), A(0)};
    if (active && j < kmax) {
      const int id = ids[cbase + j];
      if (id >= 0 && id < n) {
        s.id = id;
        s.g = to_acc(grad_w[cbase + j]);
        if (grad_dense != nullptr) s.g += to_acc(grad_dense[row * n + id]);
      }
    }
    s.p = st.prob_of(s.id, gbase);
    if (s.id < 0) s.p = A(0);
    return s;
  };
  const bool one_chunk = kmax <= GROUP;
  const Slot s0 = slot(0);  // the only chunk when kmax <= GROUP: ids/grads/p loaded once

  // Pass A: S = Σ p_sel, pmax = max p_sel.
  A S = A(0), pmax = A(0);
  for (int j0 = 0; j0 < kmax; j0 += GROUP) {
    const Slot s = j0 == 0 ? s0 : slot(j0);
    S += s.p;
    pmax = s.p > pmax ? s.p : pmax;
  }
  S = group_reduce<GROUP>(S, SumOp{});
  pmax = group_reduce<GROUP>(pmax, MaxOp{});
  const bool rowok = st.valid && S > A(0);

  // Pass B: the sums the renormalisation's gradient needs, then D, c.
  RenormGrad<A> rg{renorm, pmax};
  for (int j0 = 0; j0 < kmax; j0 += GROUP) {
    const Slot s = one_chunk ? s0 : slot(j0);
    if (rowok && s.id >= 0) rg.add(s.g, s.p);
  }
  rg.reduce([](A v) { return group_reduce<GROUP>(v, SumOp{}); });
  rg.finish(rowok, S);

  // Pass C: scatter g to the lanes owning each kept expert (group broadcasts, no shared memory).
  A gacc[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) gacc[v] = A(0);
  if (ballot(rowok) != 0u) {  // warp-uniform
    for (int j0 = 0; j0 < kmax; j0 += GROUP) {
      const Slot s = one_chunk ? s0 : slot(j0);
      A g = A(0);
      const int id = rowok ? s.id : -1;
      if (id >= 0) g = rg.grad(s.g, s.p);
      const int lim = kmax - j0 < GROUP ? kmax - j0 : GROUP;  // warp-uniform
      for (int q = 0; q < lim; ++q) {
        const int bid = shfl_idx(id, gbase + q);
        const A bg = shfl_idx(g, gbase + q);
        if (bid >= 0 && (bid & (GROUP - 1)) == glane) {
          const int vw = bid / GROUP;
#pragma unroll
          for (int v = 0; v < VPL; ++v)
            if (v == vw) gacc[v] += bg;
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int i = v * GROUP + glane;
    if (i >= n) continue;
    const A p = st.e[v] * st.inv_sum;
    const A d = p * (gacc[v] - rg.c);
    dlogits[row * n + i] = from_acc<T>(rowok ? (unit ? d : d * r) : A(0));
  }
}

// Backward for kBwdMaxN < N <= max_n<A>() (the forward's limit): one block of kSortThreads per row,
// the same math as route_bwd_kernel. The row is streamed (coalesced) for the max and S, the kept
// slots' p recomputed from their logit (p = exp(x_id - m)·(1/S), the same expression as the row's),
// block reductions (fixed order) for the renorm sums, the per-expert gradient accumulated in shared
// memory (N·sizeof(A) <= 16 KiB) by warp 0 in slot order (expert i only ever touched by lane i % 32:
// no atomics, duplicates add in slot order like route_bwd_kernel), then dz streamed out.
// Bytes per row: 2·N·elt read (the second pass mostly L2) + kmax·(4 + elt) (x2 for the scatter pass,
// L2) + N·elt written. Not hot (N > 1024 routers are rare): a warp-per-row layout is open.
// sass-budget: mk::router::route_bwd_large<*> block=256 regs<=64 spill=0
template <class T>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kSortThreads)
    route_bwd_large(const T* __restrict__ grad_w, const T* __restrict__ grad_dense, const T* __restrict__ logits,
                    const int32_t* __restrict__ ids, T* __restrict__ dlogits, int n, int kmax, acc_t<T> r,
                    bool unit, int renorm) {
  using A = acc_t<T>;
  constexpr int kWarps = kSortThreads / kWarpSize;
  MK_DYNAMIC_SHARED(unsigned char, smem);
  A* gacc = reinterpret_cast<A*>(smem);  // [n]
  MK_SHARED_ARRAY(A, red, kWarps);
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const T* zr = logits + row * n;
  const int64_t cbase = row * kmax;

  // row max (a NaN or +inf makes it +inf: invalid), S
  A m = -infinity<A>();
  for (int i = tid; i < n; i += kSortThreads) {
    const A x = scaled(zr[i], r, unit);
    if (x != x) m = infinity<A>();
    else if (x > m) m = x;
    gacc[i] = A(0);
  }
  m = block_reduce(m, red, MaxOp{});  // also the barrier after the gacc zeroing
  const bool valid = m > -infinity<A>() && m < infinity<A>();
  auto e_of = [&](A x) { return valid && x > -infinity<A>() ? exp_acc(x - m) : A(0); };
  A sum = A(0);
  for (int i = tid; i < n; i += kSortThreads) sum += e_of(scaled(zr[i], r, unit));
  sum = block_sum(sum, red);
  const A inv_sum = valid ? A(1) / sum : A(0);

  struct Slot {
    int id;
    A g, p;
  };
  auto slot = [&](int j) {  // j < kmax
    Slot s{-1, A(0), A(0)};
    const int id = ids[cbase + j];
    if (id >= 0 && id < n) {
      s.id = id;
      s.g = to_acc(grad_w[cbase + j]);
      if (grad_dense != nullptr) s.g += to_acc(grad_dense[row * n + id]);
      s.p = e_of(scaled(zr[id], r, unit)) * inv_sum;
    }
    return s;
  };

  // S = Σ p_sel, pmax; then the renorm sums
  A S = A(0), pmax = A(0);
  for (int j = tid; j < kmax; j += kSortThreads) {
    const Slot s = slot(j);
    S += s.p;
    pmax = s.p > pmax ? s.p : pmax;
  }
  S = block_sum(S, red);
  pmax = block_reduce(pmax, red, MaxOp{});
  const bool rowok = valid && S > A(0);
  RenormGrad<A> rg{renorm, pmax};
  if (rowok) {  // uniform
    for (int j = tid; j < kmax; j += kSortThreads) {
      const Slot s = slot(j);
      if (s.id >= 0) rg.add(s.g, s.p);
    }
    rg.reduce([&](A v) { return block_sum(v, red); });
  }
  rg.finish(rowok, S);

  // scatter g_j to gacc[id_j], warp 0, in slot order
  if (rowok && tid < kWarpSize) {  // uniform per warp
    const int lane = tid;
    for (int j0 = 0; j0 < kmax; j0 += kWarpSize) {
      A g = A(0);
      int id = -1;
      if (j0 + lane < kmax) {
        const Slot s = slot(j0 + lane);
        id = s.id;
        if (id >= 0) g = rg.grad(s.g, s.p);
      }
      const int lim = kmax - j0 < kWarpSize ? kmax - j0 : kWarpSize;
      for (int q = 0; q < lim; ++q) {
        const int bid = shfl_idx(id, q);
        const A bg = shfl_idx(g, q);
        if (bid >= 0 && (bid & (kWarpSize - 1)) == lane) gacc[bid] += bg;
      }
    }
  }
  block_sync();
  T* dz = dlogits + row * n;
  for (int i = tid; i < n; i += kSortThreads) {
    const A p = e_of(scaled(zr[i], r, unit)) * inv_sum;
    const A d = p * (gacc[i] - rg.c);
    dz[i] = from_acc<T>(rowok ? (unit ? d : d * r) : A(0));
  }
}

// ---- launchers (raw pointers; contiguous row-major; rows >= 1, kmax >= 1) ----

// Calls f(GROUP, VPL) as integral constants for row length n <= kBwdMaxN.
template <class F> inline void dispatch_shape(int n, F&& f) {
  using std::integral_constant;
  if (n <= 1) return f(integral_constant<int, 1>{}, integral_constant<int, 1>{});
  if (n <= 2) return f(integral_constant<int, 2>{}, integral_constant<int, 1>{});
  if (n <= 4) return f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  if (n <= 8) return f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  if (n <= 16) return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (n <= 32) return f(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  if (n <= 64) return f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  if (n <= 128) return f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
  if (n <= 256) return f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  if (n <= 512) return f(integral_constant<int, 32>{}, integral_constant<int, 16>{});
  return f(integral_constant<int, 32>{}, integral_constant<int, 32>{});
}

// Lanes per row of route_fwd_topk for row length n (<= kTopkMaxN): next_pow2(ceil(n / 8)).
inline int topk_lanes(int n) {
  int l = 1;
  while (l * kLaneElems < n) l *= 2;
  return l;
}

// The forward kernel for (n, kmax): route_fwd_topk when n <= 256 and min(kmax, n) <= 16, else
// route_fwd_sort. Exposed so tests/benchmarks can name the path.
enum class FwdPath { kTopk, kWarp, kSort };
inline FwdPath fwd_path(int n, int kmax) {
  const int ke = kmax < n ? kmax : n;
  if (n <= kTopkMaxN && ke <= kTopkMaxK) return FwdPath::kTopk;
  return n <= kWarpMaxN ? FwdPath::kWarp : FwdPath::kSort;
}

// r = 1/τ in fp64, rounded once to A (the caller checked that it is finite and > 0).
template <class A> inline A inv_temperature(double temperature) { return static_cast<A>(1.0 / temperature); }

// z: [rows, n] logits of type TI (TO, or acc_t<TO> for the cosine workspace); outputs of type TO.
template <class TI, class TO>
cudaError_t launch_fwd(const TI* z, FwdOut<TO> out, int64_t rows, int n, int kmax, double temperature,
                       acc_t<TO> top_p, int renorm, cudaStream_t stream) {
  using A = acc_t<TO>;
  static_assert(std::is_same_v<TI, TO> || std::is_same_v<TI, A>, "logits: the output type or its accumulation type");
  const FwdOpts<A> o{rows, n, kmax, inv_temperature<A>(temperature), temperature == 1.0, top_p, renorm};
  if (fwd_path(n, kmax) == FwdPath::kTopk) {
    const int ke = kmax < n ? kmax : n;
    const int lpr = topk_lanes(n);
    const bool vec_ok = pick_vec<TI>(n, {z}) == kVec16<TI>;
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads / lpr)));
    auto with_k = [&](auto K) {
      auto with_l = [&](auto L) {
        // K = 16 means min(kmax, n) > 8, so n > 8 and LPR >= 2: no one-lane instance (it would need
        // 16 winner slots in one thread's registers)
        constexpr int LPR = decltype(K)::value > kLaneElems && decltype(L)::value == 1 ? 2 : decltype(L)::value;
        auto kernel = route_fwd_topk<TI, TO, decltype(K)::value, LPR>;
        MK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, z, out, o, vec_ok);
      };
      using std::integral_constant;
      switch (lpr) {
        case 1: return with_l(integral_constant<int, 1>{});
        case 2: return with_l(integral_constant<int, 2>{});
        case 4: return with_l(integral_constant<int, 4>{});
        case 8: return with_l(integral_constant<int, 8>{});
        case 16: return with_l(integral_constant<int, 16>{});
        default: return with_l(integral_constant<int, 32>{});
      }
    };
    if (ke <= 2) with_k(std::integral_constant<int, 2>{});
    else if (ke <= 8) with_k(std::integral_constant<int, 8>{});
    else with_k(std::integral_constant<int, 16>{});
  } else if (fwd_path(n, kmax) == FwdPath::kWarp) {
    const bool vec_ok = pick_vec<TI>(n, {z}) == kVec16<TI>;
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads / kWarpSize)));
    auto with_kpl = [&](auto KPL) {
      auto kernel = route_fwd_warp<TI, TO, decltype(KPL)::value>;
      MK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, z, out, o, vec_ok);
    };
    using std::integral_constant;
    if (n <= 32) with_kpl(integral_constant<int, 1>{});
    else if (n <= 64) with_kpl(integral_constant<int, 2>{});
    else if (n <= 128) with_kpl(integral_constant<int, 4>{});
    else with_kpl(integral_constant<int, 8>{});
  } else {
    int np = 1;
    while (np < n) np *= 2;
    auto kernel = route_fwd_sort<TI, TO>;
    const size_t smem = sort_smem_bytes<A>(np);
    // Up to 48 KiB of keys plus the static reduction arrays exceed the 48 KiB default: opt in (sm_80+ allow
    // up to 163/227 KiB per block). The emulator applies the same limits (static + dynamic, opt-in).
    if (smem > 32 * 1024)
      if (cudaError_t e = MK_SET_MAX_DYNAMIC_SMEM(kernel, smem); e != cudaSuccess) return e;
    MK_LAUNCH(kernel, dim3(static_cast<unsigned>(rows)), dim3(kSortThreads), smem, stream, z, out, o, np);
  }
  return last_launch_error();
}

// Cosine routing: the [rows, n] logits in A into `ws` (caller-allocated), then launch_fwd on them.
template <class T>
cudaError_t launch_cosine_fwd(const T* h, const T* keys, acc_t<T>* ws, FwdOut<T> out, int64_t rows, int n, int rdim,
                              acc_t<T> eps, int kmax, double temperature, acc_t<T> top_p, int renorm,
                              cudaStream_t stream) {
  auto kernel = cosine_logits_kernel<T>;
  // grid.y <= 65535: very tall inputs go in chunks of rows
  constexpr int64_t kMaxRows = int64_t(65535) * kCosRows;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t rr = rows - r0 < kMaxRows ? rows - r0 : kMaxRows;
    const dim3 grid(static_cast<unsigned>(ceil_div(n, kCosExperts)), static_cast<unsigned>(ceil_div(rr, kCosRows)));
    MK_LAUNCH(kernel, grid, dim3(kCosExperts, kCosY), 0, stream, h + r0 * rdim, keys, ws + r0 * n, rr, n, rdim, eps);
    if (cudaError_t e = last_launch_error(); e != cudaSuccess) return e;
  }
  return launch_fwd<acc_t<T>, T>(ws, out, rows, n, kmax, temperature, top_p, renorm, stream);
}

template <class T>
cudaError_t launch_bwd(const T* grad_w, const T* grad_dense, const T* logits, const int32_t* ids, T* dlogits,
                       int64_t rows, int n, int kmax, double temperature, int renorm, cudaStream_t stream) {
  using A = acc_t<T>;
  if (n > kBwdMaxN) {  // up to the forward's limit: block per row
    MK_LAUNCH(route_bwd_large<T>, dim3(static_cast<unsigned>(rows)), dim3(kSortThreads),
              static_cast<size_t>(n) * sizeof(A), stream, grad_w, grad_dense, logits, ids, dlogits, n, kmax,
              inv_temperature<A>(temperature), temperature == 1.0, renorm);
    return last_launch_error();
  }
  dispatch_shape(n, [&](auto G, auto V) {
    constexpr int GROUP = decltype(G)::value;
    auto kernel = route_bwd_kernel<T, GROUP, decltype(V)::value>;
    MK_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(rows, kThreads / GROUP))), dim3(kThreads), 0, stream,
              grad_w, grad_dense, logits, ids, dlogits, rows, n, kmax, inv_temperature<A>(temperature),
              temperature == 1.0, renorm);
  });
  return last_launch_error();
}

}  // namespace mk::router
