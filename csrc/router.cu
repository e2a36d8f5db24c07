// at::Tensor wrappers of the fused router kernels (kernels/router.cuh).
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#include "torch_glue.h"
#include "kernels/router.cuh"

namespace mk::router {
namespace {

constexpr const char* kFwd = "mokernels.route_fwd";
constexpr const char* kBwd = "mokernels.route_bwd";

int parse_renorm(const char* op, std::string_view renorm) {
  if (renorm == "sum") return kSum;
  if (renorm == "softmax") return kSoftmax;
  if (renorm == "none") return kNone;
  TORCH_CHECK_VALUE(false, op, ": renorm must be \"sum\", \"softmax\" or \"none\", got \"", renorm, "\"");
  return kSum;
}

// top_p as the kernel's accumulation type: >= 1 keeps all (1 exactly); below 1 it must stay below 1
// after rounding (1 - 1e-9 would round to 1.0f and silently switch to keep-all).
template <class A> A threshold(double top_p) {
  if (top_p >= 1.0) return A(1);
  const A t = static_cast<A>(top_p);
  return t < A(1) ? t : std::nextafter(A(1), A(0));
}

// MOKERNELS_ROUTER_RANK_AFTER: arg-max rounds before a row switches to selection by rank (unset: the
// kernel's default, max(8, N/8)). Read per call, so tests and benchmarks can switch it at run time.
int rank_after_rounds() {
  const char* s = std::getenv("MOKERNELS_ROUTER_RANK_AFTER");
  if (s == nullptr || *s == '\0') return -1;
  const long v = std::strtol(s, nullptr, 10);
  return v < 0 ? -1 : (v > INT32_MAX ? INT32_MAX : static_cast<int>(v));
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_device(op, "logits", logits, logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [T, N], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(1) <= kMaxN, op, ": logits must have 1 <= N <= ", kMaxN,
                    " experts, got N = ", logits.size(1));
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(temperature > 0.0 && temperature < INFINITY, op, ": temperature must be > 0 and finite, got ",
                    temperature);
}

// r = fl_A(1/τ) (router rule 1, shared with the reference): 1/τ in fp64, rounded once to the
// accumulation type A; the kernels multiply by r (no division). τ and r must be finite in A and r > 0.
template <class A> A inv_temperature(const char* op, double temperature) {
  // fp32: doubles from FLT_MAX + half an ulp up round to inf (that tie goes to the even inf); compared in
  // double so that no out-of-range conversion happens.
  const double lim = std::is_same_v<A, double> ? INFINITY : std::ldexp(2.0 - std::ldexp(1.0, -24), 127);
  const double r = 1.0 / temperature;
  const bool ok = temperature > 0.0 && temperature < lim && r < lim && static_cast<A>(r) > A(0);
  TORCH_CHECK_VALUE(ok, op, ": temperature must be > 0 with temperature and 1/temperature finite and nonzero in ",
                    std::is_same_v<A, double> ? "float64" : "float32", ", got ", temperature);
  return static_cast<A>(r);
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The selection options shared by route_fwd and route_cosine_fwd, checked once.
struct SelectOptions {
  double temperature, top_p;
  int kmax, renorm;
  bool dense;
};

SelectOptions check_select(const char* op, double temperature, double top_p, int64_t kmax, std::string_view renorm,
                           bool dense) {
  check_temperature(op, temperature);
  TORCH_CHECK_VALUE(kmax >= 1 && kmax <= INT32_MAX, op, ": kmax must be >= 1, got ", kmax);
  TORCH_CHECK_VALUE(top_p >= 0.0, op, ": top_p must be >= 0, got ", top_p);
  return {temperature, top_p, static_cast<int>(kmax), parse_renorm(op, renorm), dense};
}

// Allocates the outputs (like `like`: device, dtype) and launches the forward kernel on the logit
// source make_src(TypeTag<T>) gives for the element type T.
template <class MakeSrc>
FwdOutputs run_fwd(const char* op, const at::Tensor& like, int64_t T, int64_t N, const SelectOptions& o,
                   MakeSrc make_src) {
  at::Tensor ids = at::empty({T, o.kmax}, like.options().dtype(at::kInt));
  at::Tensor weights = at::empty({T, o.kmax}, like.options());
  at::Tensor counts = at::empty({T}, like.options().dtype(at::kInt));
  at::Tensor dense_out = o.dense ? at::empty({T, N}, like.options()) : at::empty({0}, like.options());
  if (T == 0) return {ids, weights, counts, dense_out};
  dispatch_float(op, like.scalar_type(), [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    using A = acc_t<T_>;
    check_launch(op, launch_fwd<T_>(make_src(tag), ptr<int32_t>(ids), ptr<T_>(weights), ptr<int32_t>(counts),
                                    o.dense ? ptr<T_>(dense_out) : nullptr, T, static_cast<int>(N), o.kmax,
                                    inv_temperature<A>(op, o.temperature), threshold<A>(o.top_p), o.renorm,
                                    rank_after_rounds(), current_stream()));
  });
  return {ids, weights, counts, dense_out};
}

// route_fwd(logits [T,N], temperature, top_p (>= 1: keep all), kmax, renorm, dense)
//   -> (ids [T,kmax] int32, weights [T,kmax], counts [T] int32, dense [T,N] or [0])
FwdOutputs route_fwd(const at::Tensor& logits_in, double temperature, double top_p, int64_t kmax,
                     std::string_view renorm, bool dense) {
  check_logits(kFwd, logits_in);
  const SelectOptions o = check_select(kFwd, temperature, top_p, kmax, renorm, dense);
  DeviceGuard guard(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(1);
  return run_fwd(kFwd, logits, logits.size(0), N, o, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    return MemoryLogits<T_>{ptr<T_>(logits), static_cast<int>(N)};
  });
}

constexpr const char* kCos = "mokernels.route_cosine_fwd";

// route_cosine_fwd(h [T,r], keys [N,r], temperature, eps, top_p, kmax, renorm, dense): route_fwd on
// the logits cos(h_t, keys_i), formed inside the kernel.
FwdOutputs route_cosine_fwd(const at::Tensor& h_in, const at::Tensor& keys_in, double temperature, double eps,
                            double top_p, int64_t kmax, std::string_view renorm, bool dense) {
  check_device(kCos, "h", h_in, h_in);
  check_device(kCos, "keys", keys_in, h_in);
  TORCH_CHECK_VALUE(h_in.dim() == 2, kCos, ": h must be [T, r], got ", h_in.sizes());
  TORCH_CHECK_VALUE(keys_in.dim() == 2 && keys_in.size(1) == h_in.size(1), kCos, ": keys must be [N, r] with r = ",
                    h_in.size(1), ", got ", keys_in.sizes());
  TORCH_CHECK_VALUE(keys_in.size(0) >= 1 && keys_in.size(0) <= kMaxN, kCos, ": keys must have 1 <= N <= ", kMaxN,
                    " rows, got N = ", keys_in.size(0));
  check_dtype(kCos, "keys", keys_in, h_in.scalar_type());
  TORCH_CHECK_VALUE(eps > 0.0, kCos, ": eps must be > 0, got ", eps);
  const SelectOptions o = check_select(kCos, temperature, top_p, kmax, renorm, dense);
  DeviceGuard guard(h_in);
  const at::Tensor h = h_in.contiguous(), keys = keys_in.contiguous();
  return run_fwd(kCos, h, h.size(0), keys.size(0), o, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    return CosineLogits<T_>{ptr<T_>(h), ptr<T_>(keys), static_cast<int>(h.size(1)), static_cast<acc_t<T_>>(eps)};
  });
}

// route_bwd(grad_weights [T,kmax], grad_dense [T,N]?, logits [T,N], ids [T,kmax], temperature, renorm)
//   -> dlogits [T,N]
at::Tensor route_bwd(const at::Tensor& grad_w_in, const std::optional<at::Tensor>& grad_dense_in,
                     const at::Tensor& logits_in, const at::Tensor& ids_in, double temperature,
                     std::string_view renorm) {
  check_logits(kBwd, logits_in);
  check_temperature(kBwd, temperature);
  const int rn = parse_renorm(kBwd, renorm);
  const int64_t T = logits_in.size(0), N = logits_in.size(1);
  check_device(kBwd, "ids", ids_in, logits_in);
  check_device(kBwd, "grad_weights", grad_w_in, logits_in);
  TORCH_CHECK_VALUE(ids_in.dim() == 2 && ids_in.size(0) == T && ids_in.size(1) >= 1, kBwd, ": ids must be [T, kmax] with T = ",
                    T, ", got ", ids_in.sizes());
  check_dtype(kBwd, "ids", ids_in, at::kInt);
  const int64_t kmax = ids_in.size(1);
  TORCH_CHECK_VALUE(kmax <= INT32_MAX, kBwd, ": ids has too many columns (", kmax, ")");
  TORCH_CHECK_VALUE(grad_w_in.sizes() == ids_in.sizes(), kBwd, ": grad_weights must be [T, kmax] = ", ids_in.sizes(),
                    ", got ", grad_w_in.sizes());
  check_dtype(kBwd, "grad_weights", grad_w_in, logits_in.scalar_type());
  const bool has_dense = grad_dense_in.has_value() && grad_dense_in->defined();
  if (has_dense) {
    check_device(kBwd, "grad_dense", *grad_dense_in, logits_in);
    TORCH_CHECK_VALUE(grad_dense_in->sizes() == logits_in.sizes(), kBwd, ": grad_dense must be [T, N] = ",
                      logits_in.sizes(), ", got ", grad_dense_in->sizes());
    check_dtype(kBwd, "grad_dense", *grad_dense_in, logits_in.scalar_type());
  }
  DeviceGuard guard(logits_in);
  const at::Tensor logits = logits_in.contiguous(), ids = ids_in.contiguous(), grad_w = grad_w_in.contiguous();
  const at::Tensor grad_dense = has_dense ? grad_dense_in->contiguous() : at::Tensor();
  at::Tensor dlogits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (T == 0) return dlogits;
  dispatch_float(kBwd, logits.scalar_type(), [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    check_launch(kBwd, launch_bwd<T_>(ptr<T_>(grad_w), has_dense ? ptr<T_>(grad_dense) : nullptr, ptr<T_>(logits),
                                      ptr<int32_t>(ids), ptr<T_>(dlogits), T, static_cast<int>(N),
                                      static_cast<int>(kmax), inv_temperature<acc_t<T_>>(kBwd, temperature), rn,
                                      current_stream()));
  });
  return dlogits;
}

}  // namespace
}  // namespace mk::router

MK_REGISTER_IMPLS(m) {
  m.impl("route_fwd", &mk::router::route_fwd);
  m.impl("route_bwd", &mk::router::route_bwd);
  m.impl("route_cosine_fwd", &mk::router::route_cosine_fwd);
}
