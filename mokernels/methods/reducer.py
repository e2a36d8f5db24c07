"""EffiLoRA's Reducer (METHODS.md, paper 001 §3.2): importance-sampled training of the per-layer B experts.

A "layer" here is a transformer block: every wrapped EffiLoRA linear whose name carries block number n
(``layer.block_index``) shares the score ``s_n`` (start 0). Wrapped layers without a block number are
never suppressed and always train.

* Every step (:meth:`Reducer.step`, called after ``loss.backward()`` — after DDP's all-reduce — and
  before ``optimizer.step()``): draw K blocks without replacement with probabilities ``σ(s)/Σσ(s)``
  (``literal_sign=True``: ``σ(−s)``, the paper's printed formula; the default follows its words,
  "biased towards higher importance") from a seeded ``torch.Generator`` (the same seed gives the same
  draws on every rank), and set the ``B`` gradients of every unsampled block to None, so the optimizer
  leaves them alone this step. Nothing toggles ``requires_grad`` (that would recompile graphs and break DDP).
  The shared A and the routers always train.
* Every ``period`` steps, if a ``val_loss`` callback is given: measure the validation loss, suppress the
  ``n_suppress`` lowest-scored blocks (their layers' ``delta_scale`` = ``suppress_scale``, ~0), measure
  it again, restore the scales (also on an exception), and raise the suppressed blocks' scores by
  ``score_lr · max(L_suppressed − L, 0)`` (a suppression that does not hurt is no evidence of importance).
  The callback runs under ``torch.no_grad()`` and returns a float or a scalar tensor; every rank must
  compute the same value (e.g. a fixed validation batch, or all-reduce it in the callback).

Under ``torch.compile`` the suppression scale is a Python float on each layer: a compiled validation
forward is specialised (recompiled once) for the suppressed blocks.

Defaults: period 100, n_suppress = half the blocks, K = a quarter (at least 1), score_lr 1.0,
suppress_scale 0.0, seed 0.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from .effilora import EffiLoRALinear
from .inject import adapter_layers

__all__ = ["Reducer"]


class Reducer:
    def __init__(self, model: nn.Module, *, period: int = 100, n_suppress: Optional[int] = None,
                 k_sample: Optional[int] = None, score_lr: float = 1.0, suppress_scale: float = 0.0,
                 literal_sign: bool = False, seed: int = 0):
        layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, EffiLoRALinear)]
        if not layers:
            raise ValueError("Reducer: the model has no EffiLoRA layers (mokernels.inject(model, 'effilora', ...))")
        self.blocks: list[int] = sorted({l.block_index for l in layers if l.block_index is not None})
        if not self.blocks:
            raise ValueError("Reducer: no wrapped layer name carries a block number (r'\\.(\\d+)\\.'); "
                             "the Reducer scores transformer blocks")
        nb = len(self.blocks)
        self.by_block: dict[int, list[EffiLoRALinear]] = {b: [] for b in self.blocks}
        for l in layers:
            if l.block_index is not None:
                self.by_block[l.block_index].append(l)
        self.n_suppress = nb // 2 if n_suppress is None else int(n_suppress)
        self.k_sample = max(1, nb // 4) if k_sample is None else int(k_sample)
        if not 0 <= self.n_suppress <= nb or not 1 <= self.k_sample <= nb or period < 0:
            raise ValueError(f"Reducer: need 0 <= n_suppress <= {nb}, 1 <= k_sample <= {nb} blocks and period >= 0; got "
                             f"n_suppress={self.n_suppress}, k_sample={self.k_sample}, period={period}")
        self.period = int(period)
        self.score_lr = float(score_lr)
        self.suppress_scale = float(suppress_scale)
        self.literal_sign = bool(literal_sign)
        self.scores = torch.zeros(nb, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps = 0
        self.sampled: list[int] = []
        self.history: list[dict] = []

    # -- sampling ------------------------------------------------------------------------------------

    def probabilities(self) -> torch.Tensor:
        s = -self.scores if self.literal_sign else self.scores
        p = torch.sigmoid(s)
        return p / p.sum()

    def sample(self) -> list[int]:
        """Draws this step's K blocks (block numbers, sorted)."""
        idx = torch.multinomial(self.probabilities(), self.k_sample, replacement=False, generator=self.generator)
        self.sampled = sorted(self.blocks[i] for i in idx.tolist())
        return self.sampled

    def mask_grads(self, sampled: Optional[list[int]] = None) -> None:
        """Sets the B gradients of every block not in ``sampled`` (default: the last draw) to None."""
        keep = set(self.sampled if sampled is None else sampled)
        for b, ls in self.by_block.items():
            if b not in keep:
                for l in ls:
                    l.lora_B.grad = None

    # -- suppression / scores --------------------------------------------------------------------------

    def lowest(self) -> list[int]:
        """The ``n_suppress`` lowest-scored blocks (ties: lower block number first)."""
        order = sorted(range(len(self.blocks)), key=lambda i: (float(self.scores[i]), i))
        return [self.blocks[i] for i in order[: self.n_suppress]]

    @contextlib.contextmanager
    def suppressed(self, blocks):
        """Scales the deltas of ``blocks`` by ``suppress_scale`` inside the block; restored in finally."""
        saved = [(l, l.delta_scale) for b in blocks for l in self.by_block[b]]
        try:
            for l, _ in saved:
                l.delta_scale = self.suppress_scale
            yield
        finally:
            for l, s in saved:
                l.delta_scale = s

    def update_scores(self, val_loss: Callable[[], float]) -> dict:
        """One suppression round (see the module docstring); returns its record."""
        with torch.no_grad():
            base = float(val_loss())
            blocks = self.lowest()
            with self.suppressed(blocks):
                supp = float(val_loss())
        inc = supp - base
        for b in blocks:
            self.scores[self.blocks.index(b)] += self.score_lr * max(inc, 0.0)
        rec = {"step": self.steps, "suppressed": blocks, "loss": base, "suppressed_loss": supp, "increase": inc}
        self.history.append(rec)
        return rec

    def step(self, val_loss: Optional[Callable[[], float]] = None) -> list[int]:
        """Call between ``loss.backward()`` and ``optimizer.step()``: draws K blocks, drops the other blocks'
        B gradients, and every ``period`` steps (with ``val_loss``) updates the scores. Returns the draw."""
        sampled = self.sample()
        self.mask_grads(sampled)
        self.steps += 1
        if val_loss is not None and self.period and self.steps % self.period == 0:
            self.update_scores(val_loss)
        return sampled

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.scores.copy_(sd["scores"])
        self.steps = int(sd["steps"])
        self.generator.set_state(sd["generator"])
