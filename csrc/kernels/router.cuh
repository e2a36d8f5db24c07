// Fused router (METHODS.md §2): p = softmax(z / τ) per row, keep the shortest prefix of the
// descending order (ties: lower expert index first) whose mass reaches top_p, at most kmax experts,
// renormalise ("sum" | "softmax" | "none"), and write the compact form (ids [T,kmax] int32 with -1
// padding, weights [T,kmax], counts [T]) plus, optionally, dense weights [T,N].
//
// Design
//  * One *group* of GROUP lanes per row (GROUP = next power of two >= N, at most 32): small N packs
//    32/GROUP rows into a warp, so N = 8 does not leave 3/4 of every warp idle. Lane g of a group
//    holds experts i = v*GROUP + g, v < VPL, in registers (VPL = ceil(N/GROUP) rounded up to a power
//    of two; N <= 32*32 = 1024). Loads are coalesced across the group. Max / sum are butterfly
//    reductions that stop at GROUP (common/reduce.cuh); all in fp32 (fp64 for fp64).
//  * Selection: two paths, both deterministic and cutting the same prefix (they sum the unnormalised
//    mass and scale it once; only the summation order differs) (order: key = exp(z/τ - max/τ) descending,
//    ties -> lower index), no sort, no shared memory:
//    (a) repeated group arg-max rounds: each marks its winner taken and adds its probability to the
//        running mass; stop when the mass reaches top_p, after kmax experts, or when no candidate is
//        left. ~VPL compares + 2·log2(GROUP)+1 shuffles per *kept* expert: cheapest for the few
//        experts routers keep (top-k with k <= 8, top-p with ~2 kept). top_k is this path with no
//        mass at all (the top-k fast path); p >= 1 ("keep all") never accumulates the mass either.
//    (b) rows still selecting after rank_after rounds (default max(8, N/8)) finish by rank: every
//        expert counts the experts ahead of it and their mass (N broadcasts + N·VPL compares,
//        whatever is kept), kept iff rank < kmax and mass ahead < top_p. This bounds the worst
//        case (keep-all at N = 1024: ~1K broadcasts instead of ~11K shuffles).
//    Not chosen: a register bitonic sort (O(N log² N) exchanges for every row, also when two experts
//    are kept) and a bisection threshold search over p (~32 group reductions per row, and the kept
//    set still needs ordering for the compact output). The rank_after crossover is a shuffle-count
//    estimate, not a measurement (no GPU was available): MOKERNELS_ROUTER_RANK_AFTER (0: always
//    rank, large: always rounds) and the top-p 0.95 workloads of benchmarks/bench_router.py are there
//    to measure it. Both paths and their mix in one warp run in every emulated test run.
//  * The logits come from a source functor: MemoryLogits (a [T,N] tensor) or CosineLogits (SAMoRA:
//    cos(h_t, k_i) formed in registers from codes h [T,r] and keys k [N,r] — the [T,N] logits are never
//    written and no [T,N,r] intermediate exists).
//  * Experts whose logit is -inf are masked: never selected (so counts may be < top_k).
//  * A row with a NaN, a +inf, or only -inf logits is *invalid*: the kernel writes count 0, ids -1,
//    weights 0 (and a dense row of 0) — never garbage; its gradient is 0. (The Python op rejects such
//    rows on the host in eager mode; this is the fallback under torch.compile / graph capture.)
//  * Backward (selection held fixed, read back from ids): recompute p from the logits (cheaper than
//    saving a [T,N] fp32 tensor), gradient through the renormalisation to p_sel, then
//    dz_i = p_i (g_i - Σ_l g_l p_l) / τ with g scattered to the owning lane by group broadcasts.
#pragma once

#include <climits>

#include "common/dtype.cuh"
#include "common/reduce.cuh"
#include "common/warp.cuh"

