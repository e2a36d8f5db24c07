"""Multi-slice LoRA (several output slices, e.g. q/k/v, in one launch: lora_apply_sliced) and mixed ranks
in one batch (ranks=): the emulated decode and prefill kernels vs the reference, the reference vs an
independent per-slice / truncated-rank composition, autograd, and bad inputs."""
from __future__ import annotations

import pytest
import torch

from mokernels.ops.lora import (
    lora_apply,
    lora_apply_reference,
    lora_apply_sliced,
    lora_apply_sliced_reference,
    lora_shared_apply,
)

from conftest import SMALL
from test_lora import KERNEL_TOL, _canonical, make_form, naive, weights


def _slices(N, r, d_in, d_outs, dtype, seed=0):
    torch.manual_seed(seed)
    As, Bs = [], []
    for d in d_outs:
        A, B, scale = weights(N, r, d_in, d, dtype)
        As.append(A)
        Bs.append(B)
    return As, Bs, scale


def _nan_padding(A, B, ranks):
    """A/B with NaN past each adapter's rank: a kernel that reads (or multiplies) the padding is caught."""
    A, B = A.clone(), B.clone()
    for n, rn in enumerate(ranks.tolist()):
        A[n, rn:] = float("nan")
        B[n, :, rn:] = float("nan")
    return A, B


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Emulated kernels vs the reference (small shapes: the TSan pass runs these)


