"""Multi-adapter LoRA (mokernels.ops.lora): the five routing forms, reference vs an independent naive
per-token loop, the emulated decode kernel vs the reference, autograd, validation and opcheck."""
from __future__ import annotations

import pytest
import torch

from mokernels.ops import Routing, route
from mokernels.ops.lora import (
    lora_apply,
    lora_apply_,
    lora_apply_reference,
    lora_expand,
    lora_shared_apply,
    lora_shared_apply_reference,
    lora_shrink,
)

from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FORMS = ["ids", "segments", "mixture", "routing", "segment_mixture", "segment_routing"]

# reference / kernel vs the fp64 naive loop: inputs are rounded to the dtype, both sides compute in
# fp32 (fp64), the output is rounded once
LOOP_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# kernel vs reference: the same fp32 math in another summation order, each rounded once
KERNEL_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def weights(N, r, d_in, d_out, dtype, offset=0, device="cpu"):
    """A [N, r, d_in], B [N, d_out, r], scale [N]; offset > 0 shifts A and B inside their storage
    (misaligned pointers: the kernel must fall back to narrower vectors)."""

    def t(*shape, std):
        n = int(torch.tensor(shape).prod())
        return (torch.randn(n + offset, dtype=torch.float64) * std)[offset:].view(*shape).to(dtype).to(device)

    A = t(N, r, d_in, std=d_in ** -0.5)
    B = t(N, d_out, r, std=r ** -0.5)
    scale = torch.rand(N, dtype=torch.float64) + 0.5
    return A, B, scale


def random_offsets(T, S, gen=None):
    """Sorted offsets [S+1] from 0 to T (some segments empty when S > T)."""
    cuts = torch.sort(torch.randint(0, T + 1, (max(S - 1, 0),), generator=gen)).values
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), T, dtype=torch.long)])[: S + 1]


def random_mixture(R, N, k, with_pads=True):
    """ids [R, k] distinct per row (-1 pads) and weights [R, k] (0 at pads)."""
    if N >= k and R > 0:
        ids = torch.stack([torch.randperm(N)[:k] for _ in range(R)])
    else:
        ids = torch.randint(0, N, (R, k))
    if with_pads and k > 1:
        pad = torch.rand(R, k) < 0.3
        ids = torch.where(pad, torch.full_like(ids, -1), ids)
    w = torch.rand(R, k, dtype=torch.float64)
    w = torch.where(ids >= 0, w, torch.zeros_like(w))
    return ids, w


def make_form(form, lead, N, k=2, S=3, all_none=False):
    """(kwargs for lora_apply, per-token routes [[(id, w), ...] per token]) — the routes are built here
    independently of the library's own expansion of the forms."""
    T = int(torch.Size(lead).numel())
    if form == "ids":
        ids = torch.randint(-1, N, (T,))
        if all_none:
            ids.fill_(-1)
        return dict(ids=ids.reshape(lead)), [[(int(i), 1.0)] if i >= 0 else [] for i in ids]
    if form in ("mixture", "routing"):
        ids, w = random_mixture(T, N, k)
        if all_none:
            ids.fill_(-1)
        if form == "routing":  # a router's weights are fp32
            w = w.float().double()
        routes = [[(int(i), float(x)) for i, x in zip(ids[t], w[t]) if i >= 0] for t in range(T)]
        if form == "routing":
            rt = Routing(ids.to(torch.int32).reshape(*lead, k), w.float().reshape(*lead, k), (ids >= 0).sum(-1).int(), None)
            return dict(mixture=rt), routes
        return dict(mixture=(ids.reshape(*lead, k), w.reshape(*lead, k))), routes
    off = random_offsets(T, S)
    seg_of = [next(s for s in range(S) if off[s] <= t < off[s + 1]) for t in range(T)]
    if form == "segments":
        sid = torch.randint(-1, N, (S,))
        if all_none:
            sid.fill_(-1)
        return dict(segments=(off, sid)), [[(int(sid[s]), 1.0)] if sid[s] >= 0 else [] for s in seg_of]
    sid, sw = random_mixture(S, N, k)
    if all_none:
        sid.fill_(-1)
    if form == "segment_routing":
        sw = sw.float().double()
    routes = [[(int(i), float(x)) for i, x in zip(sid[s], sw[s]) if i >= 0] for s in seg_of]
    if form == "segment_routing":
        return dict(segment_mixture=(off, Routing(sid.int(), sw.float(), (sid >= 0).sum(-1).int(), None))), routes
    return dict(segment_mixture=(off, sid, sw)), routes


def naive(x, A, B, scale, routes, base=None):
    """The formula, token by token, in fp64: y[t] = base[t] + Σ_(i, w) w · scale[i] · B[i] @ (A[i] @ x[t])."""
    d_in, d_out = x.shape[-1], B.shape[1]
    xs = x.reshape(-1, d_in).double()
    y = torch.zeros(xs.shape[0], d_out, dtype=torch.float64) if base is None else base.reshape(-1, d_out).double().clone()
    for t, route_t in enumerate(routes):
        for i, w in route_t:
            y[t] += w * float(scale[i]) * (B[i].double() @ (A[i].double() @ xs[t]))
    return y.reshape(*x.shape[:-1], d_out)


def assert_close_to_loop(got, want, dtype, k=1):
    tol = dict(LOOP_TOL[dtype])
    if k > 1:  # k adapters each rounded into the dtype's inputs: error grows with k
        tol = {n: v * k for n, v in tol.items()}
    torch.testing.assert_close(got.double(), want, **tol)


