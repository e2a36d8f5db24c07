"""mokernels ops: one module per kernel family. Each defines the public function (docstring with the
formula and every shape), the pure-torch reference ``<op>_reference`` (the CPU kernel and the tests'
oracle), the fake kernel and the autograd formula of its `torch.ops.mokernels` ops."""
from .rank_one import rank_one_scale, rank_one_scale_backward_reference, rank_one_scale_reference

from .router import Routing, route, route_cosine, route_reference, route_segments

__all__ = ["rank_one_scale", "rank_one_scale_reference", "rank_one_scale_backward_reference"]
__all__ += ["Routing", "route", "route_cosine", "route_reference", "route_segments"]

from .lora import (  # noqa: E402
    lora_apply,
    lora_apply_,
    lora_apply_sliced,
    lora_apply_reference,
    lora_expand,
    lora_linear,
    lora_shared_apply,
    lora_shared_apply_reference,
    lora_shrink,
)

__all__ += ["lora_apply", "lora_apply_", "lora_apply_sliced", "lora_linear", "lora_shared_apply", "lora_shrink", "lora_expand", "lora_apply_reference",
            "lora_shared_apply_reference"]

from .householder import (  # noqa: E402
    hra_vectors,
    householder_apply,
    householder_apply_backward_reference,
    householder_apply_reference,
    householder_matrix,
    householder_sequential_reference,
    householder_wy,
    merge_householder,
    rank_one_experts,
    rank_one_experts_reference,
    unmerge_householder,
)

__all__ += ["householder_apply", "householder_apply_reference", "householder_sequential_reference",
            "householder_apply_backward_reference", "householder_wy", "householder_matrix", "merge_householder",
            "unmerge_householder", "rank_one_experts", "rank_one_experts_reference", "hra_vectors"]

from . import tile_gemm  # noqa: E402,F401  (registers the test op's CPU/fake kernels)
from . import moore  # noqa: E402,F401  (registers the fused MoORE gate ops' fake/CPU kernels and autograd)
