"""Network definitions for the default models (8x8 grayscale digits, 10 classes).

Each network returns logits; :class:`Probabilities` and :class:`NamedProbabilities` add the
softmax for export, so the served artefacts answer with probabilities that sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 8
NUM_CLASSES = 10


@dataclass(frozen=True)
class CNNConfig:
    """Sizes of :class:`DigitsCNN`: two 3x3 convolutions, one 2x2 pooling, two linear layers."""

    channels: int = 16  # first conv; the second has twice as many
    hidden: int = 64
    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE


class DigitsCNN(nn.Module):
    """A small classifier (~40k parameters); the runtime tests use it. The served ``digits``
    is now the distilled student of :mod:`verifier.pipeline` (see fides.defaults.digits)."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        pooled = cfg.image_size // 2
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(2 * c * pooled * pooled, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, 1, 8, 8], pixel values in [0, 1]
        x = F.relu(self.conv1(x))  # [batch, c, 8, 8]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [batch, 2c, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))  # [batch, hidden]
        logits: torch.Tensor = self.fc2(x)  # [batch, 10]
        return logits


@dataclass(frozen=True)
class HeavyConfig:
    """Sizes of :class:`DigitsHeavy`: a convolutional stem and a wide MLP head."""

    channels: int = 32
    width: int = 2048
    depth: int = 3  # linear layers of `width` outputs
    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE


class DigitsHeavy(nn.Module):
    """The benchmark model ``digits_heavy`` (~10M parameters, ~40 MB as ONNX).

    Most of its cost is the wide MLP: at batch 1 that is a matrix-vector product bound by
    memory bandwidth (about 1-2 ms on one CPU core), while a batch of 64 reuses each weight 64
    times. That is the regime in which server-side dynamic batching pays, so it is what the
    serving benchmark needs; a conv-heavy model would be compute-bound and gain little.
    """

    def __init__(self, cfg: HeavyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        pooled = cfg.image_size // 2
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, kernel_size=3, padding=1)
        layers: list[nn.Module] = [nn.Linear(2 * c * pooled * pooled, cfg.width), nn.ReLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(cfg.width, cfg.width), nn.ReLU()]
        layers.append(nn.Linear(cfg.width, cfg.num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, 1, 8, 8]
        x = F.relu(self.conv1(x))  # [batch, c, 8, 8]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [batch, 2c, 4, 4]
        out: torch.Tensor = self.mlp(x.flatten(1))  # [batch, 10] logits
        return out