# ------------------------------------------------------------------------------------------------
# Reference (CPU path) vs the naive loop


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_naive_loop(form, dtype):
    lead, N, r, d_in, d_out = (2, 5), 6, 4, 24, 20  # 3-D input
    A, B, scale = weights(N, r, d_in, d_out, dtype)
    x = torch.randn(*lead, d_in).to(dtype)
    base = torch.randn(*lead, d_out).to(dtype)
    kw, routes = make_form(form, lead, N, k=3, S=4)
    y = lora_apply(x, A, B, scale, base_out=base, **kw)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    assert_close_to_loop(y, naive(x, A, B, scale, routes, base), dtype, k=3)
    y0 = lora_apply(x, A, B, scale, **kw)  # delta only
    assert_close_to_loop(y0, naive(x, A, B, scale, routes), dtype, k=3)


ODD = [  # (lead, N, r, d_in, d_out)
    ((1,), 3, 1, 5, 7),  # T=1, r=1, d not a multiple of 8
    ((9,), 1, 3, 13, 11),  # one adapter
    ((4, 3), 10, 8, 16, 24),  # more adapters than used
    ((0,), 3, 2, 8, 8),  # no tokens
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lead,N,r,d_in,d_out", ODD)
def test_reference_odd_shapes(form, lead, N, r, d_in, d_out):
    A, B, scale = weights(N, r, d_in, d_out, torch.float64)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    kw, routes = make_form(form, lead, N, k=2, S=3)
    torch.testing.assert_close(lora_apply(x, A, B, scale, **kw), naive(x, A, B, scale, routes))


@pytest.mark.parametrize("form", FORMS)
def test_all_tokens_without_adapter_give_base(form):
    A, B, scale = weights(4, 3, 8, 6, torch.float32)
    x, base = torch.randn(5, 8), torch.randn(5, 6)
    kw, _ = make_form(form, (5,), 4, all_none=True)
    torch.testing.assert_close(lora_apply(x, A, B, scale, base_out=base, **kw), base, rtol=0, atol=0)


def test_float_scale_and_routing_from_route():
    A, B, _ = weights(5, 4, 16, 12, torch.float32)
    x = torch.randn(7, 16)
    rt = route(torch.randn(7, 5), top_k=2)
    y = lora_apply(x, A, B, 0.5, mixture=rt)
    routes = [[(int(i), float(w)) for i, w in zip(rt.ids[t], rt.weights[t]) if i >= 0] for t in range(7)]
    assert_close_to_loop(y, naive(x, A, B, torch.full((5,), 0.5), routes), torch.float32)


def test_invalid_ids_without_validation_mean_no_adapter():
    """validate=False (as under compile/capture): ids outside [0, N) and tokens outside every segment
    contribute nothing — never an out-of-bounds read."""
    A, B, scale = weights(3, 2, 8, 6, torch.float64)
    x = torch.randn(6, 8, dtype=torch.float64)
    ids = torch.tensor([0, 3, -5, 2, 100, -1])
    routes = [[(0, 1.0)], [], [], [(2, 1.0)], [], []]
    torch.testing.assert_close(lora_apply(x, A, B, scale, ids=ids, validate=False), naive(x, A, B, scale, routes))
    off = torch.tensor([0, 2, 4])  # tokens 4, 5 outside every segment
    y = lora_apply(x, A, B, scale, segments=(off, torch.tensor([1, 7])), validate=False)
    torch.testing.assert_close(y, naive(x, A, B, scale, [[(1, 1.0)]] * 2 + [[]] * 4))


def test_inplace_equals_out_of_place():
    A, B, scale = weights(4, 4, 16, 8, torch.float32)
    x, base = torch.randn(2, 3, 16), torch.randn(2, 3, 8)
    kw, _ = make_form("mixture", (2, 3), 4)
    want = lora_apply(x, A, B, scale, base_out=base, **kw)
    out = base.clone()
    assert lora_apply_(out, x, A, B, scale, **kw) is out
    torch.testing.assert_close(out, want)


def test_int64_ids_and_offsets_saturate_instead_of_wrapping():
    """Review finding: int64 metadata was cast to int32 before validation, so 2**32 became adapter 0 and
    2**32 - 1 became "no adapter". Now out-of-range int64 values stay out of range."""
    A, B, scale = weights(3, 2, 8, 6, torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="ids"):
        lora_apply(x, A, B, scale, ids=torch.tensor([0, 1, 2, 2**32]))
    with pytest.raises(ValueError, match="offsets"):
        lora_apply(x, A, B, scale, segments=(torch.tensor([0, 2**32 + 2, 4]), torch.tensor([0, 1])))
    y = lora_apply(x, A, B, scale, ids=torch.tensor([2**32, 2**32 - 1, 0, -1]), validate=False)
    torch.testing.assert_close(y, naive(x, A, B, scale, [[], [], [(0, 1.0)], []]))


def test_inplace_rejects_out_aliasing_x():
    """Review finding: out sharing memory with x raced on the GPU (other blocks still read x)."""
    A, B, scale = weights(2, 8, 16, 16, torch.float32)
    h = torch.randn(3, 16)
    with pytest.raises(ValueError, match="share memory with x"):
        lora_apply_(h, h, A, B, scale, ids=torch.tensor([0, 1, -1]))


@pytest.mark.emu
def test_emulated_inplace_rejects_out_aliasing_x(emu_ops):
    A, B, scale = weights(2, 8, 256, 256, torch.float32)
    h = torch.randn(1, 256)
    with pytest.raises(Exception, match="share memory with x"):
        emu_ops.lora_apply_(h, h, A, B, scale, torch.zeros(1, 1, dtype=torch.int32), None, None)


@pytest.mark.parametrize("form", ["ids", "mixture", "segment_mixture"])
def test_shrink_expand_compose_to_apply(form):
    A, B, scale = weights(5, 4, 16, 12, torch.float64)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    kw, routes = make_form(form, (2, 4), 5)
    h = lora_shrink(x, A, **kw)
    assert h.dtype == torch.float64 and h.shape[-1] == 4
    assert h.dim() == (3 if form == "ids" else 4)
    y = lora_expand(h, B, scale, **kw)
    torch.testing.assert_close(y, naive(x, A, B, scale, routes))


# ------------------------------------------------------------------------------------------------
# Shared A


def naive_shared(x, A, B, scale, wdense, base=None):
    xs = x.reshape(-1, x.shape[-1]).double()
    y = torch.zeros(xs.shape[0], B.shape[1], dtype=torch.float64) if base is None else base.reshape(xs.shape[0], -1).double().clone()
    for t in range(xs.shape[0]):
        h = A.double() @ xs[t]
        for i in range(B.shape[0]):
            y[t] += scale * float(wdense[t, i]) * (B[i].double() @ h)
    return y.reshape(*x.shape[:-1], B.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compact", [False, True])
def test_shared_reference_matches_naive(dtype, compact):
    N, r, d_in, d_out = 4, 6, 20, 12
    x = torch.randn(3, 2, d_in).to(dtype)
    A = (torch.randn(r, d_in) / d_in**0.5).to(dtype)
    B = (torch.randn(N, d_out, r) / r**0.5).to(dtype)
    base = torch.randn(3, 2, d_out).to(dtype)
    if compact:
        ids, w = random_mixture(6, N, 2)
        dense = torch.zeros(6, N, dtype=torch.float64).scatter_add(1, ids.clamp(min=0), w)
        y = lora_shared_apply(x, A, B, 2.0, mixture=(ids.reshape(3, 2, 2), w.reshape(3, 2, 2)), base_out=base)
    else:
        dense = torch.softmax(torch.randn(6, N, dtype=torch.float64), -1)
        y = lora_shared_apply(x, A, B, 2.0, weights=dense.reshape(3, 2, N).to(dtype), base_out=base)
        dense = dense.to(dtype).double()
    assert_close_to_loop(y, naive_shared(x, A, B, 2.0, dense, base), dtype, k=N)


# ------------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form):
    N, r, d_in, d_out = 4, 3, 6, 5
    A, B, scale = weights(N, r, d_in, d_out, torch.float64)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    base = torch.randn(2, 3, d_out, dtype=torch.float64)
    kw, _ = make_form(form, (2, 3), N, k=2, S=3)
    key = next(iter(kw))
    val = kw[key]
    wt = None
    if form in ("mixture", "segment_mixture"):
        wt = val[-1].clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (x, A, B, base)]

    def f(x, A, B, base, *w):
        v = val
        if w:
            v = (*val[:-1], w[0])
        return lora_apply(x, A, B, scale, base_out=base, **{key: v})

    args = (*leaves,) + ((wt,) if wt is not None else ())
    assert torch.autograd.gradcheck(f, args)


def test_backward_matches_autograd_of_naive():
    """The closed-form backward vs autograd through the per-token loop (segment mixture: the weight
    gradient sums over each segment's tokens)."""
    N, r, d_in, d_out = 5, 4, 8, 6
    A, B, scale = weights(N, r, d_in, d_out, torch.float64)
    x = torch.randn(7, d_in, dtype=torch.float64)
    off = torch.tensor([0, 3, 3, 7])
    sid = torch.tensor([[0, 2], [1, -1], [4, 0]])
    sw = torch.rand(3, 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, sw)]
    y = lora_apply(*leaves[:3], scale, segment_mixture=(off, sid, leaves[3]))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    leaves2 = [t.clone().requires_grad_() for t in (x, A, B, sw)]
    xx, AA, BB, ww = leaves2
    rows = []
    for t in range(7):
        s = next(s for s in range(3) if off[s] <= t < off[s + 1])
        acc = torch.zeros(d_out, dtype=torch.float64)
        for j in range(2):
            i = int(sid[s, j])
            if i >= 0:
                acc = acc + ww[s, j] * scale[i] * (BB[i] @ (AA[i] @ xx[t]))
        rows.append(acc)
    want = torch.autograd.grad(torch.stack(rows), leaves2, g)
    for name, a, b in zip(("dx", "dA", "dB", "dw"), got, want):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("compact", [False, True])
