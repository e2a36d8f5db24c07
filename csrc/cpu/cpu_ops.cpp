// Native CPU kernels of the CPU path (issue 9: "a CPU user pays for using us").
//
// The CPU path of rank_one_scale (fp16/bf16) and of route (no autograd needed, top_p >= 1) used to be
// pure-torch compositions: 4-6 ATen kernels with fp32 temporaries plus ~10-30 us of fixed Python/ATen
// overhead per call. These kernels do the same arithmetic in one pass over the data (bit for bit the
// reference's rounding; see mokernels/ops/rank_one.py and router.py), and Python calls them through
// pybind directly (no dispatcher, no torch.library Python kernel), so a 4x8 call costs a few us.
//
// Bits never depend on the thread count: elementwise work is split arbitrarily, and the rank-one dsigma
// column sum is taken over fixed row chunks (their size depends only on the shape) summed in order.
//
// They are CPU-only helpers of the Python ops (mokernels/ops/*.py), not registered kernels: the
// torch.library ops keep their Python CPU kernels (which call these for the heavy part), fake kernels
// and autograd, so compile / meta / fake behave as before.
#include "cpu/cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mk::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Element conversions. bf16: exact widening; narrowing rounds to nearest even (NaN -> a quiet NaN),
// as c10::BFloat16 does, written with integer ops so the loops vectorise. fp16: c10's conversions.

inline float to_f(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(float v) { return v; }
inline double to_f(double v) { return v; }

template <typename T>
inline T from_f(float f);
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}
template <>
inline c10::Half from_f<c10::Half>(float f) { return c10::Half(f); }
template <>
inline float from_f<float>(float f) { return f; }

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_f<T>(v);
}

void expect(bool ok, const std::string& msg) { TORCH_CHECK_VALUE(ok, msg); }

// Contiguous CPU tensor of one of the 16-bit float dtypes (the rank-one kernels' domain).
void check_half(const char* op, const char* name, const at::Tensor& t, c10::ScalarType dt) {
  expect(t.device().is_cpu(), std::string("mokernels.") + op + ": " + name + " must be a CPU tensor");
  expect(t.scalar_type() == dt, std::string("mokernels.") + op + ": " + name + " must have z's dtype");
}

template <typename F>
void dispatch_half(c10::ScalarType dt, const char* op, F&& f) {
  if (dt == at::kBFloat16) f(c10::BFloat16{});
  else if (dt == at::kHalf) f(c10::Half{});
  else TORCH_CHECK_VALUE(false, "mokernels.", op, ": the native CPU kernel takes fp16/bf16, got ", dt);
}

// ------------------------------------------------------------------------------------------------
// rank_one_scale: out = round(z * (sigma + g)) in fp32, rounded once (the reference's arithmetic).

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task (~64 KiB of bf16 per input)

// The bf16 inner loops, also compiled for AVX2 (GCC function multi-versioning, picked at load time by
// the CPU): 8-wide conversions and rounding in integer ops. ~2x the SSE2 build on a Xeon (1024x1024:
// forward ~350 us, backward ~700 us on one core, measured in isolation).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MK_CPU_CLONES
#endif

MK_CPU_CLONES void bf16_scale_row(const c10::BFloat16* __restrict__ z, const float* __restrict__ s,
                                  const c10::BFloat16* __restrict__ g, c10::BFloat16* __restrict__ out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = from_f<c10::BFloat16>(to_f(z[c]) * (s[c] + to_f(g[c])));
}

MK_CPU_CLONES void bf16_scale_backward_row(const c10::BFloat16* __restrict__ d, const c10::BFloat16* __restrict__ z,
                                           const float* __restrict__ s, const c10::BFloat16* __restrict__ g,
                                           c10::BFloat16* __restrict__ dz, c10::BFloat16* __restrict__ dg,
                                           float* __restrict__ acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const float dd = to_f(d[c]);
    const float prod = dd * to_f(z[c]);  // exact in fp32 (8-bit x 8-bit significands)
    dz[c] = from_f<c10::BFloat16>(dd * (s[c] + to_f(g[c])));
    dg[c] = from_f<c10::BFloat16>(prod);
    acc[c] += prod;
  }
}

