// Element types and their fp32 (fp64 for double) accumulation type. Conversions go through here so
// that kernel code never calls a dtype intrinsic directly.
#pragma once

#include "platform.cuh"

namespace mk {

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
// Accumulation type of T: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <class T> using acc_t = typename AccOf<T>::type;

MK_HOST_DEVICE float to_acc(float x) { return x; }
MK_HOST_DEVICE double to_acc(double x) { return x; }
MK_HOST_DEVICE float to_acc(__half x) { return __half2float(x); }
MK_HOST_DEVICE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> MK_HOST_DEVICE T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <> MK_HOST_DEVICE __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> MK_HOST_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace mk