def test_shared_gradcheck(compact):
    N, r, d_in, d_out = 3, 2, 5, 4
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, d_out, r, dtype=torch.float64, requires_grad=True)
    if compact:
        ids, w = random_mixture(4, N, 2)
        w.requires_grad_()
        f = lambda x, A, B, w: lora_shared_apply(x, A, B, 1.5, mixture=(ids, w))  # noqa: E731
    else:
        w = torch.rand(4, N, dtype=torch.float64, requires_grad=True)
        f = lambda x, A, B, w: lora_shared_apply(x, A, B, 1.5, weights=w)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, A, B, w))


def test_scale_gets_no_gradient_and_low_precision_backward():
    A, B, scale = weights(3, 4, 16, 8, torch.bfloat16)
    x = torch.randn(5, 16).to(torch.bfloat16).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = lora_apply(x, A, B, scale, ids=torch.tensor([0, 1, 2, -1, 1]))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.bfloat16 and B.grad.dtype == torch.bfloat16
    assert torch.all(x.grad[3] == 0) and A.grad[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument (eager validation)


def _base_args():
    A, B, scale = weights(4, 2, 8, 6, torch.float32)
    return torch.randn(5, 8), A, B, scale


BAD = [
    ("ids >= N", dict(ids=torch.tensor([0, 1, 4, 0, 0])), r"ids must be in \[-1, N\)"),
    ("ids < -1", dict(ids=torch.tensor([0, -2, 1, 0, 0])), r"ids must be in \[-1, N\)"),
    ("ids shape", dict(ids=torch.tensor([0, 1])), "ids must be"),
    ("ids float", dict(ids=torch.zeros(5)), "ids must be an integer tensor"),
    ("negative offsets", dict(segments=(torch.tensor([-1, 2, 5]), torch.tensor([0, 1]))), "offsets must be >= 0"),
    ("unsorted offsets", dict(segments=(torch.tensor([0, 4, 2, 5]), torch.tensor([0, 1, 2]))), "offsets must be sorted"),
    ("offsets short of T", dict(segments=(torch.tensor([0, 2, 4]), torch.tensor([0, 1]))), "offsets must be sorted"),
    ("seg_ids length", dict(segments=(torch.tensor([0, 2, 5]), torch.tensor([0]))), "seg_ids must be"),
    ("seg ids >= N", dict(segments=(torch.tensor([0, 2, 5]), torch.tensor([0, 9]))), r"ids must be in"),
    ("weights shape", dict(mixture=(torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 3))), "mixture weights must have"),
    ("weights nan", dict(mixture=(torch.zeros(5, 1, dtype=torch.long), torch.full((5, 1), float("nan")))), "NaN"),
    ("seg_w shape", dict(segment_mixture=(torch.tensor([0, 5]), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 1))),
     "seg_w must have"),
    ("two forms", dict(ids=torch.zeros(5, dtype=torch.long), segments=(torch.tensor([0, 5]), torch.tensor([0]))),
     "exactly one routing form"),
    ("no form", dict(), "exactly one routing form"),
]


