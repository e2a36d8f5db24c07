"""Fused router (METHODS.md §2): the reference spec, the emulated kernel (the real CUDA source run on
CPU by mokernels._emu) against it, edge cases, hypothesis properties, gradcheck and opcheck."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mokernels
from mokernels import emu
from mokernels.ops import router as R
from mokernels.ops.router import Routing, route, route_cosine, route_reference, route_segments

NINF = float("-inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
WTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _kmax(n, top_k=None, max_k=None):
    return R.kmax_for(n, top_k, max_k)


def _emu_route(z, *, temperature=1.0, top_k=None, top_p=None, max_k=None, renorm="sum", dense=False) -> Routing:
    """The emulated kernel on a [T, N] tensor, with route()'s option handling."""
    p = 1.0 if top_p is None else min(float(top_p), 1.0)
    ids, w, c, d = emu.ops().route_fwd(z, float(temperature), p, _kmax(z.shape[-1], top_k, max_k), renorm, dense)
    return Routing(ids, w, c, d if dense else None)


def _assert_same_routing(got: Routing, want: Routing, dtype):
    assert got.ids.dtype == torch.int32 and got.counts.dtype == torch.int32
    assert got.weights.dtype == want.weights.dtype
    torch.testing.assert_close(got.counts, want.counts, rtol=0, atol=0)
    torch.testing.assert_close(got.ids, want.ids, rtol=0, atol=0)
    tol = WTOL[dtype]
    torch.testing.assert_close(got.weights.double(), want.weights.double(), rtol=tol, atol=tol)
    if want.dense is not None:
        torch.testing.assert_close(got.dense.double(), want.dense.double(), rtol=tol, atol=tol)


def _top_p_margin(z, temperature, top_p) -> float:
    """Distance of top_p from the nearest cumulative mass of the sorted probabilities (rows of z):
    kernel and reference sum in different orders, so selections are only compared away from ties."""
    p = torch.softmax(z.double() / temperature, -1)
    cs = torch.sort(p, -1, descending=True).values.cumsum(-1)
    return float((cs - top_p).abs().min()) if z.numel() else 1.0


def _logits(T, N, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# The reference: hand-checked cases and every edge case of the issue


def test_reference_hand_example():
    z = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    r = route(z, top_p=0.7)
    assert r.ids.tolist() == [[0, 1, -1]] and r.counts.tolist() == [2]
    torch.testing.assert_close(r.weights, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0]]))
    r = route(z, top_p=0.7, renorm="none")
    torch.testing.assert_close(r.weights, torch.tensor([[0.5, 0.3, 0.0]]))
    r = route(z, top_p=0.7, renorm="softmax")
    e = torch.tensor([0.5, 0.3]).softmax(0)
    torch.testing.assert_close(r.weights, torch.tensor([[e[0], e[1], 0.0]]))
    r = route(z, top_k=1, dense=True)
    assert r.ids.tolist() == [[0]] and r.weights.tolist() == [[1.0]]
    assert r.dense.tolist() == [[1.0, 0.0, 0.0]]


def test_p_at_least_one_keeps_all():
    z = _logits(5, 7, torch.float32, 0)
    for p in (1.0, 1.5):
        r = route(z, top_p=p)
        assert (r.counts == 7).all() and (r.ids >= 0).all()
    # no cumulative sum: rounding cannot drop the last expert even when the tail mass underflows
    z = torch.tensor([[0.0, -200.0, -300.0]])
    assert route(z, top_p=1.0).counts.tolist() == [3]


def test_tiny_p_keeps_exactly_one():
    z = _logits(6, 9, torch.float32, 1)
    for p in (0.0, 1e-9):
        r = route(z, top_p=p)
        assert (r.counts == 1).all()
        assert (r.ids[:, 0].long() == z.argmax(-1)).all()
        torch.testing.assert_close(r.weights[:, 0], torch.ones(6))


def test_top_k_at_least_n_pads():
    z = _logits(3, 4, torch.float32, 2)
    r = route(z, top_k=6)
    assert r.ids.shape == (3, 6) and (r.counts == 4).all()
    assert (r.ids[:, 4:] == -1).all() and (r.weights[:, 4:] == 0).all()
    assert sorted(r.ids[0, :4].tolist()) == [0, 1, 2, 3]


def test_ties_at_boundary_lower_index_first():
    z = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert route(z, top_k=2).ids.tolist() == [[1, 2]]
    assert route(z, top_k=4).ids.tolist() == [[1, 2, 3, 0]]
    # top-p: each of the three tied experts has ~0.3; p = 0.5 needs two of them -> the lower two
    r = route(z, top_p=0.5)
    assert r.ids.tolist()[0][:2] == [1, 2] and r.counts.tolist() == [2]


def test_masked_experts_never_selected():
    z = torch.tensor([[NINF, 0.0, NINF, -1.0], [2.0, NINF, NINF, NINF]])
    r = route(z, top_k=3, dense=True)
    assert r.counts.tolist() == [2, 1]
    assert r.ids.tolist() == [[1, 3, -1], [0, -1, -1]]
    assert r.dense[0, [0, 2]].eq(0).all() and r.dense[1].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["nan", "allninf", "pinf"])
def test_invalid_row_raises_and_fallback(bad):
    z = _logits(4, 5, torch.float32, 3)
    z[2] = {"nan": z[2].masked_fill(torch.arange(5) == 1, float("nan")), "allninf": torch.full((5,), NINF),
            "pinf": z[2].masked_fill(torch.arange(5) == 4, float("inf"))}[bad]
    with pytest.raises(ValueError, match="row 2"):
        route(z, top_p=0.9)
    r = route(z, top_p=0.9, dense=True, validate=False)
    assert r.counts[2] == 0 and (r.ids[2] == -1).all() and (r.weights[2] == 0).all() and (r.dense[2] == 0).all()
    assert torch.isfinite(r.weights).all() and (r.counts[[0, 1, 3]] >= 1).all()


def test_n_equals_one_and_t_zero():
    r = route(torch.randn(5, 1), top_p=0.3, dense=True)
    assert r.ids.tolist() == [[0]] * 5 and (r.weights == 1).all() and (r.dense == 1).all()
    r = route(torch.empty(0, 6), top_k=2, dense=True)
    assert r.ids.shape == (0, 2) and r.weights.shape == (0, 2) and r.counts.shape == (0,) and r.dense.shape == (0, 6)


def test_fp16_near_overflow():
    z = torch.tensor([[65504.0, 65000.0, -65504.0, 65504.0], [60000.0, 60001.0, 59999.0, 0.0]], dtype=torch.float16)
    r = route(z, top_p=0.9, temperature=0.5, dense=True)
    assert torch.isfinite(r.weights).all() and r.weights.dtype == torch.float16
    assert r.ids[0].tolist()[:2] == [0, 3] and r.counts[0] == 2  # the two equal maxima, lower index first
    torch.testing.assert_close(r.weights.float().sum(-1), torch.ones(2), atol=1e-3, rtol=0)


