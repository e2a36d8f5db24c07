"""SAMoRA on the real MiniLM: fresh wrap == base, the layer == a plain torch composition (forward and
gradients), the unseen task uses the mean gate, training lowers the loss, save -> load is bit-exact, the
extra losses are finite, differentiable and have their closed-form values at init."""
from __future__ import annotations

import copy

import pytest
import torch

import mokernels
from mokernels.methods.samora import SAMoRAConfig, SAMoRALinear


pytestmark = pytest.mark.usefixtures("one_thread")  # many small matmuls: one thread is faster

TARGETS = ["query", "value"]
TASKS = torch.tensor([0, 1, 2, -1])  # one per sentence of minilm_batch; -1 = unseen


def wrap_with_tasks(minilm, method, targets, tasks=TASKS, **cfg):
    """A deep copy of the session MiniLM wrapped with ``method``, task ids set (sticky). Shared by the
    SAMoRA / MoORE / DLP-LoRA tests (they import it from here)."""
    m = mokernels.inject(copy.deepcopy(minilm), method, target_modules=targets, **cfg)
    if tasks is not None:
        mokernels.set_task(m, tasks)
    return m


def layers_of(m, cls):
    return [x for x in m.modules() if isinstance(x, cls)]


def train_few_steps(m, batch, params, lr, steps=6):
    """A few Adam steps on a small sentence-classification loss through a fixed random head (plus the
    model's extra losses); returns the losses. The model's routing must be set (sticky) by the caller."""
    head = torch.randn(384, 3, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        h = m(**batch).last_hidden_state.mean(1)
        loss = torch.nn.functional.cross_entropy(h @ head, labels)
        losses.append(loss.item())
        (loss + mokernels.extra_losses(m)).backward()
        opt.step()
        opt.zero_grad()
    return losses


def _wrap(minilm, **cfg):
    return wrap_with_tasks(minilm, "samora", TARGETS, **cfg)


def _layers(m):
    return layers_of(m, SAMoRALinear)


def _randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in _layers(m):
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.05)
            lay.gate_w.copy_(torch.randn(lay.gate_w.shape, generator=g))


