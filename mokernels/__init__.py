"""mokernels: fused CUDA kernels for mixture-of-adapters fine-tuning and serving.

Ops live in :mod:`mokernels.ops` (also re-exported here); :func:`build_info` tells what this
installation was built with; :mod:`mokernels.emu` runs the kernel source on CPU (logic only).
"""
from ._ext import build_info

from . import ops  # noqa: E402
from .ops import householder_apply, rank_one_experts, rank_one_scale  # noqa: E402
from . import modules  # noqa: E402
from .modules import HouseholderChain, MultiLoRALinear, RankOneExperts  # noqa: E402
from . import methods  # noqa: E402
from .methods import (clear_routing, extra_losses, inject, load_adapters, merge, routing, save_adapters,  # noqa: E402
                      set_adapter_ids, set_routing, set_task, trainable_parameters, unmerge)

__all__ = ["build_info", "ops", "modules", "rank_one_scale", "householder_apply", "rank_one_experts",
           "MultiLoRALinear", "HouseholderChain", "RankOneExperts", "methods", "inject", "save_adapters",
           "load_adapters", "merge", "unmerge", "routing", "set_routing", "set_task", "set_adapter_ids",
           "clear_routing", "extra_losses", "trainable_parameters"]

from .peft_accel import AccelerationReport, accelerate, restore  # noqa: E402  (peft itself is imported lazily)

__all__ += ["accelerate", "restore", "AccelerationReport"]