def test_nd_logits_and_option_errors():
    z = torch.randn(2, 3, 8)
    r = route(z, top_k=2, dense=True)
    assert r.ids.shape == (2, 3, 2) and r.counts.shape == (2, 3) and r.dense.shape == (2, 3, 8)
    with pytest.raises(ValueError, match="top_k or max_k"):
        route(z, top_k=2, max_k=3)
    with pytest.raises(ValueError, match="temperature"):
        route(z, temperature=0.0)
    with pytest.raises(ValueError, match="renorm"):
        route(z, renorm="l1")
    with pytest.raises(ValueError, match="top_k"):
        route(z, top_k=0)
    with pytest.raises(ValueError, match="dtype"):
        route(torch.zeros(2, 3, dtype=torch.int32))


def test_max_k_caps_top_p():
    z = torch.zeros(1, 10)  # uniform: top-p 0.95 needs 10 experts
    r = route(z, top_p=0.95, max_k=3)
    assert r.ids.shape == (1, 3) and r.counts.tolist() == [3]
    assert route(z, top_p=0.95).counts.tolist() == [10]


# ------------------------------------------------------------------------------------------------
# Hypothesis properties (reference; the emulated kernel below shares them)


def _check_properties(z, r: Routing, temperature, top_p, kmax, renorm, sum_tol=1e-5):
    p = torch.softmax(z.double() / temperature, -1)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    for t in range(z.shape[0]):
        c = int(r.counts[t])
        assert 1 <= c <= kmax
        assert r.ids[t, :c].tolist() == order[t, :c].tolist()  # a prefix of the sorted order
        assert (r.ids[t, c:] == -1).all() and (r.weights[t, c:] == 0).all()
        mass = float(p[t, order[t, :c]].sum())
        if top_p is not None and c < kmax and c < z.shape[1]:
            assert mass >= min(top_p, 1.0) - 1e-5  # reaches p unless the cap stopped it
            if c > 1:  # and is the shortest such prefix
                assert float(p[t, order[t, : c - 1]].sum()) < min(top_p, 1.0) + 1e-5
        if renorm in ("sum", "softmax"):
            assert abs(float(r.weights[t].double().sum()) - 1.0) <= c * sum_tol  # each weight rounded once


