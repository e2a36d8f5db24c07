"""LoRA forward speed work (issue 10 items 2, 6, 7): the validate=False hot path of lora_apply (host
overhead: ATen ops per call), and the fused pass over W (lora_linear) vs its reference."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mokernels.ops.lora import lora_apply, lora_apply_

from test_lora import make_form, naive, weights

VIEW_OPS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.detach.default",
            "aten.expand.default", "aten.alias.default"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _canonical(kw):
    """The forms of make_form in the ops' own dtypes (int32 metadata, fp32 weights): the hot path's input."""
    out = {}
    for name, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[name] = v.to(torch.int32)
        elif hasattr(v, "_fields"):  # Routing
            out[name] = v
        else:
            parts = list(v)
            if hasattr(parts[-1], "_fields"):
                out[name] = (parts[0].to(torch.int32), parts[-1])
            else:
                out[name] = tuple(p.to(torch.int32) if not p.is_floating_point() else p.float() for p in parts)
    return out


@pytest.mark.parametrize("form", ["ids", "segments", "mixture", "routing", "segment_mixture", "segment_routing"])
def test_hot_path_matches_loop_with_one_op(form):
    """validate=False with canonical dtypes: the same values as the per-token loop, and no ATen op but
    views besides the LoRA op itself (before: clamp + int32 conversion of the ids, torch.full for a float
    scale, the scale's dtype conversion)."""
    torch.manual_seed(0)
    A, B, scale = weights(5, 4, 16, 12, torch.float32)
    scale = scale.float()
    x, base = torch.randn(2, 3, 16), torch.randn(2, 3, 12)
    kw, routes = make_form(form, (2, 3), 5)
    kw = _canonical(kw)
    for sc, sc_ref in ((scale, scale), (0.75, torch.full((5,), 0.75))):
        lora_apply(x, A, B, sc, base_out=base, validate=False, **kw)  # builds the cached float scale
        with _Ops() as seen:
            y = lora_apply(x, A, B, sc, base_out=base, validate=False, **kw)
        heavy = [o for o in seen.ops if o not in VIEW_OPS]
        assert heavy == ["mokernels.lora_apply.default"], heavy
        k = 2 if "mixture" in form or form == "routing" else 1
        torch.testing.assert_close(y.double(), naive(x, A, B, sc_ref, routes, base), rtol=1e-5 * k, atol=1e-5 * k)
        out = base.clone()
        lora_apply_(out, x, A, B, sc, validate=False, **kw)
        torch.testing.assert_close(out, y)


def test_hot_path_keeps_gradients_and_shape_errors():
    A, B, scale = weights(3, 4, 8, 6, torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 1], dtype=torch.int32)
    y = lora_apply(x, A, B, scale, ids=ids, validate=False)
    (g,) = torch.autograd.grad(y.sum(), x)
    want = torch.zeros_like(g)
    for t, i in enumerate(ids.tolist()):
        if i >= 0:
            want[t] = scale[i] * (A[i].T @ B[i].T.sum(1))
    torch.testing.assert_close(g, want)
    with pytest.raises(ValueError, match="ids"):
        lora_apply(x.detach(), A, B, scale, ids=ids[:3], validate=False)
    with pytest.raises(ValueError, match="base_out"):
        lora_apply(x.detach(), A, B, scale, ids=ids, base_out=torch.zeros(4, 5, dtype=torch.float64), validate=False)
    with pytest.raises(ValueError, match="A"):
        lora_apply(x.detach(), A[:, :, :7], B, scale, ids=ids, validate=False)