namespace mk::router {

enum Renorm : int { kSum = 0, kSoftmax = 1, kNone = 2 };

constexpr int kThreads = 128;
constexpr int kMaxN = 1024;

// Logit sources for RowStats::load / the forward kernel.
template <class T> struct MemoryLogits {  // logits [rows, n] in memory
  const T* __restrict__ z;
  int n;
  MK_DEVICE acc_t<T> operator()(int64_t row, int i) const { return to_acc(z[row * n + i]); }
};

// Cosine logits cos(h_row, k_i) = <h, k_i> / (max(|h|, eps) max(|k_i|, eps)) from codes h [rows, r]
// and keys k [n, r], formed in registers: no [rows, n] logits and no [rows, n, r] intermediate.
// Each lane computes its own experts' dots; h's row is re-read per expert (same addresses across the
// group: broadcast loads from L1), so r should be small (routers: r <= 64).
template <class T> struct CosineLogits {
  const T* __restrict__ h;
  const T* __restrict__ k;
  int r;
  acc_t<T> eps;
  MK_DEVICE acc_t<T> operator()(int64_t row, int i) const {
    using A = acc_t<T>;
    const T* hr = h + row * r;
    const T* kr = k + static_cast<int64_t>(i) * r;
    A hk = A(0), hh = A(0), kk = A(0);
    for (int j = 0; j < r; ++j) {
      const A a = to_acc(hr[j]), b = to_acc(kr[j]);
      hk += a * b;
      hh += a * a;
      kk += b * b;
    }
    const A nh = sqrt_acc(hh), nk = sqrt_acc(kk);
    return hk / ((nh > eps ? nh : eps) * (nk > eps ? nk : eps));
  }
};

// Loads the row into registers and computes the softmax statistics. Every lane of the warp calls it.
// z/τ is formed first and then the max (of z/τ) subtracted, exactly as softmax(z / τ) does.
template <class T, int GROUP, int VPL>
struct RowStats {
  using A = acc_t<T>;
  A e[VPL];        // exp(z/τ - max/τ), 0 for masked (-inf) and out-of-row slots
  uint32_t live = 0;  // bit v: a real expert of a valid row whose logit is not -inf (selectable)
  A mx = A(0);     // max of z/τ
  A inv_sum = A(0);
  bool valid = false;  // active row with no NaN/+inf and at least one finite logit

  // `src(row, i)` gives logit i of the row (fp32/fp64): read from memory or computed (cosine).
  template <class Src>
  MK_DEVICE void load(const Src& src, int64_t row, bool active, int n, A temperature, int glane) {
    A x[VPL];
    // a NaN or +inf anywhere makes the row's max +inf: one reduction finds both
    A m = MK_MUTABLE("router.max_init") ? -infinity<A>() : A(0);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const int i = v * GROUP + glane;
      x[v] = -infinity<A>();
      if (active && i < n) {
        x[v] = src(row, i) / temperature;
        if (x[v] != x[v]) m = infinity<A>();
        else if (x[v] > m) m = x[v];
      }
    }
    m = group_reduce<GROUP>(m, MaxOp{});
    valid = active && m > -infinity<A>() && m < infinity<A>();
    mx = m;
    A sum = A(0);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const bool lv = valid && x[v] > -infinity<A>();
      live |= static_cast<uint32_t>(lv) << v;
      e[v] = lv ? exp_acc(x[v] - m) : A(0);
      sum += e[v];
    }
    sum = group_reduce<GROUP>(sum, SumOp{});
    inv_sum = valid ? A(1) / sum : A(0);
  }

  // Probability of expert `id` (any lane may ask for any id of its row): re-read from global/L1.
  MK_DEVICE A prob_of(const T* __restrict__ logits, int64_t row, int n, int id, A temperature) const {
    return exp_acc(to_acc(logits[row * n + id]) / temperature - mx) * inv_sum;
  }
};