options = st.fixed_dictionaries(
    {
        "T": st.integers(1, 6),
        "N": st.integers(1, 40),
        "temperature": st.sampled_from([1.0, 0.5, 2.0]),
        "top_p": st.one_of(st.none(), st.floats(0.0, 1.2)),
        "cap": st.one_of(st.none(), st.integers(1, 8)),
        "cap_is_top_k": st.booleans(),
        "renorm": st.sampled_from(R.RENORMS),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _opts(o):
    kw = dict(temperature=o["temperature"], top_p=o["top_p"], renorm=o["renorm"])
    if o["cap"] is not None:
        kw["top_k" if o["cap_is_top_k"] else "max_k"] = o["cap"]
    return kw


@FAST
@given(options)
def test_reference_properties(o):
    z = _logits(o["T"], o["N"], torch.float32, o["seed"])
    kw = _opts(o)
    if kw["top_p"] is not None:
        assume(_top_p_margin(z, kw["temperature"], kw["top_p"]) > 1e-5)
    r = route(z, **kw)
    _check_properties(z, r, kw["temperature"], kw["top_p"], _kmax(o["N"], kw.get("top_k"), kw.get("max_k")), kw["renorm"])


# ------------------------------------------------------------------------------------------------
# Gradients: the backward op vs autograd of the reference, gradcheck, opcheck


def _ref_grad(z, gw, gd, kw):
    z = z.detach().clone().requires_grad_(True)
    r = route_reference(z, dense=gd is not None, **kw)
    loss = (r.weights * gw).sum() + ((r.dense * gd).sum() if gd is not None else 0)
    (g,) = torch.autograd.grad(loss, z)
    return g


@pytest.mark.parametrize("renorm", R.RENORMS)
@pytest.mark.parametrize("with_dense", [False, True])
def test_backward_reference_matches_autograd(renorm, with_dense):
    z = _logits(6, 9, torch.float64, 4)
    z[1, 3] = NINF
    kw = dict(temperature=0.7, top_p=0.8, max_k=4, renorm=renorm)
    r = route_reference(z, dense=with_dense, **kw)
    gw = torch.randn_like(r.weights)
    gd = torch.randn_like(z) if with_dense else None
    got = R.route_bwd_reference(gw, gd, z, r.ids, 0.7, renorm)
    torch.testing.assert_close(got, _ref_grad(z, gw, gd, kw))


@pytest.mark.parametrize("renorm", R.RENORMS)
def test_gradcheck_route(renorm):
    z = _logits(4, 6, torch.float64, 5).requires_grad_(True)
    for kw in (dict(top_p=0.7), dict(top_k=3), dict()):
        f = lambda x: tuple(t for t in route(x, renorm=renorm, dense=True, temperature=1.3, **kw) if t.is_floating_point())  # noqa: E731
        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_compiles_without_graph_breaks():
    def f(z):
        r = route(z, top_p=0.7, max_k=3, dense=True)
        return r.weights.sum() + r.dense.square().sum()

    z = _logits(6, 9, torch.float32, 15).requires_grad_(True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # no host sync, no graph break
    (g1,) = torch.autograd.grad(compiled(z), z)
    (g2,) = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(g1, g2)

    def g(zs, offsets, h, k):  # per-sentence routing and the cosine router, same requirement
        r = route_segments(zs, offsets, 7, top_k=2)
        c = route_cosine(h, k, temperature=0.8, top_p=0.6)
        return r.weights.sum() + c.weights.sum()

    h, k = _codes(5, 4, 8, torch.float32, 16)
    args = (_logits(3, 5, torch.float32, 17), torch.tensor([0, 2, 2, 7]), h.requires_grad_(True), k)
    torch.testing.assert_close(torch.compile(g, backend="aot_eager", fullgraph=True)(*args), g(*args))


def test_opcheck():
    z = _logits(5, 7, torch.float32, 6)
    for args in ((z, 1.0, 0.8, 3, "sum", True), (z, 0.5, 1.0, 7, "softmax", False), (z, 2.0, 0.3, 9, "none", True)):
        torch.library.opcheck(torch.ops.mokernels.route_fwd, args)
    ids = route(z, top_k=3).ids
    gw = torch.randn(5, 3)
    for gd in (None, torch.randn(5, 7)):
        torch.library.opcheck(torch.ops.mokernels.route_bwd, (gw, gd, z, ids, 1.0, "softmax"))


# ------------------------------------------------------------------------------------------------
# Cosine router and per-sentence helper


def _codes(T, N, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, r, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(N, r, generator=g, dtype=torch.float64).to(dtype))


def test_route_cosine_matches_definition_and_grads():
    h, k = _codes(5, 4, 8, torch.float64, 7)
    h[3] = 0.0  # zero code: the eps clamp keeps cos = 0 (uniform routing), not NaN
    r = route_cosine(h, k, temperature=0.8, top_k=2)
    cos = torch.nn.functional.cosine_similarity(h[:, None, :], k[None], dim=-1, eps=1e-8)
    _assert_same_routing(r, route_reference(cos, temperature=0.8, top_k=2), torch.float64)
    h, k = _codes(5, 4, 8, torch.float64, 7)  # gradcheck away from the zero code (not differentiable there)
    h.requires_grad_(True)
    k.requires_grad_(True)
    for renorm in R.RENORMS:
        f = lambda a, b: tuple(t for t in route_cosine(a, b, temperature=0.8, top_p=0.7, renorm=renorm, dense=True)  # noqa: E731
                               if t.is_floating_point())
        assert torch.autograd.gradcheck(f, (h, k))
    with pytest.raises(ValueError, match="h row 1"):
        route_cosine(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), torch.eye(2))
    with pytest.raises(ValueError, match="keys"):
        route_cosine(torch.zeros(2, 3), torch.zeros(4, 2))


def test_opcheck_cosine():
    h, k = _codes(6, 5, 4, torch.float32, 12)
    for args in ((h, k, 0.8, 1e-8, 0.7, 3, "sum", True), (h, k, 1.0, 1e-8, 1.0, 5, "softmax", False)):
        torch.library.opcheck(torch.ops.mokernels.route_cosine_fwd, args)


def test_route_segments_broadcasts_without_sync():
    z = _logits(3, 5, torch.float32, 8)
    offsets = torch.tensor([0, 2, 2, 7])  # an empty sentence in the middle
    r = route_segments(z, offsets, 7, top_k=2)
    s = route(z, top_k=2)
    seg = [0, 0, 2, 2, 2, 2, 2]
    assert r.ids.tolist() == s.ids[seg].tolist() and torch.equal(r.weights, s.weights[seg])
    with pytest.raises(ValueError, match="offsets"):
        route_segments(z, torch.tensor([0, 3, 2, 7]), 7, top_k=2)


# ------------------------------------------------------------------------------------------------
# The emulated kernel (the CUDA source compiled as host C++) against the reference


EMU_CASES = [  # (T, N, options)
    (7, 1, dict(top_p=0.5)),
    (9, 3, dict(top_k=2)),
    (33, 8, dict(top_p=0.6)),
    (20, 8, dict(top_k=2, renorm="softmax")),
    (17, 26, dict(top_p=0.9, temperature=0.8, renorm="softmax")),
    (12, 26, dict()),
    (10, 31, dict(top_p=0.7, max_k=4, renorm="none")),
    (9, 64, dict(top_k=8)),
    (6, 64, dict(top_p=0.95, temperature=2.0)),
    (5, 100, dict(top_p=0.5, top_k=3)),
    (4, 256, dict(top_p=0.3)),
    (3, 200, dict(top_k=300)),
]


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,kw", EMU_CASES, ids=[f"T{t}-N{n}-{'-'.join(map(str, k.values())) or 'all'}" for t, n, k in EMU_CASES])
def test_emu_forward_matches_reference(T, N, kw, dtype):
    z = _logits(T, N, dtype, seed=T * 1000 + N)
    if kw.get("top_p") is not None:
        assert _top_p_margin(z.float(), kw.get("temperature", 1.0), kw["top_p"]) > 1e-5  # seed chosen so
    _assert_same_routing(_emu_route(z, dense=True, **kw), route_reference(z, dense=True, **kw), dtype)


@pytest.mark.emu
@pytest.mark.parametrize("kw", [dict(top_p=0.98), dict(top_k=5), dict(top_p=1.0, renorm="softmax")], ids=str)
def test_emu_large_n(kw):
    z = _logits(2, 1024, torch.float32, 9, scale=1.0)
    z[1, ::3] = NINF
    _assert_same_routing(_emu_route(z, dense=True, **kw), route_reference(z, dense=True, **kw), torch.float32)


EDGE_OPTIONS = (dict(top_k=2), dict(top_p=0.5), dict(top_p=0.0), dict(top_p=1.0), dict(top_k=9),
                dict(top_p=0.99, max_k=2, renorm="softmax"), dict(temperature=0.5, top_p=0.9, renorm="none"))


def _edge_logits(dtype):
    z = _logits(12, 6, torch.float32, 10)
    z[0] = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])  # ties at the boundary
    z[1] = torch.tensor([NINF, 0.0, NINF, -1.0, NINF, NINF])  # masked experts
    z[2] = NINF  # all masked: invalid -> fallback
    z[3, 4] = float("nan")  # NaN: invalid -> fallback
    z[4, 1] = float("inf")  # +inf: invalid -> fallback
    z[5] = torch.tensor([65504.0, 65000.0, -65504.0, 65504.0, 0.0, 1.0])  # fp16 range
    z[6] = 0.0  # uniform
    return z.to(dtype)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emu_edge_cases(dtype):
    z = _edge_logits(dtype)
    for kw in EDGE_OPTIONS:
        got, want = _emu_route(z, dense=True, **kw), route_reference(z, dense=True, **kw)
        _assert_same_routing(got, want, dtype)
        assert (got.counts[2:5] == 0).all() and (got.ids[2:5] == -1).all() and (got.dense[2:5] == 0).all()
        assert torch.isfinite(got.weights).all() and torch.isfinite(got.dense).all()
    assert _emu_route(z, top_k=2).ids[0].tolist() == [1, 2]
    assert _emu_route(z, top_p=0.0).counts[:2].tolist() == [1, 1]


@pytest.mark.emu
def test_emu_selection_paths():
    """The kernels (register top-K and shared-memory sort, chosen per call from N and kmax) agree with
    the reference on every emulated case, the edge rows and the cosine router."""
    for T, N, kw in EMU_CASES[:-2]:
        z = _logits(T, N, torch.float32, seed=T * 1000 + N)
        _assert_same_routing(_emu_route(z, dense=True, **kw), route_reference(z, dense=True, **kw), torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        z = _edge_logits(dtype)
        for kw in EDGE_OPTIONS:
            _assert_same_routing(_emu_route(z, dense=True, **kw), route_reference(z, dense=True, **kw), dtype)
    h, k = _codes(20, 8, 16, torch.float32, seed=8)
    args = (h, k, 0.8, 1e-8, 0.6, 8, "softmax", True)
    _assert_same_routing(Routing(*emu.ops().route_cosine_fwd(*args)), Routing(*R.route_cosine_fwd_reference(*args)),
                         torch.float32)


@pytest.mark.emu
@pytest.mark.parametrize("N,top_p,kept", [(25, 0.24, 6), (12, 2 / 3, 8), (10, 0.3, 3), (40, 0.1, 4)])
def test_emu_top_p_exact_boundary(N, top_p, kept):
    """Uniform rows whose prefix mass lands exactly on top_p (k/N): the shortest prefix with mass >= p
    has k experts (summing rounded probabilities kept k + 1)."""
    z = torch.zeros(3, N)
    got = _emu_route(z, top_p=top_p)
    assert got.counts.tolist() == [kept] * 3
    assert route_reference(z, top_p=top_p).counts.tolist() == [kept] * 3


@pytest.mark.emu
def test_emu_top_p_just_below_one_is_not_keep_all():
    """1 - 1e-9 rounds to 1.0f; the kernel must still treat it as a mass threshold (< 1), not keep-all."""
    z = torch.tensor([[0.0, -20.0, -30.0]])
    got = _emu_route(z, top_p=1 - 1e-9)
    want = route_reference(z, top_p=1 - 1e-9)
    assert got.counts.tolist() == want.counts.tolist() == [1]


def test_cosine_overflowing_norms_are_rejected():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]]) * 1e20  # finite, but |h|² overflows fp32
    keys = torch.randn(3, 4)
    with pytest.raises(ValueError, match="squared norm"):
        route_cosine(h, keys, top_k=1)
    with pytest.raises(ValueError, match="squared norm"):
        route_cosine(torch.randn(1, 4), keys * 1e20, top_k=1)