@pytest.mark.parametrize("name,kw,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_routing(name, kw, msg):
    x, A, B, scale = _base_args()
    with pytest.raises(ValueError, match=msg):
        lora_apply(x, A, B, scale, **kw)


BAD_TENSORS = [
    ("A dtype", lambda x, A, B, s: (x, A.double(), B, s), "A must have dtype"),
    ("B shape", lambda x, A, B, s: (x, A, B[:, :, :1], s), "B must be"),
    ("A d_in", lambda x, A, B, s: (x, A[:, :, :4], B, s), "A must be"),
    ("scale shape", lambda x, A, B, s: (x, A, B, s[:2]), "scale must be"),
    ("int x", lambda x, A, B, s: (x.int(), A, B, s), "x has unsupported dtype"),
    ("rank > 128", lambda x, A, B, s: (x, torch.zeros(4, 129, 8), torch.zeros(4, 6, 129), s), "rank r"),
    ("device", lambda x, A, B, s: (x, A.to("meta"), B, s), "A is on meta"),
]


@pytest.mark.parametrize("name,mutate,msg", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensors(name, mutate, msg):
    with pytest.raises(ValueError, match=msg):
        lora_apply(*mutate(*_base_args()), ids=torch.zeros(5, dtype=torch.long))


def test_bad_base_out_and_shared_weights():
    x, A, B, scale = _base_args()
    with pytest.raises(ValueError, match="base_out must be"):
        lora_apply(x, A, B, scale, ids=torch.zeros(5, dtype=torch.long), base_out=torch.zeros(5, 7))
    with pytest.raises(ValueError, match="weights must be"):
        lora_shared_apply(x, A[0], B, 1.0, weights=torch.ones(5, 3))
    with pytest.raises(ValueError, match="mixture ids must be in"):
        lora_shared_apply(x, A[0], B, 1.0, mixture=(torch.full((5, 1), 4), torch.ones(5, 1)))


# ------------------------------------------------------------------------------------------------
# opcheck, torch.compile


def _canonical_cases():
    A, B, scale = weights(4, 3, 8, 6, torch.float32)
    x = torch.randn(5, 8)
    ids = torch.tensor([[0], [3], [-1], [2], [1]], dtype=torch.int32)
    mix_ids = torch.tensor([[0, 2], [3, -1], [1, 1], [-1, -1], [2, 0]], dtype=torch.int32)
    w = torch.rand(5, 2)
    off = torch.tensor([0, 2, 5], dtype=torch.int32)
    return x, A, B, scale.float(), [
        (ids, None, None, None),
        (mix_ids, w, None, torch.randn(5, 6)),
        (torch.tensor([[1], [3]], dtype=torch.int32), None, off, None),
        (mix_ids[:2], w[:2], off, torch.randn(5, 6)),
    ]


def test_opcheck():
    x, A, B, scale, cases = _canonical_cases()
    for ids, w, off, base in cases:
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        wt = None if w is None else w.clone().requires_grad_()
        torch.library.opcheck(torch.ops.mokernels.lora_apply.default, (*leaves, scale, ids, wt, off, base))
        out = torch.randn(5, 6)
        torch.library.opcheck(torch.ops.mokernels.lora_apply_.default, (out, x, A, B, scale, ids, w, off))
    Ash = torch.randn(3, 8, requires_grad=True)
    Bsh = torch.randn(4, 6, 3, requires_grad=True)
    wd = torch.rand(5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.mokernels.lora_shared_apply.default, (x, Ash, Bsh, 0.5, None, wd, None))
    torch.library.opcheck(torch.ops.mokernels.lora_shared_apply.default,
                          (x, Ash, Bsh, 0.5, cases[1][0], cases[1][1], torch.randn(5, 6)))


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    A, B, scale = weights(4, 3, 8, 6, torch.float32)
    A.requires_grad_()

    def f(x, A, ids, w):
        return torch.tanh(lora_apply(x, A, B, scale, mixture=(ids, w)))

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(5, 8)
    ids, w = random_mixture(5, 4, 2)
    w = w.float()
    torch.testing.assert_close(compiled(x, A, ids, w), f(x, A, ids, w))
    compiled(x, A, ids, w).sum().backward()
    assert A.grad is not None


@pytest.mark.slow
def test_peft_single_adapter_equals_peft_layer():
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model  # noqa: F401

    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    A = layer.lora_A["default"].weight.detach()[None]
    B = layer.lora_B["default"].weight.detach()[None]
    x = torch.randn(3, 16)
    y = lora_apply(x, A, B, layer.scaling["default"], ids=torch.zeros(3, dtype=torch.long),
                   base_out=layer.base_layer(x))
    torch.testing.assert_close(y, model(x).detach())
    del peft


# ------------------------------------------------------------------------------------------------
# The emulated decode kernel vs the reference


def _canonical(kw, lead):
    from mokernels.ops.lora import _routing

    return _routing(torch.Size(lead), 10**9, kw, torch.device("cpu"), torch.float32, False, "test")[1]


EMU_SHAPES = [  # (lead, N, r, d_in, d_out)
    ((3,), 4, 8, 64, 40),  # 16-byte vectors for 16-bit types
    ((1,), 3, 1, 7, 5),  # T=1, r=1, odd d: scalar path
    ((2, 3), 5, 4, 12, 136),  # 3-D input, d_out > one block of columns
    ((5,), 2, 16, 40, 9),
    ((1,), 3, 8, 32, 300),  # T=1: d_out split over 2 blocks (grid.y), each recomputes h
]


@pytest.mark.emu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,r,d_in,d_out", EMU_SHAPES)
def test_emulated_matches_reference(emu_ops, form, dtype, lead, N, r, d_in, d_out):
    A, B, scale = weights(N, r, d_in, d_out, dtype)
    T = int(torch.Size(lead).numel())
    x = torch.randn(T, d_in).to(dtype)
    base = torch.randn(T, d_out).to(dtype)
    kw, _ = make_form(form, lead, N, k=2, S=3)
    ids, w, off = _canonical(kw, lead)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = None if w is None else w.to(acc)
    s = scale.to(acc)
    want = lora_apply_reference(x, A, B, s, ids, w, off, base)
    got = emu_ops.lora_apply(x, A, B, s, ids, w, off, base)
    assert got.shape == (T, d_out) and got.dtype == dtype
    torch.testing.assert_close(got, want, **KERNEL_TOL[dtype])
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, w, off, None),
                               lora_apply_reference(x, A, B, s, ids, w, off, None), **KERNEL_TOL[dtype])
    out = base.clone()
    emu_ops.lora_apply_(out, x, A, B, s, ids, w, off)
    torch.testing.assert_close(out, want, **KERNEL_TOL[dtype])


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [1, 2, 4])
def test_emulated_misaligned_pointers(emu_ops, dtype, offset):
    """A and B shifted inside their storage: the kernel picks a narrower vector width (the emulator
    fails a misaligned vector access)."""
    A, B, scale = weights(3, 8, 32, 16, dtype, offset=offset)
    xx = torch.randn(4 * 32 + offset).to(dtype)[offset:].view(4, 32)
    ids = torch.tensor([[0], [2], [1], [-1]], dtype=torch.int32)
    want = lora_apply_reference(xx, A, B, scale.float(), ids)
    torch.testing.assert_close(emu_ops.lora_apply(xx, A, B, scale.float(), ids, None, None, None), want,
                               **KERNEL_TOL[dtype])


