"""DLP-LoRA on the real MiniLM: a pool loaded from PEFT checkpoints reproduces each PEFT adapter run alone
when the classifier is one-hot; the layer == a plain torch composition for real mixtures (packed
sentences too); fresh wrap == base; save -> load is bit-exact; the classifier's training lowers its
loss; a few training steps of the pool lower the task loss; routing errors are clear."""
from __future__ import annotations

import copy

import pytest
import torch

import mokernels
from mokernels.methods import dlp_lora
from mokernels.methods.dlp_lora import DLPLoRALinear, TaskClassifier
from test_samora import layers_of, train_few_steps  # shared MiniLM helpers

pytestmark = pytest.mark.usefixtures("one_thread")  # many small matmuls: one thread is faster

TARGETS = ["query", "value"]


def _layers(m):
    return layers_of(m, DLPLoRALinear)


def _randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in _layers(m):
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def peft_pool(minilm, minilm_batch, tmp_path_factory):
    """Three PEFT LoRAs (different ranks, targets, alpha, rsLoRA), saved, and each one's output run alone."""
    import peft

    cfgs = [dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
            dict(r=2, lora_alpha=16, target_modules=["query", "intermediate.dense"], use_rslora=True),
            dict(r=4, lora_alpha=4, target_modules=["value"], alpha_pattern={"layer.1.attention.self.value": 12})]
    dirs, outs = [], []
    for i, c in enumerate(cfgs):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(init_lora_weights=False, **c))
        pm.eval()
        d = tmp_path_factory.mktemp(f"peft{i}")
        pm.save_pretrained(d)
        dirs.append(d)
        with torch.no_grad():
            outs.append(pm(**minilm_batch).last_hidden_state)
    return dirs, outs