def test_temperature_below_fp32_range_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        route(torch.randn(2, 4), temperature=1e-40, top_k=1)


@pytest.mark.emu
def test_emu_noncontiguous_and_out_of_range_ids():
    z = _logits(10, 6, torch.float32, 13).T  # [6, 10] non-contiguous view
    _assert_same_routing(_emu_route(z, top_p=0.7, dense=True), route_reference(z, top_p=0.7, dense=True), torch.float32)
    # backward with ids the forward never makes (>= N, < -1): "no expert", never an out-of-bounds read
    ids = torch.tensor([[3, 10, -1], [-7, 0, 1000]] * 3, dtype=torch.int32)
    zz = _logits(6, 10, torch.float32, 14)
    gw = torch.randn(6, 3)
    got = emu.ops().route_bwd(gw, None, zz, ids, 1.0, "sum")
    torch.testing.assert_close(got, R.route_bwd_reference(gw, None, zz, ids, 1.0, "sum"))


@pytest.mark.emu
def test_emu_t_zero_and_bad_args():
    r = _emu_route(torch.empty(0, 5), top_k=2, dense=True)
    assert r.ids.shape == (0, 2) and r.dense.shape == (0, 5)
    with pytest.raises(ValueError, match="renorm"):
        emu.ops().route_fwd(torch.zeros(2, 3), 1.0, 1.0, 3, "l2", False)
    with pytest.raises(ValueError, match="N <= 4096"):
        emu.ops().route_fwd(torch.zeros(1, 4097), 1.0, 1.0, 3, "sum", False)
    with pytest.raises(ValueError, match="ids"):
        emu.ops().route_bwd(torch.zeros(2, 3), None, torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.int64), 1.0, "sum")


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renorm", R.RENORMS)
@pytest.mark.parametrize("T,N,kw", [(9, 5, dict(top_p=0.7)), (6, 40, dict(top_k=4, temperature=0.6)), (3, 300, dict(top_p=0.9, max_k=6))],
                         ids=["N5", "N40", "N300"])
def test_emu_backward_matches_reference(T, N, kw, renorm, dtype):
    z = _logits(T, N, dtype, seed=N + 11)
    z[0, 1] = NINF
    if T > 2:
        z[2] = NINF  # invalid row: zero gradient
    r = route_reference(z, renorm=renorm, dense=True, **kw)
    g = torch.Generator().manual_seed(N)
    gw = torch.randn(r.weights.shape, generator=g, dtype=torch.float64).to(dtype)
    gd = torch.randn(z.shape, generator=g, dtype=torch.float64).to(dtype)
    temperature = kw.get("temperature", 1.0)
    for dense_grad in (None, gd):
        got = emu.ops().route_bwd(gw, dense_grad, z, r.ids, temperature, renorm)
        want = R.route_bwd_reference(gw, dense_grad, z, r.ids, temperature, renorm)
        tol = GTOL[dtype]
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
        if T > 2:
            assert (got[2] == 0).all()
    if dtype == torch.float64:  # and against autograd of the reference itself
        got = emu.ops().route_bwd(gw, gd, z, r.ids, temperature, renorm)
        torch.testing.assert_close(got, _ref_grad(z, gw, gd, dict(renorm=renorm, **kw)))


@pytest.mark.emu
@FAST
@given(options, st.sampled_from([torch.float32, torch.bfloat16]))
def test_emu_properties(o, dtype):
    z = _logits(o["T"], o["N"], dtype, o["seed"])
    kw = _opts(o)
    if kw["top_p"] is not None:
        assume(_top_p_margin(z.float(), kw["temperature"], kw["top_p"]) > 1e-5)
    got = _emu_route(z, dense=True, **kw)
    _check_properties(z.float(), got, kw["temperature"], kw["top_p"], _kmax(o["N"], kw.get("top_k"), kw.get("max_k")),
                      kw["renorm"], sum_tol=WTOL[dtype])
    _assert_same_routing(got, route_reference(z, dense=True, **kw), dtype)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,r,kw", [(9, 3, 8, dict(top_k=2)), (20, 8, 16, dict(top_p=0.6, temperature=0.8)),
                                      (5, 70, 32, dict(top_p=0.5, max_k=5, temperature=0.2, renorm="softmax"))],
                         ids=["N3", "N8", "N70"])
def test_emu_cosine_matches_reference(T, N, r, kw, dtype):
    h, k = _codes(T, N, r, dtype, seed=N)
    h[0] = 0.0  # zero code: cos = 0 for every expert (eps clamp), ties -> lowest indices
    temperature = kw.get("temperature", 1.0)
    top_p = 1.0 if kw.get("top_p") is None else kw["top_p"]
    kmax = _kmax(N, kw.get("top_k"), kw.get("max_k"))
    if top_p < 1.0:
        z = R.cosine_logits_reference(h, k)
        assert _top_p_margin(z[1:], temperature, top_p) > 1e-5  # row 0 is uniform: capped by kmax
    args = (h, k, temperature, 1e-8, top_p, kmax, kw.get("renorm", "sum"), True)
    got = Routing(*emu.ops().route_cosine_fwd(*args))
    want = Routing(*R.route_cosine_fwd_reference(*args))
    _assert_same_routing(got, want, dtype)
    assert got.ids[0, 0] == 0


@pytest.mark.emu
@FAST
@given(options, st.booleans())
def test_emu_backward_properties(o, with_dense):
    """The emulated backward equals autograd of the reference (fp64), for any options."""
    z = _logits(o["T"], o["N"], torch.float64, o["seed"])
    kw = _opts(o)
    r = route_reference(z, dense=True, **kw)
    g = torch.Generator().manual_seed(o["seed"] + 1)
    gw = torch.randn(r.weights.shape, generator=g, dtype=torch.float64)
    gd = torch.randn(z.shape, generator=g, dtype=torch.float64) if with_dense else None
    got = emu.ops().route_bwd(gw, gd, z, r.ids, kw["temperature"], kw["renorm"])
    torch.testing.assert_close(got, _ref_grad(z, gw, gd, kw))