template <class T, int GROUP, int VPL, class Src>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    route_fwd_kernel(Src src, int32_t* __restrict__ ids, T* __restrict__ weights,
                     int32_t* __restrict__ counts, T* __restrict__ dense, int64_t rows, int n, int kmax,
                     acc_t<T> temperature, acc_t<T> top_p, int renorm, int rank_after) {
  using A = acc_t<T>;
  const int glane = lane_id() & (GROUP - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  const bool active = row < rows;

  RowStats<T, GROUP, VPL> st;
  st.load(src, row, active, n, temperature, glane);

  // ---- selection: repeated group arg-max ----
  uint32_t taken = 0;
  int rank[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) rank[v] = 0;
  int count = 0;
  A cum = A(0), s_sel = A(0), z_soft = A(0), p_first = A(0);
  const bool use_p = top_p < A(1);  // p >= 1 keeps everything: no cumulative sum at all
  bool done = !st.valid || kmax <= 0;
  // `rounds` is warp-uniform, so the short-circuit never splits the warp at the ballot.
  for (int rounds = 0; rounds < rank_after && ballot(!done) != 0u; ++rounds) {
    A bk = A(-1);  // masked / taken / out-of-row slots never beat -1
    int bi = INT_MAX;
#pragma unroll
    for (int v = 0; v < VPL; ++v)
      if ((((st.live & ~taken) >> v) & 1u) && st.e[v] > bk) {  // ascending v: ties keep the lower index
        bk = st.e[v];
        bi = v * GROUP + glane;
      }
    group_argmax<GROUP>(bk, bi);
    if (!done) {
      if (bk < A(0)) {
        done = true;  // no candidate left (masked experts, or kmax > live experts)
      } else {
        if ((bi & (GROUP - 1)) == glane) {
          const int vw = bi / GROUP;
#pragma unroll
          for (int v = 0; v < VPL; ++v)
            if (v == vw) {
              taken |= 1u << v;
              rank[v] = count;
            }
        }
        const A pk = bk * st.inv_sum;
        if (count == 0) p_first = pk;  // the largest kept probability
        s_sel += bk;
        z_soft += exp_acc(pk - p_first);
        ++count;
        // The mass is summed unnormalised and scaled once, exactly as the rank pass below does, so
        // both paths cut a prefix whose mass lands on top_p (e.g. uniform rows, p = k/N) at the same
        // expert; summing rounded probabilities could fall one ulp short and keep one expert too many.
        if (use_p) cum += bk;
        if (count >= kmax || (use_p && cum * st.inv_sum >= top_p)) done = true;
      }
    }
  }

  // ---- large kept sets: selection by rank, for the rows still selecting after rank_after rounds ----
  // rank_i = #live experts ahead of i in the order (key desc, index asc), ahead_i = their mass. Expert i
  // is kept iff rank_i < kmax and (no top-p or ahead_i < top_p): the same prefix as the rounds above
  // (up to the summation order of the mass). Costs N broadcasts + N·VPL compares per lane, whatever
  // is kept, instead of ~2·log2(GROUP)+1 shuffles per kept expert. Deterministic per row: whether a
  // row takes this path depends only on its own kept count.
  if (ballot(!done) != 0u) {  // warp-uniform
    // rank[] is reused for the rank of each expert (rows already done keep their rounds' ranks).
    A ahead[VPL];
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      if (!done) rank[v] = 0;
      ahead[v] = A(0);
    }
    const int gbase = lane_id() & ~(GROUP - 1);
    for (int src = 0; src < GROUP; ++src) {
#pragma unroll
      for (int v2 = 0; v2 < VPL; ++v2) {
        const A ko = shfl_idx(((st.live >> v2) & 1u) ? st.e[v2] : A(-1), gbase + src);
        const int io = v2 * GROUP + src;
        if (!done) {
#pragma unroll
          for (int v = 0; v < VPL; ++v)
            if (ko > st.e[v] || (ko == st.e[v] && io < v * GROUP + glane)) {
              ++rank[v];
              ahead[v] += ko;
            }
        }
      }
    }
    int kept = 0;
#pragma unroll
    for (int v = 0; v < VPL; ++v)
      if (((st.live >> v) & 1u) && rank[v] < kmax && (!use_p || ahead[v] * st.inv_sum < top_p)) ++kept;
    kept = group_reduce<GROUP>(kept, SumOp{});
    A s_loc = A(0), z_loc = A(0);
    if (!done) {
      count = kept > 0 ? kept : 1;  // top_p = 0 still keeps the top expert
      p_first = st.inv_sum;         // the top expert's e is exp(0) = 1
      taken = 0;
#pragma unroll
      for (int v = 0; v < VPL; ++v)
        if (((st.live >> v) & 1u) && rank[v] < count) {
          taken |= 1u << v;
          s_loc += st.e[v];
          z_loc += exp_acc(st.e[v] * st.inv_sum - p_first);
        }
    }
    s_loc = group_reduce<GROUP>(s_loc, SumOp{});
    z_loc = group_reduce<GROUP>(z_loc, SumOp{});
    if (!done) {
      s_sel = s_loc;
      z_soft = z_loc;
      done = true;
    }
  }
  if (!active) return;  // no collective below

  // ---- renormalised weights, compact + dense writes ----
  const A inv_sel = s_sel > A(0) ? A(1) / s_sel : A(0);
  const A inv_z = z_soft > A(0) ? A(1) / z_soft : A(0);
  const int64_t cbase = row * kmax;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int i = v * GROUP + glane;
    if (i >= n) continue;
    A w = A(0);
    if ((taken >> v) & 1u) {
      if (renorm == kSum) w = st.e[v] * inv_sel;
      else if (renorm == kSoftmax) w = exp_acc(st.e[v] * st.inv_sum - p_first) * inv_z;
      else w = st.e[v] * st.inv_sum;
      ids[cbase + rank[v]] = i;
      weights[cbase + rank[v]] = from_acc<T>(w);
    }
    if (dense != nullptr) dense[row * n + i] = from_acc<T>(w);
  }
  for (int j = count + glane; j < kmax; j += GROUP) {
    ids[cbase + j] = -1;
    weights[cbase + j] = from_acc<T>(A(0));
  }
  if (glane == 0) counts[row] = count;
}