@pytest.mark.emu
@pytest.mark.parametrize("form", ["ids", "mixture", "segment_mixture"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_sliced_decode_matches_reference(emu_ops, monkeypatch, form, dtype):
    """Three slices of different widths (one not a multiple of the vector width) in one launch of the
    split decode path; each writes only its columns (base passes through elsewhere)."""
    if SMALL and (form, dtype) != ("mixture", torch.bfloat16):
        pytest.skip("TSan pass: one of the six cases covers the sliced decode launch's memory behaviour")
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "decode")
    N, r, d_in, d_outs, lead = 3, 8, 32, [16, 5, 24], (4,)
    As, Bs, scale = _slices(N, r, d_in, d_outs, dtype)
    T = 4
    x = torch.randn(T, d_in).to(dtype)
    base = torch.randn(T, sum(d_outs)).to(dtype)
    kw, _ = make_form(form, lead, N, k=2, S=2)
    ids, w, off = _canonical(kw, lead)
    w = None if w is None else w.to(_acc(dtype))
    s = scale.to(_acc(dtype))
    want = lora_apply_sliced_reference(x, As, Bs, s, ids, w, off, base)
    got = emu_ops.lora_apply_sliced(x, As, Bs, s, ids, w, off, base)
    assert got.shape == (T, sum(d_outs)) and got.dtype == dtype
    torch.testing.assert_close(got, want, **KERNEL_TOL[dtype])
    if SMALL:
        return  # TSan pass: the same launches without base
    torch.testing.assert_close(emu_ops.lora_apply_sliced(x, As, Bs, s, ids, w, off, None),
                               lora_apply_sliced_reference(x, As, Bs, s, ids, w, off, None), **KERNEL_TOL[dtype])


@pytest.mark.emu
@pytest.mark.parametrize("aligned", [True, False])
def test_emulated_sliced_prefill_matches_reference(emu_ops, monkeypatch, aligned):
    """The tensor-core prefill path with the slice as grid.z (cp.async tiles when aligned, element loads
    when a slice's B is shifted in its storage)."""
    if SMALL and not aligned:
        pytest.skip("TSan pass: the element-load variant is the same schedule as the cp.async one")
    monkeypatch.setenv("MOKERNELS_LORA_PATH", "prefill")
    dtype = torch.bfloat16
    N, r, d_in, d_outs = 3, 16, 32, [16, 40]
    As, Bs, scale = _slices(N, r, d_in, d_outs, dtype, seed=1)
    if not aligned:
        Bs[1] = torch.randn(Bs[1].numel() + 1).to(dtype)[1:].view(Bs[1].shape)
    x = torch.randn(40, d_in).to(dtype)
    base = torch.randn(40, sum(d_outs)).to(dtype)
    off = torch.tensor([0, 23, 23, 40], dtype=torch.int32)
    ids = torch.tensor([[2, 0], [1, -1], [0, 1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 1.5], [1.0, 0.0], [0.25, -1.0]])
    s = scale.float()
    want = lora_apply_sliced_reference(x, As, Bs, s, ids, w, off, base)
    torch.testing.assert_close(emu_ops.lora_apply_sliced(x, As, Bs, s, ids, w, off, base), want, **KERNEL_TOL[dtype])


@pytest.mark.emu
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_emulated_mixed_ranks_never_read_padding(emu_ops, monkeypatch, path):
    """ranks [N] with rank 0, odd ranks and r_max: the padding of A/B is NaN and the output is finite and
    equals the reference (which masks the padding): the kernels neither read nor multiply it. Sliced too."""
    monkeypatch.setenv("MOKERNELS_LORA_PATH", path)
    dtype = torch.bfloat16
    N, r, d_in = 4, 16, 32
    ranks = torch.tensor([16, 3, 0, 9], dtype=torch.int32)
    A, B, scale = weights(N, r, d_in, 24, dtype)
    A, B = _nan_padding(A, B, ranks)
    A2, B2, _ = weights(N, r, d_in, 8, dtype)
    A2, B2 = _nan_padding(A2, B2, ranks)
    s = scale.float()
    if path == "decode":
        T = 5
        x = torch.randn(T, d_in).to(dtype)
        ids = torch.tensor([[0, 1], [3, 2], [2, -1], [1, 3], [0, 3]], dtype=torch.int32)
        w = torch.rand(T, 2)
        off = None
    else:
        T = 40
        x = torch.randn(T, d_in).to(dtype)
        ids = torch.tensor([[1, 3], [2, 0], [3, 1]], dtype=torch.int32)  # 3 + 9 -> two 16-wide H tiles
        w = torch.rand(3, 2)
        off = torch.tensor([0, 17, 30, 40], dtype=torch.int32)
    base = torch.randn(T, 24).to(dtype)
    want = lora_apply_reference(x, A, B, s, ids, w, off, base, ranks)
    assert torch.isfinite(want.float()).all()
    got2 = emu_ops.lora_apply_sliced(x, [A, A2], [B, B2], s, ids, w, off, None, ranks)
    want2 = lora_apply_sliced_reference(x, [A, A2], [B, B2], s, ids, w, off, None, ranks)
    torch.testing.assert_close(got2, want2, **KERNEL_TOL[dtype])
    if SMALL:
        return  # TSan pass: the sliced launch above covers the ranked kernels' memory behaviour
    got = emu_ops.lora_apply(x, A, B, s, ids, w, off, base, ranks)
    torch.testing.assert_close(got, want, **KERNEL_TOL[dtype])
    out = base.clone()
    emu_ops.lora_apply_(out, x, A, B, s, ids, w, off, ranks)
    torch.testing.assert_close(out, want, **KERNEL_TOL[dtype])


@pytest.mark.emu
def test_emulated_ranks_out_of_range_stay_in_bounds(emu_ops):
    """Unvalidated ranks outside [0, r] are clamped by the kernels (ASan pass: in bounds)."""
    A, B, scale = weights(3, 8, 16, 12, torch.float32)
    x = torch.randn(3, 16)
    ids = torch.tensor([[0], [1], [2]], dtype=torch.int32)
    bad = torch.tensor([-5, 1000, 8], dtype=torch.int32)
    got = emu_ops.lora_apply(x, A, B, scale.float(), ids, None, None, None, bad)
    want = lora_apply_reference(x, A, B, scale.float(), ids, None, None, None, bad.clamp(0, 8))
    torch.testing.assert_close(got, want, **KERNEL_TOL[torch.float32])
    assert torch.equal(got[0], torch.zeros(12))


# ------------------------------------------------------------------------------------------------
# Reference semantics, autograd (not emulated)


def test_sliced_equals_per_slice_lora_apply_and_stacked_input():
    N, r, d_in, d_outs = 4, 4, 12, [6, 3, 6]
    As, Bs, scale = _slices(N, r, d_in, d_outs, torch.float64, seed=3)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    kw, routes = make_form("mixture", (2, 3), N, k=2)
    base = torch.randn(2, 3, sum(d_outs), dtype=torch.float64)
    got = lora_apply_sliced(x, As, Bs, scale, base_out=base, **kw)
    cols = [0, 6, 9, 15]
    for s_ in range(3):
        want = naive(x, As[s_], Bs[s_], scale, routes, base[..., cols[s_]:cols[s_ + 1]])
        torch.testing.assert_close(got[..., cols[s_]:cols[s_ + 1]], want.reshape(2, 3, -1), rtol=1e-10, atol=1e-10)
    # stacked [S, N, r, d_in] / [S, N, d_out, r] (equal widths): the same as the list
    A3, B3 = torch.stack([As[0], As[2]]), torch.stack([Bs[0], Bs[2]])
    torch.testing.assert_close(lora_apply_sliced(x, A3, B3, scale, **kw),
                               lora_apply_sliced(x, [As[0], As[2]], [Bs[0], Bs[2]], scale, **kw))


def test_mixed_ranks_equal_truncated_adapters():
    """Adapter n with rank r_n padded to r_max = the same adapter unpadded (an independent loop)."""
    N, r, d_in, d_out = 3, 6, 10, 7
    ranks = torch.tensor([6, 2, 0])
    A, B, scale = weights(N, r, d_in, d_out, torch.float64)
    x = torch.randn(5, d_in, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 1, -1])
    A, B = _nan_padding(A, B, ranks)
    got = lora_apply(x, A, B, scale, ids=ids, ranks=ranks)
    want = torch.zeros(5, d_out, dtype=torch.float64)
    for t, i in enumerate(ids.tolist()):
        if i >= 0:
            rn = int(ranks[i])
            want[t] = scale[i] * (B[i, :, :rn] @ (A[i, :rn] @ x[t]))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sliced_and_ranks_autograd_match_reference():
    """Gradients of x, every slice's A/B, the mixture weights and base_out vs autograd through the
    per-slice reference on truncated (masked) weights; the padding gets exactly zero gradient."""
    N, r, d_in, d_outs = 3, 4, 8, [5, 3]
    As, Bs, scale = _slices(N, r, d_in, d_outs, torch.float64, seed=5)
    ranks = torch.tensor([4, 1, 2])
    x = torch.randn(4, d_in, dtype=torch.float64)
    mi = torch.tensor([[0, 1], [2, -1], [1, 2], [0, 2]])
    mw = torch.rand(4, 2, dtype=torch.float64)
    base = torch.randn(4, 8, dtype=torch.float64)
    leaves = [x, *As, *Bs, mw, base]
    for t in leaves:
        t.requires_grad_(True)
    y = lora_apply_sliced(x, As, Bs, scale, mixture=(mi, mw), base_out=base, ranks=ranks)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    mask = (torch.arange(r)[None, :] < ranks[:, None]).double()  # [N, r]
    ys = [lora_apply(x, A * mask[:, :, None], B * mask[:, None, :], scale, mixture=(mi, mw)) for A, B in zip(As, Bs)]
    want = torch.autograd.grad(torch.cat(ys, -1) + base, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for dA, dB in zip(got[1:3], got[3:5]):
        assert torch.equal(dA * (1 - mask[:, :, None]), torch.zeros_like(dA))
        assert torch.equal(dB * (1 - mask[:, None, :]), torch.zeros_like(dB))
    torch.autograd.gradcheck(lambda x_, a_, w_: lora_apply_sliced(x_, [a_, As[1].detach()], [b.detach() for b in Bs],
                                                                  scale, mixture=(mi, w_), ranks=ranks),
                             (x.detach().clone().requires_grad_(), As[0].detach().clone().requires_grad_(),
                              mw.detach().clone().requires_grad_()))


def test_sliced_and_ranks_bad_inputs():
    N, r, d_in = 3, 4, 8
    As, Bs, scale = _slices(N, r, d_in, [5, 3], torch.float32)
    x = torch.randn(2, d_in)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="same length"):
        lora_apply_sliced(x, As, Bs[:1], scale, ids=ids)
    with pytest.raises(ValueError, match="same length"):
        lora_apply_sliced(x, [], [], scale, ids=ids)
    with pytest.raises(ValueError, match=r"same length S in \[1, 8\]"):
        lora_apply_sliced(x, As * 5, Bs * 5, scale, ids=ids)
    with pytest.raises(ValueError, match=r"As\[s\] must be"):
        lora_apply_sliced(x, [As[0], As[1][:, :2]], [Bs[0], Bs[1][:, :, :2]], scale, ids=ids)
    with pytest.raises(ValueError, match="B must be"):
        lora_apply_sliced(x, As, [Bs[0], Bs[1][:2]], scale, ids=ids)
    with pytest.raises(ValueError, match="base_out must be"):
        lora_apply_sliced(x, As, Bs, scale, ids=ids, base_out=torch.zeros(2, 5))
    # one slice's [N, r, d_in] passed as the stacked form: named as such, not as N malformed "slices"
    with pytest.raises(ValueError, match=r"As as one tensor must be stacked \[S, N, r, d_in\], got \[3, 4, 8\]"):
        lora_apply_sliced(x, As[0], Bs[:1], scale, ids=ids)
    with pytest.raises(ValueError, match=r"Bs as one tensor must be stacked \[S, N, d_out, r\]"):
        lora_apply_sliced(x, As[:1], Bs[0], scale, ids=ids)
    A, B = As[0], Bs[0]
    for bad, msg in ((torch.tensor([1, 5, 2]), r"ranks must be in \[0, r\] = \[0, 4\]"),
                     (torch.tensor([1, -1, 2]), r"ranks must be in \[0, r\]"),
                     (torch.tensor([1, 2]), r"ranks must be a \[N\] = \[3\]"),
                     (torch.tensor([1.0, 2.0, 3.0]), "integer tensor")):
        with pytest.raises(ValueError, match=msg):
            lora_apply(x, A, B, scale, ids=ids, ranks=bad)
    with pytest.raises(ValueError, match=r"ranks must be in \[0, r\]"):
        lora_apply_sliced(x, As, Bs, scale, ids=ids, ranks=torch.tensor([0, 9, 1]))
    with pytest.raises(ValueError, match="ranks must be"):  # the op itself checks shape and dtype
        torch.ops.mokernels.lora_apply(x, A, B, scale.float(), ids.int()[:, None], None, None, None,
                                       torch.tensor([1, 2, 3]))