@pytest.mark.emu
def test_emulated_invalid_metadata_stays_in_bounds(emu_ops):
    """Unvalidated garbage (ids out of range, unsorted / out-of-range offsets): in bounds, and ids
    outside [0, N) contribute nothing (the ASan pass checks the reads)."""
    A, B, scale = weights(3, 4, 16, 8, torch.float32)
    x = torch.randn(6, 16)
    ids = torch.tensor([[0, 7], [-9, 2], [3, -1], [2**31 - 1, 1], [-(2**31), 0], [1, 1]], dtype=torch.int32)
    w = torch.rand(6, 2)
    s = scale.float()
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, w, None, None),
                               lora_apply_reference(x, A, B, s, ids, w, None, None), **KERNEL_TOL[torch.float32])
    for off in ([5, 2, 9, -4], [0, 100, 200, 300], [-7, -3, 0, 1]):
        o = torch.tensor(off, dtype=torch.int32)
        y = emu_ops.lora_apply(x, A, B, s, ids[:3], w[:3], o, None)
        assert torch.isfinite(y).all()


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compact", [False, True])
def test_emulated_shared(emu_ops, dtype, compact):
    N, r, d_in, d_out, T = 5, 8, 48, 20, 4
    x = torch.randn(T, d_in).to(dtype)
    A = (torch.randn(r, d_in) / d_in**0.5).to(dtype)
    B = (torch.randn(N, d_out, r) / r**0.5).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if compact:
        ids, w = random_mixture(T, N, 2)
        ids, w = ids.int(), w.to(acc)
    else:
        ids, w = None, torch.softmax(torch.randn(T, N), -1).to(acc)
    base = torch.randn(T, d_out).to(dtype)
    want = lora_shared_apply_reference(x, A, B, 0.7, ids, w, base)
    got = emu_ops.lora_shared_apply(x, A, B, 0.7, ids, w, base)
    torch.testing.assert_close(got, want, **KERNEL_TOL[dtype])


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_error_within_twice_torch_composition(emu_ops, dtype):
    """ARCHITECTURE rule: max error vs fp64 <= 2x the same-dtype torch composition's."""
    A, B, scale = weights(4, 16, 64, 48, dtype)
    x = torch.randn(6, 64).to(dtype)
    ids = torch.tensor([[0], [1], [2], [3], [0], [2]], dtype=torch.int32)
    exact = naive(x, A, B, scale, [[(int(i), 1.0)] for i in ids[:, 0]])
    got = emu_ops.lora_apply(x, A, B, scale.float(), ids, None, None, None)
    comp = torch.stack([(scale[i].item() * (B[i] @ (A[i] @ x[t]))) for t, i in enumerate(ids[:, 0].tolist())])
    assert (got.double() - exact).abs().max() <= 2 * (comp.double() - exact).abs().max()


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_x_row_too_large_for_shared_memory(emu_ops, dtype):
    """d_in beyond 48 KiB of staged x: the kernel reads x from global memory instead."""
    d_in = 48 * 1024 // dtype.itemsize + 8
    A, B, scale = weights(2, 2, d_in, 6, dtype)
    x = torch.randn(2, d_in).to(dtype)
    ids = torch.tensor([[1], [0]], dtype=torch.int32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, scale.to(acc), ids, None, None, None),
                               lora_apply_reference(x, A, B, scale.to(acc), ids), **KERNEL_TOL[dtype])