// dlogits from the gradients of the compact weights (grad_w [T,kmax]) and, optionally, of the dense
// weights (grad_dense [T,N], may be null), the selection read from ids (entries outside [0, N) are
// "no expert").
template <class T, int GROUP, int VPL>
MK_GLOBAL void MK_LAUNCH_BOUNDS(kThreads)
    route_bwd_kernel(const T* __restrict__ grad_w, const T* __restrict__ grad_dense, const T* __restrict__ logits,
                     const int32_t* __restrict__ ids, T* __restrict__ dlogits, int64_t rows, int n, int kmax,
                     acc_t<T> temperature, int renorm) {
  using A = acc_t<T>;
  const int glane = lane_id() & (GROUP - 1);
  const int gbase = lane_id() & ~(GROUP - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  const bool active = row < rows;

  RowStats<T, GROUP, VPL> st;
  st.load(MemoryLogits<T>{logits, n}, row, active, n, temperature, glane);
  const int64_t cbase = row * kmax;

  // Pass A: S = Σ p_sel, pmax = max p_sel.
  A S = A(0), pmax = A(0);
  if (st.valid)
    for (int j = glane; j < kmax; j += GROUP) {
      const int id = ids[cbase + j];
      if (id < 0 || id >= n) continue;
      const A pj = st.prob_of(logits, row, n, id, temperature);
      S += pj;
      pmax = pj > pmax ? pj : pmax;
    }
  S = group_reduce<GROUP>(S, SumOp{});
  pmax = group_reduce<GROUP>(pmax, MaxOp{});
  const bool rowok = st.valid && S > A(0);

  auto grad_of = [&](int j, int id) -> A {
    A g = to_acc(grad_w[cbase + j]);
    if (grad_dense != nullptr) g += to_acc(grad_dense[row * n + id]);
    return g;
  };

  // Pass B: the sums the renormalisation's gradient needs.
  A sgp = A(0), zs = A(0), a1 = A(0), a2 = A(0), a3 = A(0);
  if (rowok)
    for (int j = glane; j < kmax; j += GROUP) {
      const int id = ids[cbase + j];
      if (id < 0 || id >= n) continue;
      const A pj = st.prob_of(logits, row, n, id, temperature), gw = grad_of(j, id);
      sgp += gw * pj;
      if (renorm == kSoftmax) {
        const A ep = exp_acc(pj - pmax);
        zs += ep;
        a1 += ep * gw;
        a2 += ep * gw * pj;
        a3 += ep * pj;
      }
    }
  sgp = group_reduce<GROUP>(sgp, SumOp{});
  zs = group_reduce<GROUP>(zs, SumOp{});
  a1 = group_reduce<GROUP>(a1, SumOp{});
  a2 = group_reduce<GROUP>(a2, SumOp{});
  a3 = group_reduce<GROUP>(a3, SumOp{});
  // g_j = dL/dp_j for the kept experts; c = Σ_l g_l p_l.
  //   none:    g = gw                              c = Σ gw p
  //   sum:     g = (gw - D) / S,  D = Σ gw p / S     c = 0 (w is invariant to scaling p)
  //   softmax: g = w (gw - D),    w = e'/Z, D = Σ w gw   c = (Σ e' gw p - D Σ e' p) / Z
  A D = A(0), c = A(0), inv_z = A(0);
  const A inv_s = rowok ? A(1) / S : A(0);
  if (rowok) {
    if (renorm == kNone) c = sgp;
    else if (renorm == kSum) D = sgp * inv_s;
    else {
      inv_z = A(1) / zs;
      D = a1 * inv_z;
      c = (a2 - D * a3) * inv_z;
    }
  }

  // Pass C: scatter g to the lanes owning each kept expert (group broadcasts, no shared memory).
  A gacc[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) gacc[v] = A(0);
  if (ballot(rowok) != 0u) {  // warp-uniform
    for (int j0 = 0; j0 < kmax; j0 += GROUP) {
      const int j = j0 + glane;
      int id = -1;
      A g = A(0);
      if (rowok && j < kmax) {
        id = ids[cbase + j];
        if (id >= 0 && id < n) {
          const A pj = st.prob_of(logits, row, n, id, temperature), gw = grad_of(j, id);
          if (renorm == kNone) g = gw;
          else if (renorm == kSum) g = (gw - D) * inv_s;
          else g = exp_acc(pj - pmax) * inv_z * (gw - D);
        } else {
          id = -1;
        }
      }
      const int lim = kmax - j0 < GROUP ? kmax - j0 : GROUP;  // warp-uniform
      for (int r = 0; r < lim; ++r) {
        const int bid = shfl_idx(id, gbase + r);
        const A bg = shfl_idx(g, gbase + r);
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
  const A inv_t = A(1) / temperature;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int i = v * GROUP + glane;
    if (i >= n) continue;
    const A p = st.e[v] * st.inv_sum;
    dlogits[row * n + i] = from_acc<T>(rowok ? p * (gacc[v] - c) * inv_t : A(0));
  }
}

// ---- launchers (raw pointers; contiguous row-major; rows >= 1, 1 <= n <= kMaxN, kmax >= 1) ----

// Calls f(GROUP, VPL) as integral constants for row length n.
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

template <int GROUP> inline dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned>(ceil_div(rows, kThreads / GROUP)));
}

// Default number of arg-max rounds before a row switches to selection by rank: max(8, N/8). Not
// measured (no GPU yet): the rounds cost ~11 shuffles per kept expert (GROUP = 32), the rank pass
// ~N broadcasts plus N·VPL compares, so rounds win for the few experts routers usually keep and rank
// wins for large kept sets. Override with MOKERNELS_ROUTER_RANK_AFTER (0: always by rank; a large
// value: never) and measure with benchmarks/bench_router.py.
inline int default_rank_after(int n) { return n / 8 > 8 ? n / 8 : 8; }

// Src: MemoryLogits<T> or CosineLogits<T>. rank_after < 0: default_rank_after(n).
template <class T, class Src>
cudaError_t launch_fwd(Src src, int32_t* ids, T* weights, int32_t* counts, T* dense, int64_t rows, int n, int kmax,
                       acc_t<T> temperature, acc_t<T> top_p, int renorm, int rank_after, cudaStream_t stream) {
  if (rank_after < 0) rank_after = default_rank_after(n);
  dispatch_shape(n, [&](auto G, auto V) {
    auto kernel = route_fwd_kernel<T, decltype(G)::value, decltype(V)::value, Src>;
    MK_LAUNCH(kernel, grid_for<decltype(G)::value>(rows), dim3(kThreads), 0, stream, src, ids, weights, counts, dense,
              rows, n, kmax, temperature, top_p, renorm, rank_after);
  });
  return last_launch_error();
}

template <class T>
cudaError_t launch_bwd(const T* grad_w, const T* grad_dense, const T* logits, const int32_t* ids, T* dlogits,
                       int64_t rows, int n, int kmax, acc_t<T> temperature, int renorm, cudaStream_t stream) {
  dispatch_shape(n, [&](auto G, auto V) {
    auto kernel = route_bwd_kernel<T, decltype(G)::value, decltype(V)::value>;
    MK_LAUNCH(kernel, grid_for<decltype(G)::value>(rows), dim3(kThreads), 0, stream, grad_w, grad_dense, logits,
              ids, dlogits, rows, n, kmax, temperature, renorm);
  });
  return last_launch_error();
}

}  // namespace mk::router
