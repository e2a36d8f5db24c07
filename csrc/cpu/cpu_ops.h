// Native CPU kernels of the ops' CPU path (csrc/cpu/cpu_ops.cpp), bound into mokernels._C by
// bindings.cpp as plain functions (rank_one_scale_cpu, rank_one_scale_backward_cpu, route_topk_cpu).
#pragma once

#include <pybind11/pybind11.h>

namespace mk::cpu {
void bind(pybind11::module_& m);
}  // namespace mk::cpu