def test_fresh_wrap_equals_base(minilm, minilm_batch):
    m = _wrap(minilm)
    assert len(_layers(m)) == 12
    with torch.no_grad():
        ref = minilm(**minilm_batch).last_hidden_state
        out = m(**minilm_batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    lay = _layers(m)[0]
    # A = top-r right singular vectors of W (orthonormal rows spanning W's top directions), S = top-r σ
    s = torch.linalg.svdvals(lay.weight.detach())
    torch.testing.assert_close(lay.lora_S.detach(), s[: lay.cfg.r])
    torch.testing.assert_close(lay.lora_A @ lay.lora_A.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.norm(lay.weight @ lay.lora_A.T, dim=0), s[:8], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [None, 2])
def test_layer_matches_torch_composition(minilm, minilm_batch, top_k):
    m = _wrap(minilm, top_k=top_k)
    _randomize(m)
    lay = _layers(m)[3]
    x = torch.randn(4, 7, lay.in_features)
    dy = torch.randn(4, 7, lay.out_features)
    params = [lay.lora_A, lay.lora_S, lay.lora_B, lay.keys, lay.task_emb, lay.gate_w, lay.gate_b]
    y = lay(x)
    g = torch.autograd.grad((y * dy).sum(), params)
    y_ref = lay.reference_forward(x)
    g_ref = torch.autograd.grad((y_ref * dy).sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    assert (y - lay.base_forward(x)).abs().max() > 1e-2  # the adapter is really on
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unseen_task_uses_the_mean_gate(minilm):
    """y - Wx is linear in the task gate, so the unseen task's delta is the mean of the tasks' deltas."""
    m = _wrap(minilm)
    _randomize(m)
    lay = _layers(m)[0]
    K = lay.cfg.num_tasks
    x = torch.randn(1, 5, lay.in_features).expand(K + 1, 5, lay.in_features)
    mokernels.set_task(m, torch.tensor(list(range(K)) + [-1]))
    with torch.no_grad():
        d = lay(x) - lay.base_forward(x)
    torch.testing.assert_close(d[K], d[:K].mean(0), rtol=1e-4, atol=1e-5)
    assert (d[0] - d[1]).abs().max() > 1e-4  # tasks differ


def test_training_reduces_loss(minilm, minilm_batch):
    m = _wrap(minilm)
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for n, p in m.named_parameters() if n.endswith((".weight", ".bias"))
                          and "lora" not in n and "gate" not in n)
    losses = train_few_steps(m, minilm_batch, params, lr=1e-3)
    assert losses[-1] < 0.9 * losses[0], losses


def test_save_load_bit_exact(minilm, minilm_batch, tmp_path):
    m = _wrap(minilm)
    _randomize(m)
    with torch.no_grad():
        for lay in _layers(m):
            lay.keys.add_(1.0)
            lay.lora_S.mul_(1.5)
        out = m(**minilm_batch).last_hidden_state
    mokernels.save_adapters(m, tmp_path / "ad")
    m2 = _wrap(minilm)
    mokernels.load_adapters(m2, tmp_path / "ad")
    with torch.no_grad():
        out2 = m2(**minilm_batch).last_hidden_state
    assert torch.equal(out, out2)


def test_extra_losses_values_and_gradients(minilm):
    m = _wrap(minilm)
    lay = _layers(m)[0]
    c = lay.cfg
    el = lay.extra_losses()
    assert set(el) == {"samora_orth", "samora_match"}
    # at init A A^T = I and B = 0: L_orth = sum_i ||0 - I||^2 = N r
    torch.testing.assert_close(el["samora_orth"], torch.tensor(c.lambda_orth * c.num_experts * c.r), rtol=1e-4, atol=0)
    # B = 0: P_b is uniform, KL(u || softmax(k)) = -log r - mean_j log softmax(k)_j
    lk = torch.log_softmax(lay.keys.detach(), -1)
    kl = (-torch.log(torch.tensor(float(c.r))) - lk.mean(-1)).mean()
    torch.testing.assert_close(el["samora_match"], c.lambda_match * kl, rtol=1e-4, atol=1e-7)
    _randomize(m)
    el = lay.extra_losses()
    assert all(torch.isfinite(v) for v in el.values())
    gA, gB, gk = torch.autograd.grad(el["samora_orth"] + el["samora_match"], [lay.lora_A, lay.lora_B, lay.keys],
                                     allow_unused=True)
    assert gB.abs().sum() > 0 and gk.abs().sum() > 0 and torch.isfinite(gA).all()
    # L_match's target P_b is detached: no gradient into B from it
    (gB_match,) = torch.autograd.grad(lay.extra_losses()["samora_match"], [lay.lora_B], allow_unused=True)
    assert gB_match is None or gB_match.abs().sum() == 0
    total = mokernels.extra_losses(m)
    assert total.requires_grad and torch.isfinite(total)


def test_bad_config_and_missing_task_ids(minilm, minilm_batch):
    with pytest.raises(ValueError, match="r"):
        mokernels.inject(copy.deepcopy(minilm), "samora", target_modules=TARGETS, r=400)
    m = mokernels.inject(copy.deepcopy(minilm), "samora", target_modules=TARGETS)
    with pytest.raises(RuntimeError, match="task"):
        m(**minilm_batch)


def test_config_round_trip():
    c = SAMoRAConfig(r=4, top_k=2)
    assert SAMoRAConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["samora", "moore", "dlp_lora"])
def test_half_precision_layers_match_their_torch_composition(method, dtype):
    """All three H12b methods (here once, on a toy layer): fp16/bf16 weights and activations run, keep
    their dtype in forward and backward, and agree with the fp32-math torch composition within rounding."""
    from mokernels.methods import dlp_lora

    m = torch.nn.ModuleDict({"lin": torch.nn.Linear(64, 96)}).to(dtype)
    cfg = dict(num_adapters=3, r=4) if method == "dlp_lora" else {}
    m = mokernels.inject(m, method, target_modules=["lin"], **cfg)
    lay = m["lin"]
    with torch.no_grad():
        for n, p in lay.named_parameters():
            if n in ("lora_B", "gate_w", "router_P"):
                p.normal_(std=0.1)
    if method == "dlp_lora":
        dlp_lora.set_routing(m, logits=torch.randn(2, 3), top_p=0.9)
    else:
        mokernels.set_task(m, torch.tensor([0, -1]))
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    y = lay(x)
    (gx,) = torch.autograd.grad(y.float().sum(), [x])
    assert y.dtype == dtype and gx.dtype == dtype
    assert (y.float() - lay.base_forward(x).float()).abs().max() > 0.05
    torch.testing.assert_close(y.float(), lay.reference_forward(x).float(), rtol=2e-2, atol=2e-2)