def test_pool_from_peft_equals_each_adapter_alone(minilm, minilm_batch, peft_pool):
    dirs, outs = peft_pool
    m = dlp_lora.from_peft(copy.deepcopy(minilm), dirs)
    lays = _layers(m)
    assert len(lays) == 6 + 6 + 6 and all(lay.lora_A.shape[:2] == (3, 4) for lay in lays)
    assign = [0, 1, 2, 1]  # sentence -> adapter
    probs = torch.nn.functional.one_hot(torch.tensor(assign), 3).float()
    with torch.no_grad(), dlp_lora.routing(m, probs=probs) as rt:
        out = m(**minilm_batch).last_hidden_state
    assert rt.routing.counts.tolist() == [1, 1, 1, 1]
    for s, a in enumerate(assign):
        torch.testing.assert_close(out[s], outs[a][s], rtol=1e-5, atol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-2  # the adapters really differ
    assert "dlp_lora" not in m.mokernels_state.extra  # the context cleared its routing


@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_torch_composition(minilm, packed):
    m = torch.nn.Sequential(copy.deepcopy(minilm.encoder.layer[0].attention.self.value))
    m = mokernels.inject(m, "dlp_lora", target_modules=["0"], num_adapters=5, r=4)
    _randomize(m)
    lay = m[0]
    logits = torch.randn(3, 5) * 2
    if packed:  # 3 sentences packed into one sequence of 11 tokens
        x, offsets = torch.randn(1, 11, 384), torch.tensor([0, 2, 9, 11])
    else:
        x, offsets = torch.randn(3, 6, 384), None
    with dlp_lora.routing(m, logits=logits, offsets=offsets, top_p=0.7) as rt:
        assert rt.routing.counts.max() > 1  # a real mixture
        y = lay(x)
        y_ref = lay.reference_forward(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert (y - lay.base_forward(x)).abs().max() > 1e-3
    # softmax renorm (paper): weights = softmax over the kept probabilities
    p = torch.softmax(logits, -1)
    for s in range(3):
        k = int(rt.routing.counts[s])
        kept = p[s, rt.routing.ids[s, :k].long()]
        torch.testing.assert_close(rt.routing.weights[s, :k], torch.softmax(kept, -1))
        assert kept.sum() >= 0.7 and (k == 1 or kept[:-1].sum() < 0.7)


def test_fresh_wrap_equals_base_and_save_load_bit_exact(minilm, minilm_batch, tmp_path):
    m = mokernels.inject(copy.deepcopy(minilm), "dlp_lora", target_modules=TARGETS, num_adapters=3)
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 4)
    with torch.no_grad(), dlp_lora.routing(m, probs=probs, top_p=1.0):
        torch.testing.assert_close(m(**minilm_batch).last_hidden_state, minilm(**minilm_batch).last_hidden_state,
                                   rtol=1e-6, atol=1e-6)
        _randomize(m)
        out = m(**minilm_batch).last_hidden_state
    mokernels.save_adapters(m, tmp_path / "ad")
    m2 = mokernels.inject(copy.deepcopy(minilm), "dlp_lora", target_modules=TARGETS, num_adapters=3)
    mokernels.load_adapters(m2, tmp_path / "ad")
    with torch.no_grad(), dlp_lora.routing(m2, probs=probs, top_p=1.0):
        assert torch.equal(m2(**minilm_batch).last_hidden_state, out)


def test_classifier_training_reduces_its_loss(minilm, minilm_batch):
    with torch.no_grad():
        emb = dlp_lora.mean_pool(minilm(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
    emb = emb.repeat(8, 1) + 0.05 * torch.randn(32, 384)
    labels = torch.tensor([0, 1, 2, 1]).repeat(8)
    clf = TaskClassifier(384, 3, hidden=128)
    assert len(clf.net) == 10 and sum(isinstance(x, torch.nn.Linear) for x in clf.net) == 4
    losses = dlp_lora.train_classifier(clf, emb, labels, steps=30, lr=3e-3, batch_size=16,
                                       generator=torch.Generator().manual_seed(0))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert not clf.training
    assert (clf(emb).argmax(-1) == labels).float().mean() > 0.9


def test_minilm_embedder_routes_sentences(minilm, minilm_batch):
    from conftest import MINILM_SENTENCES

    embed = dlp_lora.minilm_embedder()
    with torch.no_grad():
        ref = dlp_lora.mean_pool(minilm(**minilm_batch).last_hidden_state, minilm_batch["attention_mask"])
    torch.testing.assert_close(embed(MINILM_SENTENCES), ref, rtol=1e-5, atol=1e-5)
    m = mokernels.inject(copy.deepcopy(minilm), "dlp_lora", target_modules=TARGETS, num_adapters=3)
    clf = TaskClassifier(384, 3, hidden=64).eval()
    with dlp_lora.routing(m, clf, embedder=embed, inputs=MINILM_SENTENCES) as rt:
        torch.testing.assert_close(rt.routing.weights.sum(-1), torch.ones(4))  # renormalised mixtures
        assert m.mokernels_state.extra["dlp_lora"] is rt


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(dlp_lora.mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_pool_training_reduces_loss(minilm, minilm_batch):
    m = mokernels.inject(copy.deepcopy(minilm), "dlp_lora", target_modules=TARGETS, num_adapters=3,
                         trainable_pool=True)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 2 * 12
    dlp_lora.set_routing(m, probs=torch.eye(3)[[0, 1, 2, 0]])  # sticky: also over the backward
    losses = train_few_steps(m, minilm_batch, params, lr=1e-3, steps=5)
    assert losses[-1] < 0.9 * losses[0], losses


def test_routing_errors(minilm, minilm_batch, tmp_path):
    m = mokernels.inject(copy.deepcopy(minilm), "dlp_lora", target_modules=TARGETS, num_adapters=3)
    with pytest.raises(RuntimeError, match="dlp_lora"):
        m(**minilm_batch)  # no routing given
    with pytest.raises(ValueError, match="pool size"):
        dlp_lora.set_routing(m, logits=torch.randn(4, 5))
    with pytest.raises(ValueError, match="sequences"), dlp_lora.routing(m, logits=torch.randn(3, 3)):
        m(**minilm_batch)
    with pytest.raises(ValueError, match="cover 10 tokens"), \
            dlp_lora.routing(m, logits=torch.randn(2, 3), offsets=torch.tensor([0, 4, 10])):
        m(**minilm_batch)  # packed offsets must cover the flattened tokens exactly
    with pytest.raises(ValueError, match="sorted"):
        dlp_lora.set_routing(m, logits=torch.randn(2, 3), offsets=torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match="exactly one"):
        dlp_lora.set_routing(m, logits=torch.randn(2, 3), probs=torch.rand(2, 3))
    with pytest.raises(ValueError, match="PEFT"):
        dlp_lora.read_peft(tmp_path)


def test_set_routing_through_a_data_parallel_wrapper():
    """Review: dlp_lora.set_routing(DataParallel(model), ...) raised AttributeError ('mokernels_state')."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 6))
    m = mokernels.inject(net, "dlp_lora", target_modules=["0"], num_adapters=2, r=2)
    with torch.no_grad():
        m[0].lora_B.normal_()
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rt = dlp_lora.set_routing(torch.nn.DataParallel(m), probs=probs)
    assert rt is m.mokernels_state.extra[dlp_lora.STATE_KEY]
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(m(x), m[0].reference_forward(x), rtol=1e-5, atol=1e-5)