@pytest.mark.emu
@FAST
@given(st.integers(1, 5), st.integers(1, 70), st.integers(1, 9), st.sampled_from(R.RENORMS), st.integers(0, 2**31 - 1))
def test_emu_backward_arbitrary_ids(T, N, kmax, renorm, seed):
    """route_bwd with any ids (duplicates, out of range, -1 anywhere) equals the reference and never
    reads out of bounds (the ASan run checks the latter)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, N, generator=g)
    ids = torch.randint(-3, N + 3, (T, kmax), generator=g, dtype=torch.int32)
    gw, gd = torch.randn(T, kmax, generator=g), torch.randn(T, N, generator=g)
    got = emu.ops().route_bwd(gw, gd, z, ids, 0.9, renorm)
    torch.testing.assert_close(got, R.route_bwd_reference(gw, gd, z, ids, 0.9, renorm), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# On a GPU: the CUDA kernel against the reference


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 8, 26, 64, 256, 1000])
def test_cuda_matches_reference(N, dtype):
    z = _logits(4099, N, dtype, seed=N).cuda()
    for kw in (dict(top_p=0.6), dict(top_k=2, renorm="softmax"), dict(top_p=0.9, max_k=8, renorm="none"), dict()):
        got = route(z, dense=True, **kw)
        want = route_reference(z.cpu(), dense=True, **kw)
        same_ids = (got.ids.cpu() == want.ids).all(-1)
        if "top_p" in kw:  # rows whose prefix mass is within rounding of top_p may cut one expert apart
            cs = torch.sort(torch.softmax(z.cpu().double(), -1), -1, descending=True).values.cumsum(-1)
            near = (cs - kw["top_p"]).abs().min(-1).values < 1e-5
            assert (same_ids | near).all()
        else:  # top-k and keep-all involve no mass: ids and counts must match exactly
            assert same_ids.all()
        assert torch.equal(got.counts.cpu()[same_ids], want.counts[same_ids])
        keep = same_ids
        tol = WTOL[dtype]
        torch.testing.assert_close(got.weights.cpu()[keep].double(), want.weights[keep].double(), rtol=tol, atol=tol)
        zz = z.detach().clone().requires_grad_(True)
        out = route(zz, dense=True, **kw)
        gw = torch.randn_like(out.weights)
        (gz,) = torch.autograd.grad((out.weights * gw).sum(), zz)
        want_g = R.route_bwd_reference(gw.cpu(), None, z.cpu(), out.ids.cpu(), 1.0, kw.get("renorm", "sum"))
        torch.testing.assert_close(gz.cpu().double(), want_g.double(), rtol=GTOL[dtype], atol=GTOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_cosine_matches_reference(dtype):
    h, k = _codes(4099, 26, 16, dtype, seed=3)
    h, k = h.cuda().requires_grad_(True), k.cuda().requires_grad_(True)
    got = route_cosine(h, k, temperature=0.8, top_p=0.6, dense=True)
    want = Routing(*R.route_cosine_fwd_reference(h.detach().cpu(), k.detach().cpu(), 0.8, 1e-8, 0.6, 26, "sum", True))
    assert (got.ids.cpu() == want.ids).all(-1).float().mean() > 0.999
    gw = torch.randn_like(got.weights)
    hc, kc = h.detach().cpu().double().requires_grad_(True), k.detach().cpu().double().requires_grad_(True)
    ref = route_reference(R.cosine_logits_reference(hc, kc), temperature=0.8, top_p=0.6)
    keep = (ref.ids == got.ids.cpu()).all(-1)
    assert keep.float().mean() > 0.999
    rh, rk = torch.autograd.grad((ref.weights * gw.cpu().double() * keep[:, None]).sum(), (hc, kc))
    (dh2, dk2) = torch.autograd.grad((got.weights * gw * keep.cuda()[:, None]).sum(), (h, k))
    torch.testing.assert_close(dh2.cpu().double(), rh, rtol=GTOL[dtype], atol=GTOL[dtype])
    torch.testing.assert_close(dk2.cpu().double(), rk, rtol=GTOL[dtype] * 10, atol=GTOL[dtype] * 10)


# ------------------------------------------------------------------------------------------------
# Issue 9: regression tests, one block per defect (each failed on the code before the fix)


def _same_selection_weights(x, ids, temperature=1.0, renorm="sum"):
    """The differentiable composition with the selection ``ids`` held fixed: the oracle for every AD mode."""
    p = torch.softmax(x / temperature, -1)
    keep = ids >= 0
    ps = torch.where(keep, p.gather(-1, ids.clamp(min=0).long()), 0.0)
    if renorm == "sum":
        return ps / ps.sum(-1, keepdim=True)
    if renorm == "softmax":
        e = torch.where(keep, torch.exp(ps - ps[..., :1]), 0.0)
        return e / e.sum(-1, keepdim=True)
    return ps


@pytest.mark.parametrize("renorm", R.RENORMS)
def test_issue9_double_backward_route(renorm):
    """Defect 1: double backward through route was silently zero."""
    x = _logits(4, 6, torch.float64, 40).requires_grad_(True)
    v = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for kw in (dict(top_k=3), dict(top_p=0.7)):
        ids = route(x.detach(), renorm=renorm, temperature=1.3, **kw).ids
        got_fn = lambda t: route(t, renorm=renorm, temperature=1.3, **kw).weights  # noqa: E731
        (gx,) = torch.autograd.grad((got_fn(x) ** 2).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), x)
        ref = lambda t: _same_selection_weights(t, ids, 1.3, renorm)  # noqa: E731
        (gr,) = torch.autograd.grad((ref(x) ** 2).sum(), x, create_graph=True)
        (hr,) = torch.autograd.grad((gr * v).sum(), x)
        assert hr.abs().max() > 1e-3  # not a vacuous comparison
        torch.testing.assert_close(hv, hr)
        torch.autograd.gradgradcheck(got_fn, (x,))


def test_issue9_double_backward_op_and_cosine():
    """Defect 1: the op path (register_autograd) and route_cosine support double backward; the
    backward op itself is not differentiable and says so."""
    x = _logits(3, 5, torch.float64, 41).requires_grad_(True)
    f = lambda t: torch.ops.mokernels.route_fwd(t, 0.9, 0.8, 3, "softmax", True)[1]  # noqa: E731
    torch.autograd.gradgradcheck(f, (x,))
    h, k = _codes(4, 5, 3, torch.float64, 42)
    h.requires_grad_(True)
    k.requires_grad_(True)
    torch.autograd.gradgradcheck(lambda a, b: route_cosine(a, b, top_k=2, temperature=0.7).weights, (h, k))
    ids = route(x.detach(), top_k=2).ids
    gw = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    dz = torch.ops.mokernels.route_bwd(gw, None, x, ids, 1.0, "sum")
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.autograd.grad(dz.sum(), gw)


def _fd_jvp(f, x, v, h=1e-6):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize("renorm", R.RENORMS)
def test_issue9_forward_mode_route(renorm):
    """Defect 2: forward-mode AD gave zero tangents. Both the CPU path and the kernel's autograd.Function."""
    x = _logits(5, 7, torch.float64, 43)
    v = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for kw in (dict(top_k=3, dense=True), dict(top_p=0.6, dense=True)):
        f = lambda t: route(t, renorm=renorm, temperature=0.8, **kw).weights  # noqa: E731
        want = _fd_jvp(f, x, v)
        assert want.abs().max() > 1e-3
        _, got = torch.func.jvp(f, (x,), (v,))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
        fd = lambda t: route(t, renorm=renorm, temperature=0.8, **kw).dense  # noqa: E731
        torch.testing.assert_close(torch.func.jvp(fd, (x,), (v,))[1], _fd_jvp(fd, x, v), rtol=1e-6, atol=1e-8)
        # the autograd.Function used on CUDA (the op + route_jvp_reference), here on CPU
        p = kw.get("top_p", 1.0)
        kmax = kw.get("top_k", 7)
        fn = lambda t: R._RouteFn.apply(t, 0.8, p, kmax, renorm, True)  # noqa: E731
        _, (_, tw, _, td) = torch.func.jvp(fn, (x,), (v,))
        torch.testing.assert_close(tw, want, rtol=1e-6, atol=1e-8)
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(x, v))
            torch.testing.assert_close(fwAD.unpack_dual(out[3]).tangent, td)
    h, k = _codes(3, 4, 5, torch.float64, 44)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda a: route_cosine(a, k, top_k=2).weights, (h,), (torch.ones_like(h),))


