"""Bundled networks: the paper's MLP and LeNet5, a CIFAR-style ResNet, and a small ViT.

Each builder returns a plain ``nn.Module``; :func:`build_model` attaches the gates in the
paper's places (after every activation or BatchNorm) with :func:`bmrs.attach_gates`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .structures.attention import MultiheadSelfAttention
from .compaction import register_architecture
from .errors import BMRSError
from .gates import attach_gates

__all__ = [
    "mlp", "lenet5", "resnet", "resnet56", "vit", "MODELS", "MODEL_OPTIONS", "ModelOption", "build_model", "MLP", "LeNet5",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise BMRSError(f"unknown activation {name!r}; choose from {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class _Layers(nn.Sequential):
    """A bundled sequential network whose layers have names (``fc1``, ``conv2``, ``act1``).

    Checkpoints and compacted files written while these networks were plain
    ``nn.Sequential`` (layers numbered: ``"1.weight"``, ``"2.bmrs_gate.loc"``) still load:
    a leading number that is not a layer's name stands for the layer in that position
    (:meth:`layer_name`).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__(OrderedDict(layers))

    def layer_name(self, name: str) -> str:
        """``name`` (a layer, parameter or state-dict key) with a leading layer number
        replaced by that layer's name: ``"1.weight"`` -> ``"fc1.weight"``."""
        head, dot, rest = name.partition(".")
        if head.isdigit() and head not in self._modules and int(head) < len(self._modules):
            return list(self._modules)[int(head)] + dot + rest
        return name

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            renamed = prefix + self.layer_name(key[len(prefix):])
            if renamed != key:
                state_dict[renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MLP(_Layers):
    """The paper's MLP (built by :func:`mlp`): ``flatten``, then ``fc1``, ``act1``, ...,
    ``fc{k}``, ``act{k}`` for the input and hidden layers, and the classifier ``out``."""


class LeNet5(_Layers):
    """LeNet5 (built by :func:`lenet5`): ``conv1``, ``act1``, ``pool1``, ``conv2``, ``act2``,
    ``pool2``, ``flatten``, ``fc1``, ``act3``, ``fc2``, ``act4`` and the classifier ``out``
    (after ``pad`` for 28x28 inputs)."""


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int = 150,
    hidden_layers: int = 1,
    activation: str = "tanh",
) -> MLP:
    """The paper's MLP: an input layer and ``hidden_layers`` hidden blocks of ``width`` units.

    For 32x32 Fashion-MNIST and the defaults: 1024 -> 150 -> 150 -> 10 with tanh; the layers
    are named ``fc1``, ``act1``, ``fc2``, ``act2`` and ``out`` (see :class:`MLP`).
    """
    if width < 1 or hidden_layers < 0:
        raise BMRSError(f"width must be >= 1 and hidden_layers >= 0, got {width} and {hidden_layers}")
    act = _activation(activation)
    features = 1
    for s in input_shape:
        features *= int(s)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i in range(1, hidden_layers + 2):
        layers += [(f"fc{i}", nn.Linear(features if i == 1 else width, width)), (f"act{i}", act())]
    layers.append(("out", nn.Linear(width, num_classes)))
    return MLP(layers)


