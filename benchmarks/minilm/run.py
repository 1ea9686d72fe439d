"""all-MiniLM-L6-v2 fine-tuned on Debian descriptions: BMRS against Torch-Pruning and
gradient head importance at the same parameter budget, with latency measured in
onnxruntime and eager PyTorch, and the distillation of the sentence embedding.

Per seed, into ``--out/seed<S>/`` (a run whose JSON exists is not run again):

* ``reference``: the pretrained encoder + a linear head on its mean-pooled tokens,
  fine-tuned ``--epochs`` epochs on the section labels (cross-entropy); the unpruned model.
* ``bmrs-n-kr``: gates on the reference's encoder (every head and FFN neuron),
  ``--epochs`` minus ``--recovery-epochs`` epochs of the ELBO, bmrs-n-kr (the recommended
  criterion) deciding at the end of every epoch with its own rule (delta F >= -1, no
  target), then compacted and fine-tuned ``--recovery-epochs`` epochs without gates: BMRS's
  own stopping point, whose parameter count is the budget of the peers.
* ``tp-magnitude``, ``tp-taylor``: Torch-Pruning's ``MetaPruner`` on the reference's
  ``BertModel`` (whole heads of query/key/value, ``prune_num_heads``; FFN neurons; the
  hidden width and the pooler left alone), global ranking, one ratio for heads and
  neurons bisected to the budget; L2 magnitude or first-order Taylor importance (gradients
  of the classification loss over ``--importance-batches`` training batches); then
  ``--epochs`` epochs of fine-tuning.
* ``michel``: head importance of Michel et al. (2019), ``|dL/d xi_h|`` of a head mask
  ``xi`` accumulated over the same batches and normalised per layer, with FFN neurons by the
  L2 norm of their input weights; the lowest heads and neurons removed (one fraction for
  both, bisected to the budget) by bmrs's compaction, then ``--epochs`` epochs of fine-tuning.
* ``distillation``: gates on the pretrained encoder, the schedule of ``bmrs-n-kr`` with
  ``1 - cosine`` to the pretrained embedding as the data term; on the test descriptions, the mean cosine to the pretrained embedding and
  recall@10 of each description's 10 nearest neighbours.
* ``latency``: every model of the seed against the unpruned one, in onnxruntime and eager
  PyTorch, ``--latency-threads`` threads, batches ``--latency-batches``, sequence
  ``--latency-length``, all timed interleaved in one run.

Accuracy is on the test split, in %. ``params_ratio``: parameters of the pruned classifier
(encoder with embeddings, and head) over the unpruned one's. ``latency_ratio_ort``: the
unpruned model's onnxruntime time over the pruned one's at the largest batch. The summary
is ``--out/minilm.json``, shaped as docs/results/minilm.json.

    python benchmarks/minilm/run.py --out runs/minilm                       # the full run
    python benchmarks/minilm/run.py --out /tmp/smoke --train-size 64 --eval-size 64 \\
        --length 32 --epochs 2 --recovery-epochs 1 --seeds 0 --latency-length 32 --latency-repeats 3  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm

import bmrs
from bmrs.integrations.transformers import layer_widths

PEERS = ("tp-magnitude", "tp-taylor", "michel")
CRITERION = bmrs.pruning.RECOMMENDED["method"]
EXACT_GATES = -12.0  # init log sigma of gates used only to remove structures (E[theta] = 1 - 5e-6)
FORMAT = "bmrs-minilm-benchmark/1"  # in minilm.json and in minilm.png's metadata: files this script may replace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory of the runs and of minilm.json")
    p.add_argument("--data", type=Path, default=minilm.DATA, help="the descriptions (default: the committed file)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of every run (default 4)")
    p.add_argument("--recovery-epochs", type=int, default=2,
                   help="of BMRS's --epochs, the last ones: its compacted model fine-tuned without gates (default 2)")
    p.add_argument("--train-size", type=int, default=0, help="training descriptions, a seeded subset (0: all)")
    p.add_argument("--eval-size", type=int, default=0, help="test descriptions evaluated (0: all)")
    p.add_argument("--length", type=int, default=128, help="tokens per description in training and evaluation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the encoder (AdamW)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the linear head")
    p.add_argument("--gate-lr", type=float, default=0.1, help="learning rate of the gates' posteriors (default 0.1)")
    p.add_argument("--budget", type=float, default=None,
                   help="parameters the peers keep, a fraction of the unpruned classifier's (default: BMRS's own stop)")
    p.add_argument("--distill-tolerance", type=float, default=None, metavar="T",
                   help="distillation's data term as a likelihood: a von Mises-Fisher whose mean cosine distance "
                        "is T, with the per-example ELBO's KL (default: 1 - cosine and the recommended KL)")
    p.add_argument("--importance-batches", type=int, default=16, help="batches of the Taylor and Michel importances")
    p.add_argument("--methods", nargs="+", default=["bmrs-n-kr", *PEERS, "distillation"],
                   choices=["bmrs-n-kr", *PEERS, "distillation"], help="runs besides the reference (default all)")
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--latency-length", type=int, default=128)
    p.add_argument("--latency-threads", type=int, default=1)
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="threads of training (default: PyTorch's)")
    p.add_argument("--device", default="cpu", help="device of training (cpu, cuda); latency is on the CPU")
    p.add_argument("--with", dest="also", action="append", default=[], metavar="LABEL=DIR",
                   help="add the summary of another run folder (its minilm.json, e.g. another schedule) to this "
                        "one's rows as 'METHOD (LABEL)', and its distillation under 'distillation_variants' "
                        "(the last '=' separates LABEL from DIR)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "length", "batch_size", "importance_batches", "latency_repeats", "latency_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.distill_tolerance is not None and not 0 < args.distill_tolerance < 1:
        p.error("--distill-tolerance must lie in (0, 1)")
    for item in args.also:
        if "=" not in item or not item.rsplit("=", 1)[0]:
            p.error(f"--with takes LABEL=DIR, got {item!r}")
    if not 0 <= args.recovery_epochs < args.epochs:
        p.error("--recovery-epochs must lie in [0, --epochs)")
    if args.budget is not None and not 0 < args.budget <= 1:
        p.error("--budget must lie in (0, 1]")
    if not 2 <= args.length <= 512 or not 2 <= args.latency_length <= 512:
        p.error("--length and --latency-length must lie in [2, 512]")
    return args


# --- data ---------------------------------------------------------------------------------------


def prepare_data(args, tokenizer, seed: int) -> dict:
    splits, labels = minilm.load_descriptions(args.data)
    g = torch.Generator().manual_seed(seed)
    train = splits["train"]
    if args.train_size:
        train = [train[i] for i in torch.randperm(len(train), generator=g)[:args.train_size].tolist()]
    test = splits["test"]  # a subset is the same for every seed, drawn across the sections (the file is sorted)
    if args.eval_size:
        test = [test[i] for i in torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.eval_size]]
    out = {"labels": labels}
    for name, rows in (("train", train), ("test", test)):
        enc = minilm.tokenize(tokenizer, [r["text"] for r in rows], args.length)
        out[name] = (enc, torch.tensor([labels.index(r["label"]) for r in rows]))
    return out


def batches(data, batch_size: int, generator: torch.Generator | None = None):
    enc, y = data
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield {k: v[idx] for k, v in enc.items()}, y[idx]


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


# --- training -------------------------------------------------------------------------------------


def optimiser(net: torch.nn.Module, args) -> torch.optim.Optimizer:
    gates = {id(p) for g in bmrs.gates(net.encoder if hasattr(net, "encoder") else net).values() for p in g.parameters()}
    head = {id(p) for p in net.head.parameters()} if hasattr(net, "head") else set()
    groups = [
        {"params": [p for p in net.parameters() if id(p) not in gates | head], "lr": args.lr, "weight_decay": 0.01},
        {"params": [p for p in net.parameters() if id(p) in head], "lr": args.head_lr, "weight_decay": 0.01},
        {"params": [p for p in net.parameters() if id(p) in gates], "lr": args.gate_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def fit(net, data, args, seed: int, label: str, loss_of, prune_each_epoch=None, epochs: int | None = None) -> list[dict]:
    """``epochs`` (default ``--epochs``) epochs of ``loss_of(net, inputs, targets) -> (loss, parts)``;
    ``prune_each_epoch(net)`` after each epoch. Returns per-epoch logs."""
    epochs = args.epochs if epochs is None else epochs
    net.to(args.device)
    opt = optimiser(net, args)
    g = torch.Generator().manual_seed(seed)
    logs = []
    for epoch in range(epochs):
        net.train()
        steps = math.ceil(len(data[1]) / args.batch_size)
        total, seen = 0.0, 0
        bar = tqdm(batches(data, args.batch_size, g), total=steps, desc=f"{label} epoch {epoch + 1}/{epochs}",
                   disable=args.no_progress, leave=False)
        for inputs, y in bar:
            loss, _ = loss_of(net, _to(inputs, args.device), y.to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        if not math.isfinite(total):
            raise RuntimeError(f"{label}: the loss is not finite in epoch {epoch + 1}")
        log = {"epoch": epoch + 1, "loss": total / seen}
        if prune_each_epoch is not None:
            log["kept"] = prune_each_epoch(net)
        logs.append(log)
        print(f"{label} epoch {epoch + 1}: " + json.dumps(log), flush=True)
    return logs


def classification_loss(net, inputs, y):
    loss = F.cross_entropy(net(**inputs), y)
    return loss, {}


def elbo_classification(net, inputs, y):
    loss, data, kl = bmrs.elbo_loss(net(**inputs), y, net.encoder)
    return loss, {"data": data, "kl": kl}


@torch.no_grad()
def accuracy(net, data, args) -> float:
    net.eval().to(args.device)
    right = 0
    for inputs, y in batches(data, 4 * args.batch_size):
        right += int((net(**_to(inputs, args.device)).argmax(-1).cpu() == y).sum())
    return 100.0 * right / len(data[1])


def count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def bmrs_prune(encoder) -> dict:
    """bmrs-n-kr's own decision; kept heads and neurons."""
    bmrs.prune(encoder, CRITERION)
    return _kept(encoder)