@pytest.mark.emu
def test_emulated_many_tokens_and_wide_k(emu_ops):
    """More tokens than the emulated GPU's SMs (one chunk per token) and k larger than the block."""
    A, B, scale = weights(200, 2, 8, 24, torch.float32)
    x = torch.randn(9, 8)
    ids, w = random_mixture(9, 200, 150)
    ids, w = ids.int(), w.float()
    s = scale.float()
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, w, None, None),
                               lora_apply_reference(x, A, B, s, ids, w, None, None), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The emulated tensor-core prefill kernel (segments, segment mixtures) vs the reference

PREFILL_CASES = [  # (segment lengths, r, d_in, d_out, k): lengths around the 16-row mma and 64-token tile
    ([1, 15, 16, 17], 8, 72, 40, 1),  # cp.async path; d_in not a multiple of the 32-wide K step
    ([64, 130], 16, 40, 70, 1),  # full, partial and multi-tile segments; d_out not a multiple of 32
    ([17, 3], 1, 36, 9, 1),  # r = 1 and d_in % 8 != 0: synchronous element loads
    ([70, 5, 16], 24, 64, 50, 2),  # segment mixture: 2 adapters concatenated along K (r16 = 32)
    ([20], 128, 32, 20, 1),  # r = 128: H is 128 wide
    ([33, 0, 9], 8, 16, 300, 4),  # an empty segment; d_out split over grid.y; k * r16 = 64
]


def _prefill_args(lens, r, d_in, d_out, k, dtype, N=3, none_segment=True):
    T, S, N = sum(lens), len(lens), max(N, k + 1)
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    A, B, scale = weights(N, r, d_in, d_out, dtype)
    x = torch.randn(T, d_in).to(dtype)
    ids = torch.stack([torch.randperm(N)[:k] for _ in range(S)]).int()
    if none_segment and S > 1:
        ids[1] = -1  # a segment without adapter
    w = torch.rand(S, k) if k > 1 else None
    base = torch.randn(T, d_out).to(dtype)
    return x, A, B, scale.float(), ids, w, off, base


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens,r,d_in,d_out,k", PREFILL_CASES)
def test_emulated_prefill_matches_reference(emu_ops, monkeypatch, dtype, lens, r, d_in, d_out, k):
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    x, A, B, s, ids, w, off, base = _prefill_args(lens, r, d_in, d_out, k, dtype)
    tol = {n: v * max(k, 1) for n, v in KERNEL_TOL[dtype].items()}
    want = lora_apply_reference(x, A, B, s, ids, w, off, base)
    got = emu_ops.lora_apply(x, A, B, s, ids, w, off, base)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, w, off, None),
                               lora_apply_reference(x, A, B, s, ids, w, off, None), **tol)
    out = base.clone()
    emu_ops.lora_apply_(out, x, A, B, s, ids, w, off)
    torch.testing.assert_close(out, want, **tol)
    # tokens of the segment without adapter get exactly the base
    if len(lens) > 1:
        torch.testing.assert_close(got[lens[0]:lens[0] + lens[1]], base[lens[0]:lens[0] + lens[1]], rtol=0, atol=0)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_prefill_misaligned_pointers_and_error_bound(emu_ops, monkeypatch, dtype):
    """Shifted A/B (no cp.async: element loads) still right; the error vs fp64 stays within 2x the
    same-dtype torch composition's (ARCHITECTURE rule), though H is rounded to the dtype for the expand."""
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    A, B, scale = weights(3, 16, 64, 48, dtype, offset=1)
    x = torch.randn(40, 64).to(dtype)
    off = torch.tensor([0, 23, 40], dtype=torch.int32)
    ids = torch.tensor([[2], [0]], dtype=torch.int32)
    got = emu_ops.lora_apply(x, A, B, scale.float(), ids, None, off, None)
    torch.testing.assert_close(got, lora_apply_reference(x, A, B, scale.float(), ids, None, off), **KERNEL_TOL[dtype])
    tok = [2] * 23 + [0] * 17
    exact = naive(x, A, B, scale, [[(i, 1.0)] for i in tok])
    comp = torch.stack([scale[i].item() * (B[i] @ (A[i] @ x[t])) for t, i in enumerate(tok)])
    assert (got.double() - exact).abs().max() <= 2 * (comp.double() - exact).abs().max()