def test_issue9_mixed_devices_raise():
    """Defect 3: meta mixed with CPU returned uninitialised memory."""
    with pytest.raises(ValueError, match="keys is on meta"):
        route_cosine(torch.randn(3, 4), torch.randn(5, 4, device="meta"), top_k=2, validate=False)
    with pytest.raises(ValueError, match="h is on meta"):
        route_cosine(torch.randn(3, 4, device="meta"), torch.randn(5, 4), top_k=2)
    with pytest.raises(ValueError, match="on meta"):
        torch.ops.mokernels.route_cosine_fwd(torch.randn(3, 4), torch.randn(5, 4, device="meta"), 1.0, 1e-8, 1.0, 2,
                                             "sum", False)
    z = torch.randn(3, 5)
    ids = route(z, top_k=2).ids
    with pytest.raises(ValueError, match="on meta"):
        torch.ops.mokernels.route_bwd(torch.randn(3, 2, device="meta"), None, z, ids, 1.0, "sum")
    with pytest.raises(ValueError, match="on meta"):
        torch.ops.mokernels.route_bwd(torch.randn(3, 2), None, z, ids.to("meta"), 1.0, "sum")
    with pytest.raises(ValueError, match="on meta"):
        route_segments(z, torch.tensor([0, 1, 2, 4], device="meta"), 4, top_k=2)


def test_issue9_topk_orders_by_logit_when_p_underflows():
    """Defect 4: ties among underflowed p were broken by index, not by logit (rule 2)."""
    z = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    for dtype in DTYPES:
        r = route(z.to(dtype), top_k=2, temperature=0.005, renorm="softmax")
        assert r.ids.tolist() == [[0, 2]], dtype
        assert r.counts.tolist() == [2]
    r = route(z, top_k=3, temperature=0.005, dense=True, renorm="none")
    assert r.ids.tolist() == [[0, 2, 1]]


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_issue9_emu_orders_by_logit_when_p_underflows(dtype):
    """Defect 4 in the kernel."""
    z = torch.tensor([[2.0, 0.5, 1.0, -1.0], [-3.0, 0.0, -1.0, -2.0]]).to(dtype)
    got = _emu_route(z, top_k=3, temperature=0.005)
    assert got.ids.tolist() == [[0, 2, 1], [1, 2, 3]]
    got = _emu_route(z, top_p=0.5, max_k=4, temperature=0.005)
    _assert_same_routing(got, route_reference(z, top_p=0.5, max_k=4, temperature=0.005), dtype)


def test_issue9_meta_and_fake_tensors_with_default_validation():
    """Defect 5: meta tensors failed with validate=True (.item() / offsets.cpu())."""
    z = torch.randn(6, 5, device="meta")
    r = route(z, top_p=0.5, max_k=3, dense=True)
    assert r.ids.shape == (6, 3) and r.ids.device.type == "meta" and r.dense.shape == (6, 5)
    r = route_segments(torch.randn(3, 5, device="meta"), torch.tensor([0, 1, 2, 4], device="meta"), 4, top_k=2)
    assert r.ids.shape == (4, 2)
    r = route_cosine(torch.randn(6, 4, device="meta"), torch.randn(5, 4, device="meta"), top_k=2)
    assert r.weights.shape == (6, 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        r = route(torch.randn(6, 5), top_k=2)
        assert r.ids.shape == (6, 2)


def test_issue9_autocast_contract():
    """Defect 6: under autocast the parameters follow the activation's dtype; the router ops run in
    the logits' dtype (nothing cast)."""
    from mokernels.ops import rank_one_scale

    z = torch.randn(3, 8).bfloat16()
    sigma = torch.rand(8, requires_grad=True)  # an fp32 parameter
    g = torch.randn(3, 8)  # fp32 gates (e.g. p_task + bf16 matmul promoted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rank_one_scale(z, sigma, g)
        c = route_cosine(torch.randn(3, 4).bfloat16(), torch.randn(5, 4), top_k=2)
        r32 = route(torch.randn(3, 5), top_k=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rank_one_scale(z, sigma.detach().bfloat16(), g.bfloat16()), rtol=0, atol=0)
    out.float().sum().backward()
    assert sigma.grad is not None and sigma.grad.dtype == torch.float32
    assert c.weights.dtype == torch.bfloat16 and r32.weights.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):  # outside autocast a mismatch stays an error
        rank_one_scale(z, sigma, g)


def test_issue9_fp64_top_p_cut_is_unnormalised():
    """Defect 7: the reference cut normalised cumsums (kept 10 for p = 0.9 on 10 equal fp64 logits)."""
    assert route(torch.zeros(1, 10, dtype=torch.float64), top_p=0.9).counts.tolist() == [9]
    assert route(torch.zeros(1, 10), top_p=0.9).counts.tolist() == [9]


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_issue9_emu_top_p_boundaries_match_reference(dtype):
    """Defect 7: on uniform rows every (N, k/N) boundary cuts at the same expert on both paths (the
    issue counted 228 of 780 pairs apart in fp64; a sample of N keeps the emulated test short)."""
    for N in (1, 2, 3, 5, 7, 10, 12, 25, 40):
        z = torch.zeros(2, N, dtype=dtype)
        for k in range(1, N + 1):
            p = k / N
            want = route_reference(z, top_p=p).counts
            assert _emu_route(z, top_p=p).counts.tolist() == want.tolist(), (N, k)