def _kept(encoder) -> dict:
    layout = bmrs.gate_layout(encoder)
    kept = bmrs.kept_structures(encoder)
    out = {}
    for name, site in layout.sites.items():
        out[site.kind] = out.get(site.kind, 0) + kept[name]
    return out


# --- the runs ---------------------------------------------------------------------------------------


def run_reference(ctx, seed):
    torch.manual_seed(seed)
    net = minilm.Classifier(copy.deepcopy(ctx["pretrained"]), len(ctx["data"]["labels"]))
    logs = fit(net, ctx["data"]["train"], ctx["args"], seed, "reference", classification_loss)
    net.cpu()
    torch.save(net.state_dict(), ctx["dir"] / "reference.pt")
    return {"accuracy": accuracy(net, ctx["data"]["test"], ctx["args"]), "params": count(net), "epochs": logs}, net


def _reference(ctx, seed):
    net = minilm.Classifier(copy.deepcopy(ctx["pretrained"]), len(ctx["data"]["labels"]))
    net.load_state_dict(torch.load(ctx["dir"] / "reference.pt", weights_only=True))
    return net.eval()


def _save(ctx, name, net):
    """The pruned classifier: the encoder with save_compact, the head beside it."""
    enc = net.encoder.cpu()
    for attr, values in layer_widths(enc).items():
        setattr(enc.config, attr, values)
    bmrs.save_compact(enc, ctx["dir"] / f"{name}.encoder.pt")
    torch.save(net.head.state_dict(), ctx["dir"] / f"{name}.head.pt")


