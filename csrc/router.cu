// at::Tensor wrappers of the fused router kernels (kernels/router.cuh).
#include <cmath>
#include <cstdlib>
#include <string_view>

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

// N limit of the forward kernels: kMaxN (fp64: kMaxN / 2, the sort kernel's shared memory).
int64_t kernel_max_n(c10::ScalarType st) { return st == at::kDouble ? max_n<double>() : max_n<float>(); }

void check_n(const char* op, const char* what, int64_t n, c10::ScalarType st) {
  TORCH_CHECK_VALUE(n >= 1 && n <= kernel_max_n(st), op, ": ", what, " must have 1 <= N <= ", kernel_max_n(st), " experts for ",
                    st, ", got N = ", n);
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_device(op, "logits", logits, logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [T, N], got ", logits.sizes());
  check_n(op, "logits", logits.size(1), logits.scalar_type());
}

// τ > 0 and finite, and r = 1/τ (rounded once to the accumulation type) finite and > 0 (router rule 1).
void check_temperature(const char* op, double temperature, c10::ScalarType st) {
  TORCH_CHECK_VALUE(temperature > 0.0 && temperature < INFINITY, op, ": temperature must be > 0 and finite, got ",
                    temperature);
  const bool ok = st == at::kDouble ? std::isfinite(1.0 / temperature)
                                    : (static_cast<float>(temperature) < INFINITY &&
                                       std::isfinite(inv_temperature<float>(temperature)) &&
                                       inv_temperature<float>(temperature) > 0.0f);
  TORCH_CHECK_VALUE(ok, op, ": temperature ", temperature, " and 1/temperature must be finite and > 0 in the ",
                    "accumulation type of ", st);
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The selection options shared by route_fwd and route_cosine_fwd, checked once.
struct SelectOptions {
  double temperature, top_p;
  int kmax, renorm;
  bool dense;
};

SelectOptions check_select(const char* op, c10::ScalarType st, double temperature, double top_p, int64_t kmax,
                           std::string_view renorm, bool dense) {
  check_temperature(op, temperature, st);
  TORCH_CHECK_VALUE(kmax >= 1 && kmax <= INT32_MAX, op, ": kmax must be >= 1, got ", kmax);
  TORCH_CHECK_VALUE(top_p >= 0.0, op, ": top_p must be >= 0, got ", top_p);
  return {temperature, top_p, static_cast<int>(kmax), parse_renorm(op, renorm), dense};
}

// Allocates the outputs (like `like`: device, dtype) and calls launch(tag, FwdOut<T>) for the element
// type T of `like`.
template <class Launch>
FwdOutputs run_fwd(const char* op, const at::Tensor& like, int64_t T, int64_t N, const SelectOptions& o,
                   Launch launch) {
  at::Tensor ids = at::empty({T, o.kmax}, like.options().dtype(at::kInt));
  at::Tensor weights = at::empty({T, o.kmax}, like.options());
  at::Tensor counts = at::empty({T}, like.options().dtype(at::kInt));
  at::Tensor dense_out = o.dense ? at::empty({T, N}, like.options()) : at::empty({0}, like.options());
  if (T == 0) return {ids, weights, counts, dense_out};
  dispatch_float(op, like.scalar_type(), [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    const FwdOut<T_> out{ptr<int32_t>(ids), ptr<T_>(weights), ptr<int32_t>(counts),
                         o.dense ? ptr<T_>(dense_out) : nullptr};
    check_launch(op, launch(tag, out));
  });
  return {ids, weights, counts, dense_out};
}

// route_fwd(logits [T,N], temperature, top_p (>= 1: keep all), kmax, renorm, dense)
//   -> (ids [T,kmax] int32, weights [T,kmax], counts [T] int32, dense [T,N] or [0])
FwdOutputs route_fwd(const at::Tensor& logits_in, double temperature, double top_p, int64_t kmax,
                     std::string_view renorm, bool dense) {
  check_logits(kFwd, logits_in);
  const SelectOptions o = check_select(kFwd, logits_in.scalar_type(), temperature, top_p, kmax, renorm, dense);
  DeviceGuard guard(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), N = logits.size(1);
  return run_fwd(kFwd, logits, T, N, o, [&](auto tag, auto out) {
    using T_ = typename decltype(tag)::type;
    return launch_fwd<T_, T_>(ptr<T_>(logits), out, T, static_cast<int>(N), o.kmax, o.temperature,
                              threshold<acc_t<T_>>(o.top_p), o.renorm, current_stream());
  });
}

constexpr const char* kCos = "mokernels.route_cosine_fwd";

// route_cosine_fwd(h [T,r], keys [N,r], temperature, eps, top_p, kmax, renorm, dense): route_fwd on
// the logits cos(h_t, keys_i), formed by cosine_logits_kernel into an fp32 (fp64) [T,N] workspace.
FwdOutputs route_cosine_fwd(const at::Tensor& h_in, const at::Tensor& keys_in, double temperature, double eps,
                            double top_p, int64_t kmax, std::string_view renorm, bool dense) {
  check_device(kCos, "h", h_in, h_in);
  check_device(kCos, "keys", keys_in, h_in);
  TORCH_CHECK_VALUE(h_in.dim() == 2, kCos, ": h must be [T, r], got ", h_in.sizes());
  TORCH_CHECK_VALUE(keys_in.dim() == 2 && keys_in.size(1) == h_in.size(1), kCos, ": keys must be [N, r] with r = ",
                    h_in.size(1), ", got ", keys_in.sizes());
  check_n(kCos, "keys", keys_in.size(0), h_in.scalar_type());
  check_dtype(kCos, "keys", keys_in, h_in.scalar_type());
  TORCH_CHECK_VALUE(eps > 0.0, kCos, ": eps must be > 0, got ", eps);
  const SelectOptions o = check_select(kCos, h_in.scalar_type(), temperature, top_p, kmax, renorm, dense);
  DeviceGuard guard(h_in);
  const at::Tensor h = h_in.contiguous(), keys = keys_in.contiguous();
  const int64_t T = h.size(0), N = keys.size(0);
  at::Tensor ws = at::empty({T, N}, h.options().dtype(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  return run_fwd(kCos, h, T, N, o, [&](auto tag, auto out) {
    using T_ = typename decltype(tag)::type;
    return launch_cosine_fwd<T_>(ptr<T_>(h), ptr<T_>(keys), ptr<acc_t<T_>>(ws), out, T, static_cast<int>(N),
                                 static_cast<int>(h.size(1)), static_cast<acc_t<T_>>(eps), o.kmax, o.temperature,
                                 threshold<acc_t<T_>>(o.top_p), o.renorm, current_stream());
  });
}

// route_bwd(grad_weights [T,kmax], grad_dense [T,N]?, logits [T,N], ids [T,kmax], temperature, renorm)
//   -> dlogits [T,N]
at::Tensor route_bwd(const at::Tensor& grad_w_in, const std::optional<at::Tensor>& grad_dense_in,
                     const at::Tensor& logits_in, const at::Tensor& ids_in, double temperature,
                     std::string_view renorm) {
  check_device(kBwd, "logits", logits_in, logits_in);
  TORCH_CHECK_VALUE(logits_in.dim() == 2, kBwd, ": logits must be [T, N], got ", logits_in.sizes());
  check_n(kBwd, "logits", logits_in.size(1), logits_in.scalar_type());  // the forward's limit
  check_temperature(kBwd, temperature, logits_in.scalar_type());
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
                                      static_cast<int>(kmax), temperature, rn, current_stream()));
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