def test_sliced_opcheck():
    As, Bs, scale = _slices(3, 4, 8, [5, 3], torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    ids = torch.tensor([[0], [2], [-1]], dtype=torch.int32)
    for t in (*As, *Bs):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.mokernels.lora_apply_sliced.default,
                          (x, As, Bs, scale.float(), ids, None, None, None, torch.tensor([4, 2, 0], dtype=torch.int32)))


@pytest.mark.emu
def test_emulated_op_checks_slices_and_ranks(emu_ops):
    """The C++ op checks every slice and ranks (the ops are public through torch.ops): clear errors."""
    As, Bs, scale = _slices(3, 4, 8, [5, 3], torch.float32)
    x = torch.randn(2, 8)
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    s = scale.float()
    with pytest.raises(ValueError, match=r"every A\[s\] must be"):
        emu_ops.lora_apply_sliced(x, [As[0], As[1][:, :2]], Bs, s, ids, None, None, None)
    with pytest.raises(ValueError, match=r"B\[1\] must be \[N, d_out_s, r\]"):
        emu_ops.lora_apply_sliced(x, As, [Bs[0], Bs[1][:2]], s, ids, None, None, None)
    with pytest.raises(ValueError, match="same length"):
        emu_ops.lora_apply_sliced(x, As, Bs[:1], s, ids, None, None, None)
    with pytest.raises(ValueError, match="same length S <= 8"):
        emu_ops.lora_apply_sliced(x, As * 5, Bs * 5, s, ids, None, None, None)
    with pytest.raises(ValueError, match="ranks must be"):
        emu_ops.lora_apply(x, As[0], Bs[0], s, ids, None, None, None, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="ranks"):
        emu_ops.lora_apply(x, As[0], Bs[0], s, ids, None, None, None, torch.tensor([1, 2, 3]))
    # all adapters rank 0: y = base exactly, nothing read
    base = torch.randn(2, 8)
    z = torch.zeros(3, dtype=torch.int32)
    assert torch.equal(emu_ops.lora_apply_sliced(x, As, Bs, s, ids, None, None, base, z), base)