def _load(ctx, name, classes):
    enc = bmrs.load_compact(ctx["dir"] / f"{name}.encoder.pt")
    enc.set_attn_implementation("eager")
    head = torch.nn.Linear(enc.config.hidden_size, classes)
    head.load_state_dict(torch.load(ctx["dir"] / f"{name}.head.pt", weights_only=True))
    return minilm.Classifier(enc, classes, head).eval()


def run_bmrs(ctx, seed):
    """Gates on the reference's encoder, ``--epochs - --recovery-epochs`` epochs of the ELBO
    with bmrs-n-kr's decision after each, then the compacted classifier fine-tuned
    ``--recovery-epochs`` epochs without gates (cross-entropy)."""
    args, data = ctx["args"], ctx["data"]
    torch.manual_seed(seed)
    net = _reference(ctx, seed)
    example = {k: v[:4] for k, v in data["train"][0].items()}
    bmrs.attach_gates(net.encoder, example)
    full = count(_reference(ctx, seed))
    logs = fit(net, data["train"], args, seed, CRITERION, elbo_classification, lambda n: bmrs_prune(n.encoder),
               epochs=args.epochs - args.recovery_epochs)
    net.cpu().eval()
    small = minilm.Classifier(bmrs.compact(net.encoder, example), len(data["labels"]), copy.deepcopy(net.head))
    at_stop = accuracy(small, data["test"], args)
    if args.recovery_epochs:
        logs += fit(small, data["train"], args, seed, f"{CRITERION} recovery", classification_loss,
                    epochs=args.recovery_epochs)
        small.cpu().eval()
    _save(ctx, CRITERION, small)
    return {"accuracy": accuracy(small, data["test"], args), "accuracy_at_stop": at_stop, "params": count(small),
            "params_ratio": count(small) / full, "widths": layer_widths(small.encoder), "epochs": logs}


def _gradients(net, ctx, seed, extra=None):
    """Gradients of the classification loss over ``--importance-batches`` training batches."""
    args = ctx["args"]
    net.train().to(args.device)
    net.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(10_000 + seed)
    for i, (inputs, y) in enumerate(batches(ctx["data"]["train"], args.batch_size, g)):
        if i == args.importance_batches:
            break
        F.cross_entropy(net(**_to(inputs, args.device)), y.to(args.device)).backward()
    net.eval().cpu()


def _tp_prune(net, example, ratio, importance):
    import torch_pruning as tp

    original, net = net, copy.deepcopy(net)
    for new, old in zip(net.parameters(), original.parameters()):  # deepcopy leaves out the gradients (Taylor)
        new.grad = None if old.grad is None else old.grad.clone()
    enc = net.encoder
    num_heads, ignored = {}, [enc.pooler.dense] if enc.pooler is not None else []
    for layer in enc.encoder.layer:
        a = layer.attention.self
        for lin in (a.query, a.key, a.value):
            num_heads[lin] = a.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]  # writers of the hidden width
    pruner = tp.pruner.MetaPruner(
        enc, example_inputs=example, importance=importance, global_pruning=True, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, output_transform=lambda out: out.last_hidden_state.sum(),
    )
    pruner.step()
    for layer in enc.encoder.layer:  # Torch-Pruning leaves the attention's head counts as they were
        a = layer.attention.self
        a.num_attention_heads = a.query.out_features // a.attention_head_size
        a.all_head_size = a.query.out_features
    return net