// fp16: c10::Half's software conversions cost ~6 ns per element; with F16C (every AVX2 x86 CPU) the
// hardware converts 8 at a time (vcvtph2ps / vcvtps2ph, round to nearest even: the same bits). Chosen at
// run time; no FMA is enabled in these functions, so z * (s + g) stays two roundings in fp32 as in the
// reference.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MK_HAVE_F16C_PATH 1
bool cpu_has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

__attribute__((target("avx2,f16c"))) inline __m256 load_h8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,f16c"))) inline void store_h8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx2,f16c"))) void f16_scale_row(const c10::Half* __restrict__ z, const float* __restrict__ s,
                                                        const c10::Half* __restrict__ g, c10::Half* __restrict__ out,
                                                        int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    store_h8(out + c, _mm256_mul_ps(load_h8(z + c), _mm256_add_ps(_mm256_loadu_ps(s + c), load_h8(g + c))));
  for (; c < n; ++c) out[c] = from_f<c10::Half>(to_f(z[c]) * (s[c] + to_f(g[c])));
}

__attribute__((target("avx2,f16c"))) void f16_scale_backward_row(
    const c10::Half* __restrict__ d, const c10::Half* __restrict__ z, const float* __restrict__ s,
    const c10::Half* __restrict__ g, c10::Half* __restrict__ dz, c10::Half* __restrict__ dg, float* __restrict__ acc,
    int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 dd = load_h8(d + c);
    const __m256 prod = _mm256_mul_ps(dd, load_h8(z + c));  // exact in fp32 (11-bit x 11-bit significands)
    store_h8(dz + c, _mm256_mul_ps(dd, _mm256_add_ps(_mm256_loadu_ps(s + c), load_h8(g + c))));
    store_h8(dg + c, prod);
    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), prod));
  }
  for (; c < n; ++c) {
    const float dd = to_f(d[c]);
    const float prod = dd * to_f(z[c]);
    dz[c] = from_f<c10::Half>(dd * (s[c] + to_f(g[c])));
    dg[c] = from_f<c10::Half>(prod);
    acc[c] += prod;
  }
}
#endif

template <typename T>
void scale_row(const T* __restrict__ z, const float* __restrict__ s, const T* __restrict__ g, T* __restrict__ out,
               int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_scale_row(z, s, g, out, n);
#ifdef MK_HAVE_F16C_PATH
  } else if (std::is_same_v<T, c10::Half> && cpu_has_f16c()) {
    f16_scale_row(z, s, g, out, n);
#endif
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = from_f<T>(to_f(z[c]) * (s[c] + to_f(g[c])));
  }
}

template <typename T>
void scale_backward_row(const T* __restrict__ d, const T* __restrict__ z, const float* __restrict__ s,
                        const T* __restrict__ g, T* __restrict__ dz, T* __restrict__ dg, float* __restrict__ acc,
                        int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_scale_backward_row(d, z, s, g, dz, dg, acc, n);
#ifdef MK_HAVE_F16C_PATH
  } else if (std::is_same_v<T, c10::Half> && cpu_has_f16c()) {
    f16_scale_backward_row(d, z, s, g, dz, dg, acc, n);
#endif
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float dd = to_f(d[c]);
      const float prod = dd * to_f(z[c]);  // exact in fp32 (11-bit x 11-bit significands)
      dz[c] = from_f<T>(dd * (s[c] + to_f(g[c])));
      dg[c] = from_f<T>(prod);
      acc[c] += prod;
    }
  }
}