def lenet5(input_shape: Sequence[int], num_classes: int, *, activation: str = "relu") -> LeNet5:
    """LeNet5 as in the paper: conv 6 and 16 filters (5x5), max-pool 2, linear 120 and 84.

    28x28 inputs are zero-padded to 32x32. Layer names: see :class:`LeNet5`.
    """
    channels, height, width = (int(s) for s in input_shape)
    if (height, width) not in ((28, 28), (32, 32)):
        raise BMRSError(f"lenet5 takes 28x28 or 32x32 images, got {height}x{width}")
    act = _activation(activation)
    layers: list[tuple[str, nn.Module]] = [("pad", nn.ZeroPad2d(2))] if height == 28 else []
    layers += [
        ("conv1", nn.Conv2d(channels, 6, 5)), ("act1", act()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("act2", act()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)), ("act3", act()),
        ("fc2", nn.Linear(120, 84)), ("act4", act()),
        ("out", nn.Linear(84, num_classes)),
    ]
    return LeNet5(layers)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, blocks: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for stage, mult in enumerate((1, 2, 4)):
            out = width * mult
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                stages.append(_BasicBlock(channels, out, stride))
                channels = out
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet(input_shape: Sequence[int], num_classes: int, *, depth: int = 20, width: int = 16) -> nn.Module:
    """CIFAR-style ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, ...), three stages of
    ``width``, ``2 width`` and ``4 width`` channels, projection shortcuts when the shape
    changes; any number of input channels."""
    if depth < 8 or (depth - 2) % 6:
        raise BMRSError(f"resnet depth must be 6n + 2 (20, 32, 44, 56, ...), got {depth}")
    return _ResNet(int(input_shape[0]), num_classes, (depth - 2) // 6, width)


def resnet56(input_shape: Sequence[int], num_classes: int, *, width: int = 16) -> nn.Module:
    """The CIFAR ResNet-56 of He et al. (2016): three stages of 9 basic blocks with 16, 32
    and 64 channels (``width`` and its multiples), the network of Torch-Pruning's reference
    table; :func:`resnet` with ``depth=56``."""
    return resnet(input_shape, num_classes, depth=56, width=width)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadSelfAttention(dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViT(nn.Module):
    def __init__(
        self, in_channels: int, tokens: int, num_classes: int, patch_size: int, embed_dim: int, depth: int,
        num_heads: int, hidden: int, dropout: float,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(_Block(embed_dim, num_heads, hidden, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, tokens, E)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.drop(x)))
        return self.head(x[:, 0])


def vit(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> nn.Module:
    """A small vision transformer for ``(C, H, W)`` images of any channel count.

    Non-overlapping ``patch_size`` patches embedded by a strided convolution, a class
    token, learned position embeddings, ``depth`` pre-norm blocks of
    :class:`~bmrs.structures.attention.MultiheadSelfAttention` and an MLP (Linear, GELU, Linear of
    ``mlp_ratio * embed_dim`` hidden units), a final LayerNorm and a linear classifier on
    the class token. ``dropout`` acts on the embeddings, the attention weights and the
    MLP outputs.

    Gated by :func:`bmrs.attach_gates`: the heads of every block and the MLP's hidden units
    (after the GELU). The residual stream (patch embedding and MLP outputs) is tied to the
    class token and position embedding and stays ungated.
    """
    if len(input_shape) != 3:
        raise BMRSError(f"vit takes (channels, height, width) inputs, got input_shape {tuple(input_shape)}")
    channels, height, width = (int(s) for s in input_shape)
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise BMRSError(f"vit needs the image size {height}x{width} to be divisible by patch_size {patch_size}")
    if embed_dim < 1 or depth < 1 or num_heads < 1 or embed_dim % num_heads:
        raise BMRSError(
            f"vit needs positive depth and num_heads, and embed_dim divisible by num_heads; got "
            f"embed_dim={embed_dim}, depth={depth}, num_heads={num_heads}"
        )
    hidden = int(round(mlp_ratio * embed_dim))
    if hidden < 1:
        raise BMRSError(f"mlp_ratio * embed_dim must give at least one hidden unit, got mlp_ratio={mlp_ratio}")
    tokens = (height // patch_size) * (width // patch_size)
    return _ViT(channels, tokens, num_classes, patch_size, embed_dim, depth, num_heads, hidden, dropout)


#: The bundled builders by name (also what :func:`bmrs.compaction.load_compact` rebuilds a
#: compacted bundled model with: each is registered as an architecture below).
MODELS = {"mlp": mlp, "lenet5": lenet5, "resnet": resnet, "resnet56": resnet56, "vit": vit}


@dataclass(frozen=True)
class ModelOption:
    """A builder keyword that ``bmrs train`` sets from a command-line flag (an integer)."""

    keyword: str
    help: str


#: The options of each bundled model that ``bmrs train`` takes from the command line, by flag;
#: a model not listed takes none. Adding a model is its builder in :data:`MODELS` and, if the
#: command should reach its options, its entry here: the command's flags and help come from it.
MODEL_OPTIONS: dict[str, dict[str, ModelOption]] = {
    "mlp": {"--width": ModelOption("width", "hidden units"),
            "--hidden-layers": ModelOption("hidden_layers", "hidden blocks after the input layer")},
    "resnet": {"--depth": ModelOption("depth", "layers (6n+2)"), "--width": ModelOption("width", "base channels")},
    "resnet56": {"--width": ModelOption("width", "base channels")},
    "vit": {"--depth": ModelOption("depth", "transformer blocks"), "--patch-size": ModelOption("patch_size", "patch size"),
            "--width": ModelOption("embed_dim", "embedding size")},
}

for _name, _builder in MODELS.items():
    register_architecture(_name, _builder)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, gated: bool = True, **options) -> nn.Module:
    """Build a bundled model by name, with its gates attached unless ``gated=False``.

    Layers that a model leaves ungated by design (the ViT's residual stream) are passed to
    :func:`bmrs.attach_gates` as excluded, so building does not warn about them.
    """
    if name not in MODELS:
        raise BMRSError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    try:
        model = MODELS[name](input_shape, num_classes, **options)
    except (TypeError, ValueError) as err:  # options the builder does not take, or values it refuses
        raise BMRSError(f"model {name} with options {options}: {' '.join(str(err).split())[:200]}") from None
    if gated:
        attach_gates(model, torch.zeros(2, *input_shape), exclude=_ungated_by_design(model))
    return model


def _ungated_by_design(model: nn.Module) -> list[nn.Module]:
    """Layers a bundled model leaves ungated on purpose (so attaching its gates does not warn).

    The ViT's residual stream (patch embedding and MLP outputs) is tied to the class token,
    the position embedding and the LayerNorms, so it cannot be pruned.
    """
    if isinstance(model, _ViT):
        return [model.patch_embed, *(block.mlp[2] for block in model.blocks)]
    return []
