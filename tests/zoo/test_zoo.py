"""The vision zoo (``make test-zoo``): torchvision and timm models with random weights.

Each model gets gates, one training step, random masks, and is compacted; the compacted
model's eval outputs must equal the gated model's, with fewer parameters and FLOPs. Every
layer left ungated must come with a reason. The results table goes to the terminal and to
``zoo-results.md`` (``$BMRS_ZOO_TABLE``); docs/models.md shows it.
"""

import re
import warnings
from collections import Counter

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import bmrs  # noqa: E402
from bmrs.compaction import count_flops, count_parameters  # noqa: E402

tvm = torchvision.models
CLASSES = 10

# name -> (builder, input side): the smallest input each architecture takes as it is built
MODELS = {
    "torchvision resnet18": (lambda: tvm.resnet18(num_classes=CLASSES), 32),
    "torchvision resnet50": (lambda: tvm.resnet50(num_classes=CLASSES), 32),
    "torchvision mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=CLASSES), 32),
    "torchvision efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=CLASSES), 32),
    "torchvision convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=CLASSES), 32),
    "torchvision vit_b_16": (lambda: tvm.vit_b_16(num_classes=CLASSES, image_size=32), 32),
    "timm convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=CLASSES), 32),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=CLASSES), 32),
    "timm deit_tiny_patch16_224": (
        lambda: timm.create_model("deit_tiny_patch16_224", num_classes=CLASSES, img_size=32), 32,
    ),
}


_TIED = re.compile(r"its channels are tied to (those of |the parameter )?[\w.]+, which (is not|cannot be) gated")


def _general(why: str) -> str:
    """A reason without the layer it names."""
    if why.startswith("final layer"):
        return "final layer"
    tied = _TIED.fullmatch(why)
    if tied is None:
        return why
    if tied.group(1) == "those of ":
        return "tied to an ungated layer"
    if tied.group(1):
        return "tied to a parameter (layer scale, position embedding)"
    return "tied to a module or op that cannot be gated (LayerNorm, unbind)"


def _skipped_summary(skipped: dict[str, str]) -> str:
    """How many layers were left ungated for each reason."""
    counts = Counter(_general(why) for why in skipped.values())
    return "; ".join(f"{n} {why}" for why, n in counts.most_common()) or "none"


# Known failures: the model, and what goes wrong (strict: a fix makes the run fail until removed).
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=RuntimeError, reason=XFAIL[n])) if n in XFAIL else n
    for n in MODELS
])
def test_gate_train_mask_compact(name, zoo_rows):
    torch.manual_seed(0)
    build, side = MODELS[name]
    model = build()
    with torch.no_grad():  # layer scales start at 1e-6, which would hide any error of a block from the outputs
        for pname, p in model.named_parameters():
            if pname.endswith(("layer_scale", "gamma")):
                p.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layout below holds every reason
        layout = bmrs.attach_gates(model, x)
    assert layout.sites, "nothing gated"
    assert all(why for why in layout.skipped.values())

    # one training step: data loss + KL, every gate gets a gradient
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4) % CLASSES) + bmrs.model_kl(model)
    loss.backward()
    assert all(g.loc.grad is not None for g in bmrs.gates(model).values())
    optimizer.step()

    # random masks, tied channels (a family) masked together as pruning does
    g = torch.Generator().manual_seed(1)
    gates = bmrs.gates(model)
    for family in layout.families:
        drop = torch.rand(family.size, generator=g) < 0.4
        for gate_name, idx in family.members:
            gates[gate_name].mask[torch.tensor(idx)[drop]] = 0

    small = bmrs.compact(model, x)
    model.eval()
    y = torch.randn(2, 3, side, side, generator=g)  # not the example input
    with torch.no_grad():
        ref, out = model(y), small(y)
    diff = float((out - ref).abs().max() / ref.abs().max())
    assert torch.isfinite(ref).all() and diff < 1e-5

    params = count_parameters(model), count_parameters(small)
    flops = count_flops(model, x), count_flops(small, x)
    assert params[1] < params[0] and flops[1] < flops[0]
    kinds = Counter()
    for site in layout.sites.values():
        kinds[site.kind] += site.num_structures
    zoo_rows.append({
        "order": list(MODELS).index(name), "model": name, "input": f"{side}×{side}",
        "gates": len(layout.sites), "structures": ", ".join(f"{n} {k}" for k, n in kinds.items()),
        "skipped": _skipped_summary(layout.skipped), "params": params, "flops": flops, "diff": diff,
    })