template <typename T>
void scale_rows(const T* z, const T* s, const T* g, T* out, int64_t rows, int64_t R) {
  // fp32 sigma once per call (R floats on the stack for small R, else a vector)
  std::vector<float> sf(static_cast<size_t>(R));
  for (int64_t c = 0; c < R; ++c) sf[c] = to_f(s[c]);
  const float* sp = sf.data();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(R, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) scale_row<T>(z + r * R, sp, g + r * R, out + r * R, R);
  });
}

// The arguments of the rank-one kernels (the Python op checked them already; this guards direct calls):
// z, g (and grad) [..., R], sigma [R], one fp16/bf16 dtype, CPU. Returns R.
int64_t check_rank_one(const at::Tensor& z, const at::Tensor& sigma, const at::Tensor& g, const at::Tensor* grad) {
  const char* op = "rank_one_scale";
  expect(z.dim() >= 1, "mokernels.rank_one_scale: z must be [..., R]");
  const int64_t R = z.size(-1);
  check_half(op, "z", z, z.scalar_type());
  check_half(op, "sigma", sigma, z.scalar_type());
  check_half(op, "g", g, z.scalar_type());
  if (grad != nullptr) check_half(op, "grad", *grad, z.scalar_type());
  expect(sigma.dim() == 1 && sigma.size(0) == R && g.sizes() == z.sizes() && (grad == nullptr || grad->sizes() == z.sizes()),
         "mokernels.rank_one_scale: sigma must be [R], g (and grad) z's shape");
  return R;
}

at::Tensor rank_one_scale(const at::Tensor& z_in, const at::Tensor& sigma_in, const at::Tensor& g_in) {
  const char* op = "rank_one_scale";
  const int64_t R = check_rank_one(z_in, sigma_in, g_in, nullptr);
  const at::Tensor z = z_in.contiguous(), s = sigma_in.contiguous(), g = g_in.contiguous();
  at::Tensor out = at::empty(z.sizes(), z.options());
  if (z.numel() == 0) return out;
  dispatch_half(z.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    scale_rows<T>(z.const_data_ptr<T>(), s.const_data_ptr<T>(), g.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                  z.numel() / R, R);
  });
  return out;
}

// Backward: dz = round(grad * (sigma + g)), dg = round(grad * z), dsigma = sum over rows of grad * z
// (the fp32 products, exact for fp16/bf16 inputs), summed over fixed chunks of rows, then the chunks in
// order: the bits depend on the shape only, never on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_one_scale_backward(const at::Tensor& grad_in, const at::Tensor& z_in,
                                                                      const at::Tensor& sigma_in,
                                                                      const at::Tensor& g_in) {
  const char* op = "rank_one_scale";
  const int64_t R = check_rank_one(z_in, sigma_in, g_in, &grad_in);
  const at::Tensor z = z_in.contiguous(), s = sigma_in.contiguous(), g = g_in.contiguous(),
                   gr = grad_in.contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dg = at::empty(z.sizes(), z.options());
  at::Tensor dsigma = at::empty({R}, z.options());
  const int64_t rows = R > 0 ? z.numel() / R : 0;
  dispatch_half(z.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    T* ds = dsigma.mutable_data_ptr<T>();
    if (R == 0) return;
    if (rows == 0) {
      for (int64_t c = 0; c < R; ++c) ds[c] = from_f<T>(0.0f);
      return;
    }
    const T *zp = z.const_data_ptr<T>(), *sp0 = s.const_data_ptr<T>(), *gp = g.const_data_ptr<T>(),
            *grp = gr.const_data_ptr<T>();
    T *dzp = dz.mutable_data_ptr<T>(), *dgp = dg.mutable_data_ptr<T>();
    std::vector<float> sf(static_cast<size_t>(R));
    for (int64_t c = 0; c < R; ++c) sf[c] = to_f(sp0[c]);
    const float* sp = sf.data();
    // chunk of rows per partial sum: >= ~32K elements, at most 64 chunks (shape-only)
    const int64_t per = std::max<int64_t>(1, kGrain / R);
    const int64_t chunk = std::max(per, (rows + 63) / 64);
    const int64_t nchunks = (rows + chunk - 1) / chunk;
    std::vector<float> part(static_cast<size_t>(nchunks * R), 0.0f);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = c0; k < c1; ++k) {
        float* acc = part.data() + k * R;
        const int64_t r1 = std::min(rows, (k + 1) * chunk);
        for (int64_t r = k * chunk; r < r1; ++r) {
          const int64_t o = r * R;
          scale_backward_row<T>(grp + o, zp + o, sp, gp + o, dzp + o, dgp + o, acc, R);
        }
      }
    });
    for (int64_t k = 1; k < nchunks; ++k) {
      const float* p = part.data() + k * R;
      for (int64_t c = 0; c < R; ++c) part[c] += p[c];
    }
    for (int64_t c = 0; c < R; ++c) ds[c] = from_f<T>(part[c]);
  });
  return {dz, dsigma, dg};
}

