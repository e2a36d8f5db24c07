"""MoORE (METHODS.md "MoORE (004)"): the rank-one SVD pieces of W as experts, gated per task and token.

At wrap time, once: the thin SVD ``W = U diag(σ) Vᵀ`` (fp32), ``U [d_out, R]``, ``σ [R]``,
``V [d_in, R]``, ``R = min(d_in, d_out)``, kept as frozen buffers in the adapter checkpoint (a reload
never re-runs the SVD; for a square layer this doubles the layer's weight memory). Then::

    x' = H x                    Householder chain H = Π_l (I − 2 u_l u_lᵀ / ‖u_l‖²), L = 8 (even),
                                identity init (u_{2i} = u_{2i+1})
    g  = Pᵀ e_task + Qᵀ (Γ x)   task embeddings e [K, 128] (unseen task -1: their mean), P [128, R] = 0,
                                Γ [64, d_in] (kaiming), Q [64, R] = 0   (the paper's linear router)
    y  = U ((σ + g) ⊙ (Vᵀ x')) + b_W       (clip=True: relu(σ + g), the official code's variant)

The base weight W stays registered (same state_dict names as ``nn.Linear``) but the forward uses
U, σ, V: a fresh wrap equals ``W x + b`` up to the fp32 SVD round trip. Trainable: the Householder
vectors, the task embeddings, P, Γ, Q (σ too with ``train_sigma=True``).

Inference: ``mokernels.merge(model)`` (:meth:`MoORELinear.merge`) folds H into V (``V' = Hᵀ V``, kept beside V so that
:meth:`unmerge` is exact) and the forward then skips the chain; the routing stays (task ids and x
still gate the experts). ``V'`` is a cache: it is refolded when the Householder vectors or V change
(``load_adapters``, an optimizer step), and a forward that needs their gradients (grad mode on, vectors
trainable: training while merged) runs the chain, so merged and unmerged always agree. The layer is
:func:`mokernels.ops.rank_one_experts` (issue 11: the chain, the two expert GEMMs and the gate in one
op; today its reference composition) and :func:`mokernels.ops.householder_apply` for the merge.

Routing context: task ids (``mokernels.set_task`` / ``mokernels.routing(model, task_ids=...)``), one
per sequence (``x.shape[0]``) or per token; ``-1`` = unseen task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import householder_apply, rank_one_experts
from .base import AdapterLayer, MethodConfig, register_method


@dataclass
class MoOREConfig(MethodConfig):
    """MoORE hyperparameters (METHODS.md defaults).

    num_tasks: K rows of the task-embedding table (task ids in [0, K), -1 = unseen); task_dim: the task
    embedding size (128); router_dim: d_s, the rows of Γ (64); householder: L, the chain length (even,
    identity init pairs; 0 = no chain); clip: relu(σ + g) instead of σ + g; train_sigma: train σ too.
    """

    num_tasks: int = 8
    task_dim: int = 128
    router_dim: int = 64
    householder: int = 8
    clip: bool = False
    train_sigma: bool = False


@register_method("moore")
class MoORELinear(AdapterLayer):
    """MoORE drop-in for ``nn.Linear`` (see the module docstring). Adapter state: buffers ``svd_U
    [d_out, R]``, ``svd_V [d_in, R]``, ``svd_sigma [R]`` (a parameter with train_sigma); parameters
    ``householder_u [L, d_in]``, ``task_emb [K, 128]``, ``router_P [128, R]``, ``router_gamma [64, d_in]``,
    ``router_Q [64, R]``."""

    method = "moore"
    Config = MoOREConfig
    can_merge = True
    merged_keeps_routing = True  # only H is folded into V: the merged layer still routes (task ids and x)

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: MoOREConfig, name: str) -> None:
        if cfg.householder < 0 or cfg.householder % 2:
            raise ValueError(f"moore: layer {name!r}: the Householder chain length must be even and >= 0 (identity "
                             f"init pairs equal vectors, u_2i = u_2i+1), got householder = {cfg.householder}")
        for k in ("num_tasks", "task_dim", "router_dim"):
            if getattr(cfg, k) < 1:
                raise ValueError(f"moore: {k} must be >= 1, got {getattr(cfg, k)}")

    @classmethod
    def routing_limits(cls, cfg: MoOREConfig) -> dict:
        return {"task_ids": cfg.num_tasks}

    @classmethod
    def demo_config(cls, num_tasks: int) -> dict:
        return {"num_tasks": num_tasks}

    @classmethod
    def demo_targets(cls) -> list:
        return [r"encoder\..*\.(query|key|value|attention\.output\.dense)"]  # QKVO (FFN too costs the demo time)

    def __init__(self, linear: nn.Linear, cfg: MoOREConfig, *, name: str, state, shared):
        self.check_linear(linear, cfg, name)  # also for direct construction (inject checks in its dry run)
        super().__init__(linear, cfg, name=name, state=state, shared=shared)
        w = linear.weight
        dev, dt = w.device, w.dtype
        U, s, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        R = s.shape[0]
        self.register_buffer("svd_U", U.to(dt).contiguous())
        self.register_buffer("svd_V", Vh.T.to(dt).contiguous())
        if cfg.train_sigma:
            self.svd_sigma = nn.Parameter(s.to(dt))
        else:
            self.register_buffer("svd_sigma", s.to(dt))
        half = torch.randn(cfg.householder // 2, self.in_features, device=dev)
        self.householder_u = nn.Parameter(half.repeat_interleave(2, dim=0).to(dt))  # pairs cancel: H = I
        self.task_emb = nn.Parameter(torch.randn(cfg.num_tasks, cfg.task_dim, device=dev).to(dt))
        self.router_P = nn.Parameter(torch.zeros(cfg.task_dim, R, device=dev, dtype=dt))
        gamma = torch.empty(cfg.router_dim, self.in_features, device=dev)
        nn.init.kaiming_uniform_(gamma, a=math.sqrt(5))
        self.router_gamma = nn.Parameter(gamma.to(dt))
        self.router_Q = nn.Parameter(torch.zeros(cfg.router_dim, R, device=dev, dtype=dt))
        self.merged_V: Tensor | None
        self.register_buffer("merged_V", None, persistent=False)  # Hᵀ V while merged (not adapter state)

    # -- routing --------------------------------------------------------------------------------
    def task_gates(self, x: Tensor) -> Tensor:
        """``p_task [..., R] = Pᵀ e_task`` per token; task -1 uses the mean task embedding."""
        tid = self.routing_state.token_task_ids(x, self.layer_name).reshape(x.shape[:-1])
        emb = torch.cat([self.task_emb, self.task_emb.mean(0, keepdim=True)])  # row -1: the mean
        return (emb @ self.router_P)[tid]  # K+1 rows projected, then gathered: never [T, 128] @ [128, R]

    def gates(self, x: Tensor) -> Tensor:
        """``g [..., R] = Pᵀ e_task + Qᵀ (Γ x)``."""
        return self.task_gates(x) + F.linear(x, self.router_gamma) @ self.router_Q

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        act = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # activation dtype
        c = lambda t: None if t is None else t.to(act)  # noqa: E731  (no-op without autocast)
        xa = x.to(act)
        merged = self._merged_V_current()
        y = rank_one_experts(xa, c(self.svd_U), c(self.svd_sigma), c(self.merged_V if merged else self.svd_V),
                             F.linear(xa, c(self.router_gamma)), c(self.router_Q), c(self.task_gates(x)),
                             None if merged or not self.cfg.householder else c(self.householder_u), clip=self.cfg.clip)
        return y if self.bias is None else y + c(self.bias)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The layer as a straightforward torch composition (the chain as explicit Householder
        matrices, no mokernels op): the tests' oracle."""
        H = torch.eye(self.in_features, device=x.device, dtype=torch.float32)
        for u in self.householder_u.float():
            H = H @ (torch.eye(self.in_features, device=x.device) - 2.0 * torch.outer(u, u) / u.dot(u))
        xh = x.float() @ H.T
        s = self.svd_sigma.float() + self.gates(x).float()
        if self.cfg.clip:
            s = torch.relu(s)
        y = ((xh @ self.svd_V.float()) * s) @ self.svd_U.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    # -- merge ------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Folds the Householder chain into V (``V' = Hᵀ V``, kept beside V, so :meth:`unmerge` is exact);
        the router stays (the merged layer still reads the task ids and x)."""
        if self.merged:
            raise RuntimeError(f"mokernels: layer {self.layer_name!r} is already merged")
        self._fold()
        self.merged = True

    @torch.no_grad()
    def _fold(self) -> None:
        v = self.svd_V
        self.merged_V = householder_apply(v.T, self.householder_u, transpose=True).T.contiguous() \
            if self.cfg.householder else v.clone()
        self._merged_sig = self._fold_sig()

    def _fold_sig(self) -> tuple:
        u, v = self.householder_u, self.svd_V
        return (u, u.data_ptr(), u._version, u.dtype, v, v.data_ptr(), v._version, v.dtype)

    def _merged_V_current(self) -> bool:
        """Whether the forward may use the folded ``V' = Hᵀ V``. ``merged_V`` is a cache of the chain: it is
        refolded when the Householder vectors or V changed since the merge (``load_adapters``, an optimizer
        step, ``copy_``, ``.to(dtype)``), and the chain itself runs when autograd needs gradients for the
        Householder vectors (training while merged trains them, as unmerged)."""
        if not self.merged:
            return False
        if self.cfg.householder and torch.is_grad_enabled() and self.householder_u.requires_grad:
            return False
        sig = self._fold_sig()
        old = getattr(self, "_merged_sig", None)
        same = old is not None and all((a is b) if isinstance(a, Tensor) else a == b for a, b in zip(old, sig))
        if self.merged_V is None or not same:
            self._fold()
        return True

    def unmerge(self) -> None:
        self.merged_V = None
        self._merged_sig = None
        self.merged = False

    def stats(self) -> dict:
        return {"rank": int(self.svd_sigma.shape[0]), "merged": self.merged}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"in_features={self.in_features}, out_features={self.out_features}, R={self.svd_sigma.shape[0]}, "
                f"householder={c.householder}, tasks={c.num_tasks}, clip={c.clip}")