def test_compile_fullgraph_of_the_three_layers():
    """torch.compile(fullgraph=True) (Dynamo, eager backend: no graph break is the point) of a model with
    each H12b method gives the eager forward and gradients; new routing data does not break the graph."""
    from mokernels.methods import dlp_lora

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 48)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    cfgs = {"samora": dict(r=4), "moore": dict(task_dim=8, router_dim=4, householder=2),
            "dlp_lora": dict(num_adapters=3, r=4, trainable_pool=True)}
    for method, cfg in cfgs.items():
        torch._dynamo.reset()
        m = mokernels.inject(Net(), method, target_modules=["lin"], **cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.rsplit(".", 1)[-1] in ("lora_B", "router_P", "gate_w"):
                    p.normal_(0, 0.2)
        c = torch.compile(m, fullgraph=True, backend="eager")
        x = torch.randn(2, 5, 32)
        for step in range(2):  # the second batch routes differently
            if method == "dlp_lora":
                dlp_lora.set_routing(m, logits=torch.randn(2, 3) * 3, top_p=0.9)
            else:
                mokernels.set_task(m, torch.tensor([step, -1]))
            params = [p for p in m.parameters() if p.requires_grad]
            want = torch.autograd.grad(m(x).sum(), params)
            got = torch.autograd.grad(c(x).sum(), params)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=method)


@pytest.mark.parametrize("method", ["samora", "moore", "dlp_lora"])
def test_bf16_autocast_cpu_runs_in_the_activation_dtype(method):
    """Under autocast the three H12b layers compute in the activation dtype (bf16 output within bf16
    tolerance of fp32) and the fp32 master parameters get fp32 gradients."""
    from mokernels.methods import dlp_lora

    torch.manual_seed(0)
    cfg = {"samora": dict(r=4), "moore": dict(task_dim=8, router_dim=4),
           "dlp_lora": dict(num_adapters=3, r=4, trainable_pool=True)}[method]
    m = mokernels.inject(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)),
                         method, target_modules=["0", "2"], **cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.rsplit(".", 1)[-1] in ("lora_B", "router_P", "gate_w"):
                p.normal_(0, 0.1)
    if method == "dlp_lora":
        dlp_lora.set_routing(m, logits=torch.randn(3, 3), top_p=0.9)
    else:
        mokernels.set_task(m, torch.tensor([0, 1, -1]))
    x = torch.randn(3, 5, 64)
    y = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = m(x)
    assert yb.dtype == torch.bfloat16
    assert float(((yb.float() - y).norm(dim=-1) / y.norm(dim=-1)).max()) < 3e-2
    yb.float().square().sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["samora", "moore", "dlp_lora"])
def test_cuda_wrapped_minilm_matches_cpu(method, minilm, minilm_batch, tmp_path):
    """The same wrapped MiniLM through the CUDA kernels == the CPU reference path (outputs and gradients);
    bf16 autocast within bf16 tolerance; CUDA-saved adapters reload exactly into a fresh CUDA wrap."""
    from mokernels.methods import dlp_lora

    targets = ["query", "value", "intermediate.dense"]
    cfg = dict(num_adapters=3, trainable_pool=True) if method == "dlp_lora" else {}
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6], [1 / 3] * 3])

    def route(model, dev):
        if method == "dlp_lora":
            dlp_lora.set_routing(model, probs=probs.to(dev), top_p=0.9)
        else:
            mokernels.set_task(model, TASKS.to(dev))

    def run(model, batch):
        h = model(**batch).last_hidden_state
        return h, h.square().mean()

    m = mokernels.inject(copy.deepcopy(minilm), method, target_modules=targets, **cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.rsplit(".", 1)[-1] in ("lora_B", "router_P", "gate_w"):
                p.normal_(0, 0.02)
    route(m, "cpu")
    y_cpu, loss = run(m, minilm_batch)
    loss.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    m.cuda()
    route(m, "cuda")
    batch = {k: v.cuda() for k, v in minilm_batch.items()}
    y, loss = run(m, batch)
    torch.testing.assert_close(y.detach().cpu(), y_cpu.detach(), rtol=1e-4, atol=1e-4)
    loss.backward()
    assert want
    for n, g in want.items():
        torch.testing.assert_close(m.get_parameter(n).grad.cpu(), g, rtol=1e-3, atol=1e-5, msg=n)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        yb = m(**batch).last_hidden_state
    torch.testing.assert_close(yb.float().cpu(), y_cpu.detach(), rtol=5e-2, atol=5e-2)
    mokernels.save_adapters(m, tmp_path / "a.safetensors")
    fresh = mokernels.inject(copy.deepcopy(minilm).cuda(), method, target_modules=targets, **cfg)
    route(fresh, "cuda")
    mokernels.load_adapters(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, m(**batch).last_hidden_state)
