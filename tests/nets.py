"""Small networks the tests build: written here, not taken from the package."""

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem, two residual blocks sharing the stem's channels, a classifier."""

    def __init__(self, channels: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.block1 = ResBlock(channels)
        self.block2 = ResBlock(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


def lenet_like(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes),
    )


def small_mlp(inputs: int = 12, hidden: int = 7, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def randomize(model: nn.Module, gates) -> None:
    """Random BatchNorm statistics and affine parameters, and random posteriors for ``gates``
    (``bmrs.gates(model)``), so that compacting the model has something to fold (in place)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
        for gate in gates.values():
            gate.loc.uniform_(-3.0, 0.0)
            gate.log_scale.uniform_(-3.0, 1.0)