@pytest.mark.emu
@pytest.mark.skipif(SMALL, reason="~2.5k A rows of fibers: a wrapper check, not a race; too slow for the TSan pass")
def test_emulated_many_slots_not_limited_by_fused_kernel_smem(emu_ops):
    """k · (r + 2) · 4 bytes > 48 KiB was refused for every form, though only the shared-A SIMT kernel keeps
    per-slot state in shared memory: the split decode path now runs it (and shared A still refuses)."""
    k, r = 2460, 1  # fp64: the old (k·r + k) · 8 + 4k = 49200 bytes > 48 KiB
    A, B, scale = weights(4, r, 8, 8, torch.float64)
    x = torch.randn(1, 8, dtype=torch.float64)
    ids = torch.full((1, k), -1, dtype=torch.int32)
    ids[0, :4] = torch.arange(4, dtype=torch.int32)
    w = torch.rand(1, k, dtype=torch.float64)
    torch.testing.assert_close(emu_ops.lora_apply(x, A, B, scale, ids, w, None, None),
                               lora_apply_reference(x, A, B, scale, ids, w), **KERNEL_TOL[torch.float64])
    x = x.float()
    with pytest.raises(ValueError, match="shared memory"):
        emu_ops.lora_shared_apply(x, torch.randn(8, 8), torch.randn(6200, 8, 8), 1.0, None, torch.rand(1, 6200), None)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("use_ranks", [False, True])