def _bisect(build, budget: int, steps: int = 14):
    """The smallest ratio in [0, 1] whose pruned network has at most ``budget`` parameters."""
    unpruned = build(0.0)
    if count(unpruned) <= budget:
        return 0.0, unpruned
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        net = build(mid)
        if count(net) <= budget:
            hi, best = mid, (mid, net)
        else:
            lo = mid
    if best is None:
        best = (hi, build(hi))
    return best


def run_peer(ctx, seed, name, budget):
    import torch_pruning as tp

    args, data = ctx["args"], ctx["data"]
    torch.manual_seed(seed)
    net = _reference(ctx, seed)
    example = {k: v[:2] for k, v in data["train"][0].items()}
    full = count(net)
    if name == "tp-magnitude":
        importance = tp.importance.MagnitudeImportance(p=2)
        ratio, small = _bisect(lambda r: _tp_prune(net, example, r, importance), budget)
    elif name == "tp-taylor":
        _gradients(net, ctx, seed)
        importance = tp.importance.TaylorImportance()
        ratio, small = _bisect(lambda r: _tp_prune(net, example, r, importance), budget)
    else:
        head_score, neuron_score = _michel_scores(net, ctx, seed)
        ratio, small = _bisect(lambda r: _remove_lowest(net, example, head_score, neuron_score, r), budget)
    small.zero_grad(set_to_none=True)
    logs = fit(small, data["train"], args, seed, name, classification_loss)
    small.cpu().eval()
    _save(ctx, name, small)
    return {"accuracy": accuracy(small, data["test"], args), "params": count(small), "params_ratio": count(small) / full,
            "ratio": ratio, "widths": layer_widths(small.encoder), "epochs": logs}


def _michel_scores(net, ctx, seed):
    """Michel et al. (2019): I_h = sum over batches of |dL/d xi_h| for a head mask xi = 1 at the
    input of each attention output projection, normalised to unit L2 norm per layer; FFN
    neurons: the L2 norm of their row of ``intermediate.dense``."""
    layers = net.encoder.encoder.layer
    heads = layers[0].attention.self.num_attention_heads
    xi = [torch.ones(heads, requires_grad=True) for _ in layers]
    hooks = []
    for layer, x in zip(layers, xi):
        width = layer.attention.self.attention_head_size

        def pre(module, a, x=x, width=width):
            h = a[0]
            return (h.view(*h.shape[:-1], heads, width) * x[:, None]).view(h.shape),
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(pre))
    scores = torch.zeros(len(layers), heads)
    args = ctx["args"]
    g = torch.Generator().manual_seed(10_000 + seed)
    net.train()
    try:
        for i, (inputs, y) in enumerate(batches(ctx["data"]["train"], args.batch_size, g)):
            if i == args.importance_batches:
                break
            grads = torch.autograd.grad(F.cross_entropy(net(**inputs), y), xi)
            scores += torch.stack([gr.abs() for gr in grads])
    finally:
        for h in hooks:
            h.remove()
        net.eval()
    scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-20)
    neurons = [layer.intermediate.dense.weight.detach().norm(dim=1) for layer in layers]
    return scores, neurons


def _remove_lowest(net, example, head_score, neuron_score, ratio):
    """The classifier without the ``ratio`` lowest-scored heads and FFN neurons (ranked over
    all layers), removed by bmrs's compaction."""
    net = copy.deepcopy(net)
    layout = bmrs.attach_gates(net.encoder, example, init_log_scale=EXACT_GATES)
    with torch.no_grad():  # gates that only remove: E[theta] = 1 exactly on kept structures
        for gate in bmrs.gates(net.encoder).values():
            gate.log_scale.fill_(-30.0)
    flat_h = head_score.flatten()
    cut_h = flat_h.sort().values[int(ratio * len(flat_h)) - 1] if int(ratio * len(flat_h)) else -math.inf
    flat_n = torch.cat(neuron_score)
    cut_n = flat_n.sort().values[int(ratio * len(flat_n)) - 1] if int(ratio * len(flat_n)) else -math.inf
    gates = bmrs.gates(net.encoder)
    for name, site in layout.sites.items():
        layer = int(site.producer.split(".")[2])
        keep = head_score[layer] > cut_h if site.kind == "attention-heads" else neuron_score[layer] > cut_n
        gates[name].mask.copy_(keep.float())
    net.encoder = bmrs.compact(net.encoder, example)
    return net