def _gemm_rounding_per_column(a, b):
    """A GEMM whose result depends on the column's position, as blocked BLAS kernels' can (edge tiles,
    alignment peeling): odd columns come out 1 ulp up. The issue saw this in fp64; this machine's BLAS
    happens to round identical columns alike, so the test makes the effect explicit."""
    c = torch.matmul(a, b)
    c[:, 1::2] = torch.nextafter(c[:, 1::2], torch.full_like(c[:, 1::2], float("inf")))
    return c


def test_issue9_cosine_identical_keys_tie_to_lower_index(monkeypatch):
    """Defect 8: fp64 GEMM gave identical keys logits 1 ulp apart, breaking "ties -> lower index"."""
    monkeypatch.setattr(R, "_gemm", _gemm_rounding_per_column)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        base = torch.randn(6, 24, generator=g, dtype=torch.float64)
        keys = base[[0, 1, 2, 0, 3, 1, 4, 5, 2, 0]].to(dtype)  # duplicates at (0, 3, 9), (1, 5), (2, 8)
        h = torch.randn(257, 24, generator=g, dtype=torch.float64).to(dtype)
        r = route_cosine(h, keys, top_k=10, validate=False)
        first = {0: 0, 3: 0, 9: 0, 1: 1, 5: 1, 2: 2, 8: 2}
        for row in r.ids.tolist():
            pos = {e: i for i, e in enumerate(row)}
            for e, f in first.items():
                assert pos[f] <= pos[e]  # a duplicate never comes before its lowest-index twin
            for a, b in ((0, 3), (3, 9), (1, 5), (2, 8)):
                assert pos[b] == pos[a] + 1  # equal logits: adjacent, lower index first


@pytest.mark.parametrize("call,msg", [
    (lambda: route_segments(torch.randn(0, 5), torch.tensor([0]), 3), "num_tokens"),
    (lambda: route_segments(torch.randn(0, 5), torch.tensor([0]), 3, validate=False), "num_tokens"),
    (lambda: route_segments(torch.randn(2, 5), torch.tensor([0, 1, 3]).bool(), 3), "offsets must be int"),
    (lambda: route_segments(torch.randn(2, 5), torch.tensor([0, 1, 3]).to(torch.complex64), 3), "offsets must be int"),
    (lambda: route_segments(torch.randn(2, 5), torch.tensor([0.0, 1.0, 3.0]), 3), "offsets must be int"),
    (lambda: route_cosine(torch.randn(5, 0), torch.randn(4, 0)), "r >= 1"),
    (lambda: torch.ops.mokernels.route_cosine_fwd(torch.randn(5, 0), torch.randn(4, 0), 1.0, 1e-8, 1.0, 4, "sum",
                                                  False), "r >= 1"),
], ids=["segments-S0", "segments-S0-novalidate", "offsets-bool", "offsets-complex", "offsets-float", "cosine-r0",
        "cosine-op-r0"])
def test_issue9_clear_errors(call, msg):
    """Defect 9: ValueErrors naming the argument instead of index_select/reshape/NotImplementedError."""
    with pytest.raises(ValueError, match=msg):
        call()