@pytest.mark.emu
def test_emulated_prefill_gaps_and_invalid_metadata(emu_ops, monkeypatch):
    """Offsets that leave tokens uncovered give those tokens the base; garbage offsets and ids stay in
    bounds (the ASan pass checks the accesses) and finite."""
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    x, A, B, s, ids, w, _, base = _prefill_args([40, 30], 8, 32, 24, 1, torch.bfloat16, none_segment=False)
    off = torch.tensor([5, 20, 50], dtype=torch.int32)  # tokens 0-4 and 50-69 outside every segment
    want = lora_apply_reference(x, A, B, s, ids, None, off, base)
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, None, off, base), want, **KERNEL_TOL[torch.bfloat16])
    bad_ids = torch.tensor([[7], [-(2**31)]], dtype=torch.int32)
    for o in ([50, 2, 90], [-7, 100, 300], [0, -3, 70], [69, 70, 70]):
        y = emu_ops.lora_apply(x, A, B, s, ids, None, torch.tensor(o, dtype=torch.int32), base)
        assert torch.isfinite(y.float()).all()
        torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, bad_ids, None, torch.tensor(o, dtype=torch.int32), base),
                                   base, rtol=0, atol=0)


@pytest.mark.emu
@pytest.mark.parametrize("S", [40, 70])
def test_emulated_prefill_many_segments(emu_ops, monkeypatch, S):
    """More than 32 pieces (segments and the gaps between them): warp 0 finds each block's tile over
    several 32-piece steps; random lengths, empty segments among them."""
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    gen = torch.Generator().manual_seed(S)
    lens = torch.randint(0, 20, (S,), generator=gen)
    lens[S // 2] = 150  # one multi-tile segment in the middle
    x, A, B, s, ids, w, off, base = _prefill_args(lens.tolist(), 8, 16, 24, 1, torch.bfloat16, N=5)
    want = lora_apply_reference(x, A, B, s, ids, None, off, base)
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, s, ids, None, off, base), want, **KERNEL_TOL[torch.bfloat16])


@pytest.mark.emu
def test_emulated_path_switch(emu_ops, monkeypatch):
    """auto takes the prefill kernel when segments average >= 32 tokens (bitwise its result: it rounds
    H to bf16, the decode kernel keeps h in fp32), the decode kernel otherwise; a forced prefill path
    that cannot run is an error, not a silent fallback."""
    long_ = _prefill_args([64, 40], 16, 64, 32, 1, torch.bfloat16, none_segment=False)
    short = _prefill_args([5, 9, 2], 16, 64, 32, 1, torch.bfloat16, none_segment=False)
    res = {}
    for mode in ("decode", "prefill", "auto"):
        monkeypatch.setenv("MOKERNELS_LORA_PATH", mode)
        res[mode] = [emu_ops.lora_apply(*args) for args in (long_, short)]
    assert not torch.equal(res["decode"][0], res["prefill"][0])  # the two kernels are distinguishable
    assert torch.equal(res["auto"][0], res["prefill"][0])
    assert torch.equal(res["auto"][1], res["decode"][1])
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    x, A, B, s, ids, w, off, base = long_
    with pytest.raises(ValueError, match="fp16/bf16"):
        emu_ops.lora_apply(x.float(), A.float(), B.float(), s, ids, w, off, None)
    with pytest.raises(ValueError, match="needs segments"):
        emu_ops.lora_apply(x, A, B, s, ids.repeat(52, 1)[:104], None, None, None)
    with pytest.raises(ValueError, match="k \\* ceil16"):
        emu_ops.lora_apply(x, A, B, s, torch.zeros(2, 9, dtype=torch.int32), None, off, None)
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "fastest")
    with pytest.raises(ValueError, match="auto, decode or prefill"):
        emu_ops.lora_apply(x, A, B, s, ids, w, off, None)