def concentration(tolerance: float, dim: int) -> float:
    """The concentration kappa of a von Mises-Fisher distribution on the unit sphere in
    ``dim`` dimensions whose mean cosine distance ``1 - E[cos]`` is ``tolerance``:
    ``E[cos] = I_{d/2}(kappa) / I_{d/2-1}(kappa)`` solved for kappa (about
    ``(d - 1) / (2 tolerance)`` when the tolerance is small)."""
    import mpmath

    with mpmath.workdps(40):  # Bessel functions of order ~d/2 underflow in floating point at small kappa
        lo, hi = mpmath.mpf(-7), mpmath.mpf(28)  # log kappa; 1 - E[cos] falls from about 1 to about 1e-10
        for _ in range(80):  # bisection: 1 - E[cos] decreases with kappa
            mid = (lo + hi) / 2
            kappa = mpmath.exp(mid)
            if 1 - mpmath.besseli(dim / 2, kappa) / mpmath.besseli(dim / 2 - 1, kappa) > tolerance:
                lo = mid
            else:
                hi = mid
        return float(mpmath.exp((lo + hi) / 2))


def run_distillation(ctx, seed):
    """Gates on the pretrained encoder, the ELBO with ``1 - cosine`` to the pretrained
    embedding as its data term and bmrs-n-kr after each epoch, then the compacted encoder
    fine-tuned on the same data term without gates: the schedule of :func:`run_bmrs`.

    With ``--distill-tolerance T`` the data term is a likelihood instead: the negative log
    density of a von Mises-Fisher around the pretrained embedding, ``kappa (1 - cosine)``
    (plus a constant) with :func:`concentration`, and the KL is the per-example ELBO's
    (summed, over the number of training descriptions)."""
    args, data = ctx["args"], ctx["data"]
    if args.distill_tolerance is None:
        scale, reduction = 1.0, {}
    else:
        scale = concentration(args.distill_tolerance, ctx["pretrained"].config.hidden_size)
        reduction = {"kl_reduction": "elbo", "dataset_size": len(data["train"][1])}
    torch.manual_seed(seed)
    teacher = minilm.Embedder(ctx["pretrained"]).eval()
    student = minilm.Embedder(copy.deepcopy(ctx["pretrained"]))
    example = {k: v[:4] for k, v in data["train"][0].items()}
    bmrs.attach_gates(student.encoder, example)
    teacher.to(args.device)

    def distance(net, inputs):
        with torch.no_grad():
            target = teacher(**inputs)
        return scale * (1 - (net(**inputs) * target).sum(-1)).mean()

    def elbo(net, inputs, _):
        loss, _, kl = bmrs.elbo_loss(distance(net, inputs), None, net.encoder, loss_fn=lambda out, _: out, **reduction)
        return loss, {"kl": kl}

    logs = fit(student, data["train"], args, seed, "distillation", elbo, lambda n: bmrs_prune(n.encoder),
               epochs=args.epochs - args.recovery_epochs)
    student.cpu().eval()
    small = minilm.Embedder(bmrs.compact(student.encoder, example))
    if args.recovery_epochs:
        logs += fit(small, data["train"], args, seed, "distillation recovery", lambda n, x, _: (distance(n, x), {}),
                    epochs=args.recovery_epochs)
        small.cpu().eval()
    teacher.cpu()
    small = small.encoder
    for attr, values in layer_widths(small).items():
        setattr(small.config, attr, values)
    bmrs.save_compact(small, ctx["dir"] / "distillation.encoder.pt")
    a, b = embeddings(teacher, data["test"], args), embeddings(minilm.Embedder(small), data["test"], args)
    return {"cosine": float((a * b).sum(-1).mean()), "recall_at_10": recall_at(a, b, 10), "data_scale": scale,
            "params": count(small), "params_ratio": count(small) / count(ctx["pretrained"]),
            "widths": layer_widths(small), "epochs": logs}


@torch.no_grad()
def embeddings(net, data, args):
    net.eval()
    return torch.cat([net(**inputs) for inputs, _ in batches(data, 4 * args.batch_size)])


def recall_at(reference: torch.Tensor, other: torch.Tensor, k: int) -> float:
    """Mean share of each item's ``k`` nearest neighbours (cosine, itself left out) under
    ``reference`` that are also among its ``k`` nearest under ``other``."""
    k = min(k, len(reference) - 1)
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=1).indices
    a, b = nearest(reference), nearest(other)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1).double()
    return float(hits.mean() / k)


# --- latency ----------------------------------------------------------------------------------------