def test_issue9_huge_and_tiny_temperatures():
    """Defect 10: τ > FLT_MAX became inf in fp32 (misleading error, or rows dropped with validate=False)."""
    z = torch.randn(3, 5)
    for t in (1e39, 1e300, 1e-39):
        with pytest.raises(ValueError, match="temperature"):
            route(z, temperature=t, top_k=2)
        with pytest.raises(ValueError, match="temperature"):
            route(z, temperature=t, top_k=2, validate=False)
        with pytest.raises(ValueError, match="temperature"):
            route(z.bfloat16(), temperature=t, top_k=2, validate=False)
        with pytest.raises(ValueError, match="temperature"):
            torch.ops.mokernels.route_fwd(z, t, 1.0, 2, "sum", False)
    r = route(z.double(), temperature=1e39, top_p=0.5, dense=True)  # fine in fp64: almost uniform
    assert r.counts.tolist() == [3, 3, 3]
    torch.testing.assert_close(r.dense.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (route(z, temperature=3e38, top_k=2).counts == 2).all()  # finite in fp32, r subnormal > 0


@pytest.mark.emu
def test_issue9_emu_temperature_limits():
    z = torch.randn(3, 5)
    for t in (1e39, 1e-39):
        with pytest.raises(ValueError, match="temperature"):
            emu.ops().route_fwd(z, t, 1.0, 2, "sum", False)
    r = emu.ops().route_fwd(z.double(), 1e39, 1.0, 2, "sum", False)
    assert r[2].tolist() == [2, 2, 2]


@pytest.mark.parametrize("kw", [dict(top_p=True), dict(top_k=True), dict(temperature=True), dict(max_k=True),
                                dict(top_k=2.0), dict(top_p="0.5"), dict(temperature=False)], ids=str)
def test_issue9_bool_and_non_number_options(kw):
    """Defect 11: top_p=True, top_k=True, temperature=True were accepted as 1."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        route(torch.randn(2, 4), **kw)
    with pytest.raises(ValueError, match=next(iter(kw))):
        route_cosine(torch.randn(2, 3), torch.randn(4, 3), **kw)


def test_issue9_topk_fast_path_ties_follow_index():
    """The CPU top-k fast path (topk instead of a stable sort) keeps rule 2 on heavily tied rows."""
    g = torch.Generator().manual_seed(3)
    z = torch.randint(-2, 3, (500, 24), generator=g).float()
    z[::7, 5] = NINF
    for k in (1, 2, 3, 5, 11):
        got = route(z, top_k=k, dense=True)
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(got.ids.long(), order)
    zb = (torch.randn(300, 64, generator=g) * 3).bfloat16()  # bf16: many exact ties
    for k in (2, 8):
        got = route(zb, top_k=k, temperature=0.7, renorm="none")
        x = zb.float() * R.inv_temperature(0.7, zb.dtype)
        assert torch.equal(got.ids.long(), torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k])


def test_issue9_validation_is_one_pass_and_one_sync():
    """Validation policy (issue 8 item 4): the device path checks logits with one reduction over z and one
    host sync; route_segments checks offsets and logits together with one host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    z = _logits(64, 9, torch.float32, 45)
    with Count() as c:
        R.validate_rows(z, 0.7)
    big = [f for f in c.ops if f is torch.ops.aten.amax.default]
    syncs = [f for f in c.ops if f is torch.ops.aten._local_scalar_dense.default]
    assert len(big) == 1 and len(syncs) == 1
    z[5, 3] = float("nan")
    with pytest.raises(ValueError, match="row 5"):
        R.validate_rows(z, 0.7)


def test_issue9_cuda_path_wrappers_on_cpu():
    """The eager autograd.Functions the CUDA path uses (kernel op inside), run here with the CPU op:
    gradcheck and gradgradcheck, so a GPU-less CI still covers their backward formulas."""
    x = _logits(4, 6, torch.float64, 46).requires_grad_(True)
    for renorm in R.RENORMS:
        f = lambda t: R._RouteFn.apply(t, 0.9, 0.7, 4, renorm, True)[1::2]  # noqa: E731  (weights, dense)
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
    h, k = _codes(4, 5, 3, torch.float64, 47)
    h.requires_grad_(True)
    k.requires_grad_(True)
    fc = lambda a, b: R._RouteCosineFn.apply(a, b, 0.8, 1e-8, 0.6, 3, "softmax", True)[1::2]  # noqa: E731
    assert torch.autograd.gradcheck(fc, (h, k))
    assert torch.autograd.gradgradcheck(fc, (h, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_top_k_fast_path_matches_general_path(dtype):
    """The CPU top-k fast path (rows with K+1 finite distinct largest logits) gives the general path's
    ids and counts exactly and its weights up to rounding; rows with ties, masks or NaN fall back."""
    z = _logits(300, 40, dtype, 48)
    for k, kw in ((1, {}), (3, dict(dense=True)), (7, dict(temperature=0.3, dense=True))):
        x = R._scaled(z, R.inv_temperature(kw.get("temperature", 1.0), dtype))
        fast = R._top_k_fast(x, k, kw.get("dense", False), dtype)
        got = route(z, top_k=k, **kw)
        assert fast is not None or dtype in (torch.float16, torch.bfloat16)  # half types: ties are common
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(got.ids.long(), order) and (got.counts == k).all()
        p = torch.softmax(x.double(), -1).gather(1, order)
        torch.testing.assert_close(got.weights.double(), p / p.sum(-1, keepdim=True), rtol=WTOL[dtype], atol=WTOL[dtype])
        if "dense" in kw:
            assert torch.equal(got.dense.gather(1, order), got.weights)
    z2 = z.clone()
    z2[3, 5] = z2[3, 6] = z2[3].max()  # a tie at the top: the general path
    assert R._top_k_fast(R._scaled(z2, 1.0), 2, False, dtype) is None
    assert route(z2, top_k=2).ids[3].tolist() == [5, 6]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_top_k_fast_path_tiny_inputs(dtype):
    """Tiny CPU inputs (<= R._TINY logits) take the fast path's contiguous variant: the same ids, counts
    and weights as the sort-based spec, gradients as the independent composition softmax(x_sel), and
    ties / masks / NaN still fall back to the general path."""
    gen = torch.Generator().manual_seed(49)
    for T, N, k in ((4, 8, 2), (1, 3, 1), (16, 64, 3)):
        assert T * N <= R._TINY
        z = (torch.randn(T, N, generator=gen, dtype=torch.float64) * 2).to(dtype)
        x = R._scaled(z, 1.0)
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
        if (torch.sort(x, dim=-1).values.diff(dim=-1) != 0).all():  # distinct per row: the fast path applies
            assert R._top_k_fast(x, k, False, dtype) is not None
        zz = z.clone().requires_grad_(True)
        got = route(zz, top_k=k, dense=True)
        assert torch.equal(got.ids.long(), order) and (got.counts == k).all()
        xs = zz.to(x.dtype).gather(1, order)
        want = torch.softmax(xs, -1)
        torch.testing.assert_close(got.weights.to(x.dtype), want.to(dtype).to(x.dtype), rtol=0, atol=0)
        assert torch.equal(got.dense.gather(1, order), got.weights)
        gw = torch.randn(T, k, generator=gen, dtype=torch.float64).to(dtype)
        (g1,) = torch.autograd.grad(got.weights, zz, gw)
        (g2,) = torch.autograd.grad(want.to(dtype), zz, gw)
        torch.testing.assert_close(g1, g2, rtol=WTOL[dtype], atol=WTOL[dtype])
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, -1.0], [0.0, float("-inf"), 1.0, 2.0, -1.0]])
    assert R._top_k_fast(z, 2, False, z.dtype) is None  # a tie at the top
    assert route(z, top_k=2).ids[0].tolist() == [1, 2]
    z[0, 2] = float("nan")
    assert R._top_k_fast(z, 2, False, z.dtype) is None
    z = torch.tensor([[0.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")]])
    assert R._top_k_fast(z, 2, False, z.dtype) is None  # a masked expert among the K + 1
    assert route(z, top_k=2).counts.tolist() == [1]


def _counting_native(monkeypatch):
    calls = []
    real = R._native_route
    assert real is not None
    monkeypatch.setattr(R, "_native_route", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_route_matches_reference(dtype, monkeypatch):
    """route() on CPU without autograd and without a top-p cut runs the native kernel
    (csrc/cpu/cpu_ops.cpp): the selection equals the reference's bit for bit (ties among equal logits,
    -inf masks, fewer live experts than k, kmax > N, τ != 1, every renorm, dense), weights up to
    rounding; invalid rows get the fallback (validate=False) or a ValueError naming the first one."""
    calls = _counting_native(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    for T, N in ((1, 1), (7, 5), (33, 64), (4, 300)):
        z = torch.randn(T, N, generator=gen)
        z[:, ::3] = torch.round(z[:, ::3])  # ties
        z[0, -1] = NINF
        if T > 2:
            z[1, 1:] = NINF  # one live expert
            z[2, 0] = float("nan")  # an invalid row
        z = z.to(dtype)
        for opts in (dict(top_k=2), dict(top_k=1, temperature=0.3), dict(max_k=N + 3, renorm="softmax"),
                     dict(renorm="none", dense=True), dict(top_k=min(N, 4), dense=True, top_p=1.0),
                     dict(top_k=3, renorm="softmax", temperature=2.5, dense=True)):
            got = route(z, validate=False, **opts)
            want = route_reference(z, **opts)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.counts, want.counts), opts
            assert got.weights.dtype == dtype and got.weights.shape == want.weights.shape
            torch.testing.assert_close(got.weights.double(), want.weights.double(), rtol=WTOL[dtype], atol=WTOL[dtype])
            if opts.get("dense"):
                torch.testing.assert_close(got.dense.double(), want.dense.double(), rtol=WTOL[dtype], atol=WTOL[dtype])
            else:
                assert got.dense is None
        if T > 2:
            with pytest.raises(ValueError, match="row 2 "):
                route(z, top_k=2)
    assert len(calls) >= 20
    # N-d logits, reshaped in and out
    z3 = torch.randn(2, 3, 9, generator=gen).to(dtype)
    got, want = route(z3, top_k=2, dense=True), route_reference(z3, top_k=2, dense=True)
    assert got.ids.shape == (2, 3, 2) and got.counts.shape == (2, 3) and got.dense.shape == (2, 3, 9)
    assert torch.equal(got.ids, want.ids)


def test_native_cpu_route_not_taken_with_autograd_top_p_or_modes(monkeypatch):
    """The native route is an eager, no-autograd, top_p >= 1 path only: with a gradient, a top-p cut,
    forward-mode AD or a dispatch mode active the reference path runs (and stays differentiable)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = _counting_native(monkeypatch)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = route(z, top_k=2).weights
    assert w.requires_grad and not calls
    route(z.detach(), top_p=0.5)
    assert not calls

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        got = route(z.detach(), top_k=2)
    assert not calls and torch.equal(got.ids, route_reference(z.detach(), top_k=2).ids)
    route(z.detach(), top_k=2)
    assert calls