KERNEL_BAD = [
    ("ids dtype", lambda a: {**a, "ids": a["ids"].long()}, "ids must have dtype"),
    ("ids rows", lambda a: {**a, "ids": a["ids"][:2]}, "ids must be"),
    ("scale dtype", lambda a: {**a, "scale": a["scale"].double()}, "scale must have dtype"),
    ("weights shape", lambda a: {**a, "weights": torch.ones(5, 2)}, "weights must be"),
    ("base shape", lambda a: {**a, "base": torch.ones(5, 5)}, "base_out must be"),
    ("B rank", lambda a: {**a, "B": a["B"][:, :, :1]}, "B must be"),
    ("offsets dtype", lambda a: {**a, "offsets": torch.tensor([0, 5]), "ids": a["ids"][:1]}, "offsets must have dtype"),
    # (a huge k is no longer refused here: only the shared-A kernel keeps per-slot state in shared memory,
    # see test_lora_slices.py::test_emulated_many_slots_not_limited_by_fused_kernel_smem)
]


@pytest.mark.emu
@pytest.mark.parametrize("name,mutate,msg", KERNEL_BAD, ids=[b[0] for b in KERNEL_BAD])
def test_emulated_wrapper_rejects_bad_inputs(emu_ops, name, mutate, msg):
    x, A, B, scale = _base_args()
    a = dict(x=x, A=A, B=B, scale=scale.float(), ids=torch.zeros(5, 1, dtype=torch.int32), weights=None,
             offsets=None, base=None)
    a = mutate(a)
    with pytest.raises(ValueError, match=msg):
        emu_ops.lora_apply(a["x"], a["A"], a["B"], a["scale"], a["ids"], a["weights"], a["offsets"], a["base"])


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


def _to_cuda(v):
    if v is None:
        return None
    if isinstance(v, Routing):
        return Routing(*(_to_cuda(t) for t in v))
    if isinstance(v, tuple):
        return tuple(_to_cuda(t) for t in v)
    return v.cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,r,d_in,d_out", EMU_SHAPES + [((32,), 26, 16, 4096, 4096), ((300,), 100, 64, 1000, 520)])
def test_cuda_matches_reference(form, dtype, lead, N, r, d_in, d_out):
    A, B, scale = weights(N, r, d_in, d_out, dtype)
    x = torch.randn(*lead, d_in).to(dtype)
    base = torch.randn(*lead, d_out).to(dtype)
    kw, _ = make_form(form, lead, N, k=2, S=3)
    want = lora_apply(x, A, B, scale, base_out=base, **kw)
    kwc = {n: _to_cuda(v) for n, v in kw.items()}
    got = lora_apply(x.cuda(), A.cuda(), B.cuda(), scale.cuda(), base_out=base.cuda(), **kwc)
    torch.testing.assert_close(got.cpu(), want, **KERNEL_TOL[dtype])


@pytest.mark.cuda
def test_cuda_no_host_sync_without_validation_and_graph_capture():
    A, B, scale = weights(8, 16, 256, 128, torch.bfloat16, device="cuda")
    scale = scale.cuda().float()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-1, 8, (32,), device="cuda", dtype=torch.int32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = lora_apply(x, A, B, scale, ids=ids, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y2 = lora_apply(x, A, B, scale, ids=ids)  # validation skipped under capture
    ids.copy_(torch.randint(-1, 8, (32,), device="cuda", dtype=torch.int32))
    g.replay()
    torch.testing.assert_close(y2, lora_apply(x, A, B, scale, ids=ids), **KERNEL_TOL[torch.bfloat16])
    assert y.shape == (32, 128)


@pytest.mark.cuda
def test_cuda_shared_and_gradients():
    N, r, d_in, d_out = 4, 8, 64, 32
    x = torch.randn(6, d_in, device="cuda", dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, device="cuda", dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, d_out, r, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, N, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: lora_shared_apply(*a[:3], 0.5, weights=a[3]), (x, A, B, w))
    ref = lora_shared_apply(x.detach().cpu(), A.detach().cpu(), B.detach().cpu(), 0.5, weights=w.detach().cpu())
    torch.testing.assert_close(lora_shared_apply(x, A, B, 0.5, weights=w).detach().cpu(), ref)


# ------------------------------------------------------------------------------------------------
# Property: any shape, form and routing — reference and emulated kernel agree with the naive loop

from hypothesis import given, strategies as st  # noqa: E402


@st.composite
def _cases(draw):
    T = draw(st.integers(0, 9))
    N = draw(st.integers(1, 6))
    r = draw(st.integers(1, 9))
    d_in = draw(st.integers(1, 40))
    d_out = draw(st.integers(1, 150))
    form = draw(st.sampled_from(FORMS))
    k = draw(st.integers(1, 3))
    S = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return T, N, r, d_in, d_out, form, k, S, seed


@pytest.mark.emu
@given(_cases())
def test_property_reference_and_kernel_match_naive(emu_ops, case):
    T, N, r, d_in, d_out, form, k, S, seed = case
    torch.manual_seed(seed)
    A, B, scale = weights(N, r, d_in, d_out, torch.float64)
    x = torch.randn(T, d_in, dtype=torch.float64)
    kw, routes = make_form(form, (T,), N, k=k, S=S)
    want = naive(x, A, B, scale, routes)
    torch.testing.assert_close(lora_apply(x, A, B, scale, **kw), want)
    ids, w, off = _canonical(kw, (T,))
    got = emu_ops.lora_apply(x, A, B, scale, ids, None if w is None else w.double(), off, None)
    torch.testing.assert_close(got, want)