def test_cuda_sliced_and_ranks_match_reference(monkeypatch, path, use_ranks):
    """q/k/v-like slices (d_out 4096 / 1024 / 1024) at the issue's shapes, with and without mixed ranks;
    forward vs the reference, and the gradients vs the CPU autograd of the same call."""
    monkeypatch.setenv("MOKERNELS_LORA_PATH", path)
    dtype, N, r, d_in = torch.bfloat16, 26, 16, 4096
    As, Bs, scale = _slices(N, r, d_in, [4096, 1024, 1024], dtype, seed=7)
    ranks = torch.tensor([(4, 8, 16, 0, 13)[n % 5] for n in range(N)], dtype=torch.int32) if use_ranks else None
    if path == "decode":
        T = 32
        kw = dict(ids=torch.randint(-1, N, (T,), dtype=torch.int32))
    else:
        T = 512
        off = torch.arange(0, T + 1, 128, dtype=torch.int32)
        kw = dict(segment_mixture=(off, torch.randint(0, N, (4, 2), dtype=torch.int32), torch.rand(4, 2)))
    x = torch.randn(T, d_in).to(dtype)
    cuda = lambda v: tuple(cuda(t) for t in v) if isinstance(v, tuple) else v.cuda()  # noqa: E731
    kwc = {k: cuda(v) for k, v in kw.items()}
    leaves = [x.cuda(), *(a.cuda() for a in As), *(b.cuda() for b in Bs)]
    for t in leaves:
        t.requires_grad_(True)
    y = lora_apply_sliced(leaves[0], leaves[1:4], leaves[4:], scale.float().cuda(), ranks=None if ranks is None else ranks.cuda(),
                          **kwc)
    ids, w, off_ = _canonical(kw, (T,))
    want = lora_apply_sliced_reference(x, As, Bs, scale.float(), ids, None if w is None else w.float(), off_, None, ranks)
    torch.testing.assert_close(y.cpu(), want, **KERNEL_TOL[dtype])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    cpu_leaves = [t.detach().cpu().float().requires_grad_(True) for t in leaves]
    yc = lora_apply_sliced(cpu_leaves[0], cpu_leaves[1:4], cpu_leaves[4:], scale.float(), ranks=ranks, **kw)
    wantg = torch.autograd.grad(yc, cpu_leaves, g.cpu().float())
    for a, b in zip(got, wantg):
        torch.testing.assert_close(a.cpu().float(), b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_forward_mode_ad_is_a_clear_error():
    """The LoRA ops have reverse-mode autograd only: a forward-mode tangent used to be dropped silently
    (forward_ad: no tangent on the output; torch.func.jvp: a zero tangent). Now NotImplementedError."""
    import torch.autograd.forward_ad as fwAD

    N, r, d_in = 3, 4, 8
    As, Bs, scale = _slices(N, r, d_in, [5, 3], torch.float32)
    x = torch.randn(2, d_in)
    ids = torch.tensor([0, 2])
    dense = torch.rand(2, N)
    calls = [lambda x_: lora_apply_sliced(x_, As, Bs, scale, ids=ids),
             lambda x_: lora_apply(x_, As[0], Bs[0], scale, ids=ids, ranks=torch.tensor([4, 1, 0])),
             lambda x_: lora_apply(x_, As[0], Bs[0], scale, ids=ids.int(), validate=False),
             lambda x_: lora_shared_apply(x_, As[0][0], Bs[0], 1.0, weights=dense)]
    for f in calls:
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(fwAD.make_dual(x, torch.ones_like(x)))
        with fwAD.dual_level():  # a dual level without tangents on the inputs is fine
            torch.testing.assert_close(f(x), f(x.clone()))


def test_empty_adapter_pool_is_no_update():
    """N = 0 adapters (a server with none loaded yet, every id -1): the output is base_out (or 0) and every
    gradient is zero — the CPU reference used to fail with an IndexError on the empty scale (the kernels
    already handled it)."""
    d_in, r = 8, 4
    x = torch.randn(3, d_in, requires_grad=True)
    A = torch.randn(0, r, d_in, requires_grad=True)
    B = torch.randn(0, 5, r, requires_grad=True)
    base = torch.randn(3, 10, requires_grad=True)
    w = torch.rand(3, 2, requires_grad=True)
    y = lora_apply_sliced(x, [A, A], [B, B], torch.zeros(0), mixture=(torch.full((3, 2), -1), w), base_out=base,
                          ranks=torch.zeros(0, dtype=torch.int32))
    torch.testing.assert_close(y, base, rtol=0, atol=0)
    y.square().sum().backward()
    assert x.grad.abs().max() == 0 and w.grad.abs().max() == 0 and A.grad.shape == A.shape
    torch.testing.assert_close(base.grad, 2 * base.detach())
    assert lora_apply(x.detach(), A.detach(), B.detach(), 1.0, ids=torch.full((3,), -1)).abs().max() == 0