// ------------------------------------------------------------------------------------------------
// route (top_p >= 1: top-k / keep-all), the router rules of mokernels/ops/router.py without the
// top-p cut: x = z * r in A (r == 1: x = z), order by descending x with ties to the lower index,
// -inf masked; rows with a NaN/+inf or only -inf are invalid (count 0, ids -1, weights 0). Weights:
// "sum" e_sel / sum of kept e_sel, "none" e_sel / S, "softmax" softmax over p_sel = e_sel / S, with
// e = exp(x - max x), S = sum of e (A). Returns (ids, weights, counts, dense or [0], first invalid row
// or -1).

template <typename T>
void route_rows(const T* z, int64_t T_, int64_t N, double r_in, int64_t kmax, int renorm, bool want_dense, int32_t* ids,
                T* w, int32_t* counts, T* dense, int64_t* first_bad) {
  using A = acc_t<T>;
  const A r = static_cast<A>(r_in);
  const bool scale = r_in != 1.0;
  const int64_t K = std::min(kmax, N);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1));
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, T_, grain, [&](int64_t t0, int64_t t1) {
    std::vector<A> x(static_cast<size_t>(N));
    std::vector<A> top_x(static_cast<size_t>(K));
    std::vector<int32_t> top_i(static_cast<size_t>(K));
    std::vector<A> ew(static_cast<size_t>(K));
    for (int64_t t = t0; t < t1; ++t) {
      const T* zr = z + t * N;
      int32_t* id = ids + t * kmax;
      T* wr = w + t * kmax;
      A m = -std::numeric_limits<A>::infinity();
      bool nan = false;
      for (int64_t i = 0; i < N; ++i) {
        A v = to_f(zr[i]);
        if (scale) v = v * r;
        x[i] = v;
        nan |= (v != v);
        m = v > m ? v : m;
      }
      int64_t cnt = 0;
      const bool valid = !nan && std::isfinite(m);
      if (valid) {
        // top-K by insertion into a sorted list (descending x, ties -> lower index: strict >)
        int64_t have = 0;
        for (int64_t i = 0; i < N; ++i) {
          const A v = x[i];
          if (!(v > -std::numeric_limits<A>::infinity())) continue;
          if (have == K && !(v > top_x[K - 1])) continue;
          int64_t j = have < K ? have++ : K - 1;
          while (j > 0 && v > top_x[j - 1]) {
            top_x[j] = top_x[j - 1];
            top_i[j] = top_i[j - 1];
            --j;
          }
          top_x[j] = v;
          top_i[j] = static_cast<int32_t>(i);
        }
        cnt = have;
        A S = 0;
        if (renorm != 0) {
          for (int64_t i = 0; i < N; ++i) S += std::exp(x[i] - m);
        }
        A sum_sel = 0;
        for (int64_t j = 0; j < cnt; ++j) {
          ew[j] = std::exp(top_x[j] - m);
          sum_sel += ew[j];
        }
        if (renorm == 0) {  // sum
          const A den = std::max(sum_sel, std::numeric_limits<A>::min());
          for (int64_t j = 0; j < cnt; ++j) ew[j] = ew[j] / den;
        } else if (renorm == 1) {  // softmax over p_sel
          A p0 = ew[0] / S, z2 = 0;
          for (int64_t j = 0; j < cnt; ++j) {
            ew[j] = std::exp(ew[j] / S - p0);
            z2 += ew[j];
          }
          const A den = std::max(z2, std::numeric_limits<A>::min());
          for (int64_t j = 0; j < cnt; ++j) ew[j] = ew[j] / den;
        } else {  // none
          for (int64_t j = 0; j < cnt; ++j) ew[j] = ew[j] / S;
        }
      } else {
        int64_t cur = bad.load(std::memory_order_relaxed);
        while (t < cur && !bad.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
        }
      }
      for (int64_t j = 0; j < kmax; ++j) {
        const bool keep = j < cnt;
        id[j] = keep ? top_i[j] : -1;
        wr[j] = from_acc<T>(keep ? ew[j] : A(0));
      }
      counts[t] = static_cast<int32_t>(cnt);
      if (want_dense) {
        T* dr = dense + t * N;
        for (int64_t i = 0; i < N; ++i) dr[i] = from_acc<T>(A(0));
        for (int64_t j = 0; j < cnt; ++j) dr[top_i[j]] = wr[j];
      }
    }
  });
  const int64_t b = bad.load();
  *first_bad = b == std::numeric_limits<int64_t>::max() ? -1 : b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> route_topk(const at::Tensor& z_in, double r,
                                                                               int64_t kmax, int64_t renorm,
                                                                               bool dense) {
  expect(z_in.dim() == 2 && z_in.device().is_cpu(), "mokernels.route: the native CPU kernel takes [T, N] CPU logits");
  expect(kmax >= 1 && renorm >= 0 && renorm <= 2, "mokernels.route: bad kmax/renorm for the native CPU kernel");
  const at::Tensor z = z_in.contiguous();
  const int64_t T_ = z.size(0), N = z.size(1);
  expect(N >= 1 && N <= std::numeric_limits<int32_t>::max(), "mokernels.route: N out of range");
  at::Tensor ids = at::empty({T_, kmax}, z.options().dtype(at::kInt));
  at::Tensor w = at::empty({T_, kmax}, z.options());
  at::Tensor counts = at::empty({T_}, z.options().dtype(at::kInt));
  at::Tensor d = dense ? at::empty({T_, N}, z.options()) : at::empty({0}, z.options());
  int64_t first_bad = -1;
  if (T_ == 0) return {ids, w, counts, d, first_bad};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    route_rows<T>(z.const_data_ptr<T>(), T_, N, r, kmax, static_cast<int>(renorm), dense, ids.mutable_data_ptr<int32_t>(),
                  w.mutable_data_ptr<T>(), counts.mutable_data_ptr<int32_t>(), dense ? d.mutable_data_ptr<T>() : nullptr,
                  &first_bad);
  };
  switch (z.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kDouble: run(double{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "mokernels.route: unsupported dtype ", z.scalar_type());
  }
  return {ids, w, counts, d, first_bad};
}

}  // namespace

void bind(pybind11::module_& m) {
  m.def("rank_one_scale_cpu", &rank_one_scale, "rank_one_scale on fp16/bf16 CPU tensors: one fused pass (issue 9)");
  m.def("rank_one_scale_backward_cpu", &rank_one_scale_backward,
        "(dz, dsigma, dg) of rank_one_scale on fp16/bf16 CPU tensors: one fused pass, thread-count-independent dsigma");
  m.def("route_topk_cpu", &route_topk,
        "route on [T, N] CPU logits without a top-p cut: (ids, weights, counts, dense or [0], first invalid row or -1)");
}

}  // namespace mk::cpu