def run_latency(ctx, seed, names):
    """Every model of the seed and the unpruned one, in onnxruntime and eager PyTorch, timed
    interleaved: per repetition, every (runtime, model) pair once, in a rotating order."""
    args, classes = ctx["args"], len(ctx["data"]["labels"])
    torch.set_num_threads(args.latency_threads)
    nets = {"unpruned": _reference(ctx, seed)}
    for name in names:
        if name == "distillation":
            enc = bmrs.load_compact(ctx["dir"] / "distillation.encoder.pt")
            enc.set_attn_implementation("eager")
            nets[name] = minilm.Embedder(enc).eval()
            nets["unpruned-embedder"] = minilm.Embedder(ctx["pretrained"]).eval()
        else:
            nets[name] = _load(ctx, name, classes)
    g = torch.Generator().manual_seed(seed)
    out = {"threads": args.latency_threads, "length": args.latency_length, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        example = {"input_ids": torch.randint(1000, 30000, (2, args.latency_length), generator=g),
                   "attention_mask": torch.ones(2, args.latency_length, dtype=torch.long)}
        for name, net in tqdm(nets.items(), desc="onnx export", disable=args.no_progress, leave=False):
            ort = minilm.onnx_session(net, example, Path(tmp) / f"{name}.onnx", threads=args.latency_threads)
            runners[("onnxruntime", name)] = ort
            runners[("eager", name)] = net
        for batch in args.latency_batches:
            x = {"input_ids": torch.randint(1000, 30000, (batch, args.latency_length), generator=g),
                 "attention_mask": torch.ones(batch, args.latency_length, dtype=torch.long)}
            with torch.inference_mode():
                for key, run in runners.items():  # warm-up, and the outputs of both runtimes agree
                    first = run(x) if key[0] == "onnxruntime" else run(**x)
                    if key[0] == "onnxruntime":
                        with torch.no_grad():
                            ref = runners[("eager", key[1])](**x)
                        err = float((first - ref).abs().max() / ref.abs().max())
                        if err > 1e-3:
                            raise RuntimeError(f"onnxruntime's {key[1]} differs from PyTorch's (relative {err:.2g})")
                times = {key: [] for key in runners}
                keys = list(runners)
                for r in tqdm(range(args.latency_repeats), desc=f"latency batch {batch}", disable=args.no_progress,
                              leave=False):
                    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                        t = time.perf_counter()
                        runners[key](x) if key[0] == "onnxruntime" else runners[key](**x)
                        times[key].append(time.perf_counter() - t)
            for (runtime, name), ts in times.items():
                out.setdefault(runtime, {}).setdefault(name, {})[str(batch)] = 1e3 * statistics.median(ts)
    out["load_after"] = os.getloadavg()[0]
    return out


# --- the summary --------------------------------------------------------------------------------------


def _mean_std(values):
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summary(args) -> dict:
    seeds = [s for s in args.seeds if (args.out / f"seed{s}" / "latency.json").is_file()]
    runs = {s: {p.stem: json.loads(p.read_text()) for p in (args.out / f"seed{s}").glob("*.json")} for s in seeds}
    big = str(max(args.latency_batches))

    small = str(min(args.latency_batches))

    def ratio(lat, name, runtime, base="unpruned", batch=big):
        return lat[runtime][base][batch] / lat[runtime][name][batch]

    def widths(rows):
        return {"heads_kept": statistics.fmean(sum(r["widths"]["layer_num_attention_heads"]) for r in rows),
                "ffn_kept": statistics.fmean(sum(r["widths"]["layer_intermediate_size"]) for r in rows)}

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.data == minilm.DATA:  # the committed file, by its place in the repository
        config["data"] = str(minilm.DATA.relative_to(minilm.HERE.parents[1]))
    out = {"format": FORMAT, "base": {}, "rows": {}, "config": config}
    if not seeds:
        return out
    out["base"] = {"accuracy": _mean_std([runs[s]["reference"]["accuracy"] for s in seeds])[0],
                   "accuracy_seeds": [runs[s]["reference"]["accuracy"] for s in seeds]}
    for name in ["bmrs-n-kr", *PEERS]:
        have = [s for s in seeds if name in runs[s]]
        if not have:
            continue
        per_seed = {"accuracy": [runs[s][name]["accuracy"] for s in have],
                    "latency_ratio_ort": [ratio(runs[s]["latency"], name, "onnxruntime") for s in have],
                    "latency_ratio_eager": [ratio(runs[s]["latency"], name, "eager") for s in have]}
        row = {"accuracy": _mean_std(per_seed["accuracy"]),
               "params_ratio": statistics.fmean(runs[s][name]["params_ratio"] for s in have),
               "latency_ratio_ort": statistics.fmean(per_seed["latency_ratio_ort"]),
               "latency_ratio_eager": statistics.fmean(per_seed["latency_ratio_eager"]),
               "latency_ratio_ort_b1": statistics.fmean(
                   ratio(runs[s]["latency"], name, "onnxruntime", batch=small) for s in have),
               "latency_ratio_eager_b1": statistics.fmean(
                   ratio(runs[s]["latency"], name, "eager", batch=small) for s in have),
               **widths([runs[s][name] for s in have]), "seeds": len(have), "per_seed": per_seed}
        if all("accuracy_at_stop" in runs[s][name] for s in have):  # BMRS: before its recovery epochs
            row["accuracy_at_stop"] = _mean_std([runs[s][name]["accuracy_at_stop"] for s in have])
        out["rows"][name] = row
    if "bmrs-n-kr" in out["rows"]:
        out["bmrs_stop"] = dict(out["rows"]["bmrs-n-kr"])
    have = [s for s in seeds if "distillation" in runs[s]]
    if have:
        d = [runs[s]["distillation"] for s in have]
        out["distillation"] = {
            "cosine": _mean_std([x["cosine"] for x in d]), "recall_at_10": _mean_std([x["recall_at_10"] for x in d]),
            "params_ratio": statistics.fmean(x["params_ratio"] for x in d),
            "latency_ratio_ort": statistics.fmean(
                ratio(runs[s]["latency"], "distillation", "onnxruntime", "unpruned-embedder") for s in have),
            "latency_ratio_eager": statistics.fmean(
                ratio(runs[s]["latency"], "distillation", "eager", "unpruned-embedder") for s in have),
            **widths(d), "seeds": len(have)}
    out["cost_s"] = {s: {k: v.get("wall_s") for k, v in runs[s].items()} for s in seeds}
    return out


def figure(result: dict, path: Path) -> None:
    """Test accuracy against the measured speed-up at the largest latency batch, in
    onnxruntime and in eager PyTorch (a panel each): every seed of a method as a small
    point, its mean with the accuracy's standard deviation as a large one; the unpruned
    model's accuracy as a line, one point below it dashed. Rows added with ``--with`` (named
    ``METHOD (LABEL)``) have their method's colour and hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = max(result["config"]["latency_batches"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    colours = dict(zip(["bmrs-n-kr", *PEERS], ["tab:red", "tab:blue", "tab:green", "tab:purple"]))
    for ax, runtime in zip(axes, ("ort", "eager")):
        for name, row in result["rows"].items():
            c = colours.get(name.split(" (")[0], "black")
            hollow = {"markerfacecolor": "white", "markeredgewidth": 1.6} if " (" in name else {}
            ax.scatter(row["per_seed"][f"latency_ratio_{runtime}"], row["per_seed"]["accuracy"], s=14, color=c, alpha=0.5)
            ax.errorbar([row[f"latency_ratio_{runtime}"]], [row["accuracy"][0]], yerr=[row["accuracy"][1]], capsize=3,
                        fmt="*" if name.startswith("bmrs") else "o", markersize=14 if name.startswith("bmrs") else 8,
                        color=c, label=f"{name}: {row['params_ratio']:.1%} of the parameters", **hollow)
        base = result["base"]["accuracy"]
        ax.axhline(base, color="grey", linewidth=0.9, label="unpruned (fine-tuned)")
        ax.axhline(base - 1, color="grey", linewidth=0.9, linestyle="--", label="1 point below it")
        ax.axvline(1.0, color="grey", linewidth=0.6)
        ax.set_title("onnxruntime" if runtime == "ort" else "eager PyTorch")
        ax.set_xlabel(f"measured speed-up at batch {big}, sequence {result['config']['latency_length']}, "
                      f"{result['config']['latency_threads']} thread(s) (unpruned / pruned)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (%), {len(result['base']['accuracy_seeds'])} seeds")
    handles, names = axes[0].get_legend_handles_labels()  # below the panels: no point hidden behind it
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, frameon=False)
    title = "all-MiniLM-L6-v2 classifying Debian package sections: BMRS's own stop (star) and the peers at its parameter count"
    labels = sorted({name.split(" (", 1)[1][:-1] for name in result["rows"] if " (" in name})
    fig.suptitle(title + (f"\n(hollow: {', '.join(labels)})" if labels else ""))
    rows = math.ceil(len(names) / 3)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Description": FORMAT})
    plt.close(fig)


def table(result: dict) -> str:
    """The summary as a markdown table: a row per method, then the distillation."""
    big, small = max(result["config"]["latency_batches"]), min(result["config"]["latency_batches"])
    base = result["base"]["accuracy"]
    lines = [f"| method | accuracy (%) | vs unpruned (points) | parameters kept | heads kept (of 72) | FFN neurons kept "
             f"(of 9,216) | speed-up ort b{big} | ort b{small} | eager b{big} | eager b{small} | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| unpruned (fine-tuned) | {base:.2f} | | 100 % | 72 | 9,216 | 1 | 1 | 1 | 1 | "
             f"{len(result['base']['accuracy_seeds'])} |"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f} | {r['accuracy'][0] - base:+.2f} | "
                     f"{r['params_ratio']:.1%} | {r['heads_kept']:.1f} | {r['ffn_kept']:,.0f} | "
                     f"{r['latency_ratio_ort']:.2f}x | {r['latency_ratio_ort_b1']:.2f}x | {r['latency_ratio_eager']:.2f}x | "
                     f"{r['latency_ratio_eager_b1']:.2f}x | {r['seeds']} |")
    distillations = ([("bmrs-n-kr", result["distillation"])] if "distillation" in result else []) + [
        (f"bmrs-n-kr ({label})", d) for label, d in result.get("distillation_variants", {}).items()]
    if distillations:
        lines += ["", f"| distillation | cosine to the pretrained embedding | recall@10 | parameters kept | heads kept | "
                  f"FFN neurons kept | speed-up ort b{big} | eager b{big} | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in distillations:
        lines.append(f"| {name} | {d['cosine'][0]:.4f} ± {d['cosine'][1]:.4f} | {d['recall_at_10'][0]:.3f} ± "
                     f"{d['recall_at_10'][1]:.3f} | {d['params_ratio']:.1%} | {d['heads_kept']:.1f} | {d['ffn_kept']:,.0f} | "
                     f"{d['latency_ratio_ort']:.2f}x | {d['latency_ratio_eager']:.2f}x | {d['seeds']} |")
    return "\n".join(lines) + "\n"


def check_writable(path: Path) -> None:
    """Refuse to replace a file at ``path`` that this script did not write (its format marker)."""
    if path.exists() and (not path.is_file() or FORMAT.encode() not in path.read_bytes()[:4096]):
        raise bmrs.BMRSError(f"{path} exists and was not written by this script; move it away or choose another --out")


def add_variants(result: dict, also: list[str]) -> dict:
    """``result`` with the rows and distillation of each ``LABEL=DIR``'s ``minilm.json``
    (written by this script) added under that label."""
    for item in also:
        label, folder = item.rsplit("=", 1)  # a label may hold "=" ("T=0.01")
        path = Path(folder) / "minilm.json"
        if not path.is_file():
            raise bmrs.BMRSError(f"--with {item}: {path} does not exist (run that folder's summary first)")
        other = json.loads(path.read_text())
        if not isinstance(other, dict) or other.get("format") != FORMAT:
            raise bmrs.BMRSError(f"--with {item}: {path} was not written by this script")
        for name, row in other.get("rows", {}).items():
            result["rows"][f"{name} ({label})"] = row
        if "distillation" in other:
            result.setdefault("distillation_variants", {})[label] = other["distillation"]
        result.setdefault("variants", {})[label] = other["config"]
    return result


def once(folder: Path, seed: int, name: str, body) -> dict:
    """The result of run ``name`` of a seed: read from its JSON if it has run, else run
    ``body()`` (seeded, timed) and write the JSON (a temporary name, then renamed)."""
    path = folder / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    bmrs.seed_everything(seed)
    start = time.perf_counter()
    result = body()
    result = result[0] if isinstance(result, tuple) else result
    result["wall_s"] = time.perf_counter() - start
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"seed {seed} {name}: " + json.dumps({k: v for k, v in result.items() if k not in ("epochs", "widths")}),
          flush=True)
    return result


def run_seed(args, pretrained, tokenizer, seed: int) -> None:
    folder = args.out / f"seed{seed}"
    folder.mkdir(exist_ok=True)
    ctx = {"args": args, "pretrained": pretrained, "data": prepare_data(args, tokenizer, seed), "dir": folder}
    once(folder, seed, "reference", lambda: run_reference(ctx, seed))
    budget = None
    if "bmrs-n-kr" in args.methods or any(m in PEERS for m in args.methods):
        budget = once(folder, seed, "bmrs-n-kr", lambda: run_bmrs(ctx, seed))["params"]
    if args.budget is not None:
        budget = int(args.budget * count(minilm.Classifier(pretrained, len(ctx["data"]["labels"]))))
    for name in PEERS:
        if name in args.methods:
            once(folder, seed, name, lambda name=name: run_peer(ctx, seed, name, budget))
    if "distillation" in args.methods:
        once(folder, seed, "distillation", lambda: run_distillation(ctx, seed))
    done = [m for m in ("bmrs-n-kr", *PEERS, "distillation") if (folder / f"{m}.json").is_file()]
    once(folder, seed, "latency", lambda: run_latency(ctx, seed, done))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("minilm.json", "minilm.png"):
        check_writable(args.out / name)
    pretrained, tokenizer = minilm.load_checkpoint()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"device {args.device}", flush=True)
    threads = torch.get_num_threads()
    for seed in args.seeds:
        run_seed(args, pretrained, tokenizer, seed)
        torch.set_num_threads(threads)  # the latency run sets its own
    result = add_variants(summary(args), args.also)
    path = args.out / "minilm.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if result["rows"]:
        figure(result, args.out / "minilm.png")
        print(f"wrote {args.out / 'minilm.png'}")
    if result["base"]:
        print(table(result), end="")
        stop = result.get("bmrs_stop")
        if stop:
            print(f"BMRS's own stop: {stop['accuracy'][0]:.2f} ± {stop['accuracy'][1]:.2f} % against "
                  f"{result['base']['accuracy']:.2f} % unpruned, {stop['latency_ratio_ort']:.2f}x faster in onnxruntime, "
                  f"{stop['params_ratio']:.1%} of the parameters, {stop['seeds']} seed(s)")


if __name__ == "__main__":
    try:
        main()
    except bmrs.BMRSError as e:
        sys.exit(f"run.py: {e}")
