"""The convolutional network family used for teachers, service students and verifiers.

A network is ``Normalize -> blocks -> head``. Each block is ``convs_per_block`` times
(3x3 conv, batch norm, ReLU) followed by 2x2 max pooling (rounding up, so a 1x1 map stays
1x1); with ``pool_after="first_conv"`` the pooling follows the block's first conv instead.
The head follows Fides' verification head (arXiv:2304.00083 research code): global average
pooling, batch norm, dropout, linear to the class logits. Keeping the blocks in an
``nn.ModuleList`` gives GDTL its unit of unfreezing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from verifier.experiment import NetSpec, pruning_mismatch

__all__ = [
    "ConvNet",
    "new_net",
    "NamedProbabilities",
    "NetConfig",
    "Normalize",
    "Probabilities",
    "count_parameters",
    "prune_filters",
    "whiten_stem",
]


@dataclass(frozen=True)
class NetConfig:
    """Architecture of one :class:`ConvNet` (a dataclass, as nanoGPT's ``GPTConfig``)."""

    widths: tuple[int, ...] = (16, 32, 64)  # output channels of each block
    convs_per_block: int = 1
    dropout: float = 0.2
    in_channels: int = 1
    num_classes: int = 10
    mean: tuple[float, ...] = field(default=(0.0,))  # per input channel, from the train split
    std: tuple[float, ...] = field(default=(1.0,))
    # "gap": global average pooling (Fides' head; any input size). "flatten": keep the last
    # feature map's spatial layout (more accurate for small nets on small images; needs
    # image_size)
    pool: str = "gap"
    image_size: tuple[int, int] = (0, 0)
    # "block": 2x2 max pooling after the block's last conv; "first_conv": after its first, so
    # the block's other convs run at half the resolution (DAWNBench ResNet-9 / airbench layout)
    pool_after: str = "block"
    activation: str = "relu"  # or "gelu"
    # "whiten": a frozen 2x2 patch-whitening conv (2 x 4 x in_channels filters) and the
    # activation before the blocks (airbench); its filters come from the data (whiten_stem)
    stem: str = "none"

    @property
    def stem_channels(self) -> int:
        """The blocks' input channels: the stem's filters, or the image's channels."""
        return 8 * self.in_channels if self.stem == "whiten" else self.in_channels

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def with_layout(self, spec: NetSpec) -> NetConfig:
        """This config's data-dependent fields (channels, classes, image size, normalisation)
        with ``spec``'s architecture."""
        return replace(
            self,
            widths=tuple(spec.widths),
            convs_per_block=spec.convs_per_block,
            dropout=spec.dropout,
            pool=spec.pool,
            pool_after=spec.pool_after,
            activation=spec.activation,
            stem=spec.stem,
        )


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, inside the network so exported models take [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # [b, C, H, W]


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
}


class ConvNet(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        if len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
            raise ValueError("NetConfig mean/std need one value per input channel")
        self.cfg = cfg
        self.normalize = Normalize(cfg.mean, cfg.std)
        if cfg.pool_after not in ("block", "first_conv"):
            raise ValueError(f"unknown pool_after {cfg.pool_after!r}; one of block, first_conv")
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.activation!r}; one of relu, gelu")
        if cfg.stem not in ("none", "whiten"):
            raise ValueError(f"unknown stem {cfg.stem!r}; one of none, whiten")
        self.stem: nn.Module = nn.Identity()
        if cfg.stem == "whiten":
            conv = nn.Conv2d(cfg.in_channels, cfg.stem_channels, 2, bias=True)
            conv.weight.requires_grad_(False)  # set from the data (whiten_stem), never trained
            self.stem = nn.Sequential(conv, _ACTIVATIONS[cfg.activation]())
        blocks: list[nn.Module] = []
        c_in = cfg.stem_channels
        for width in cfg.widths:
            layers: list[nn.Module] = []
            for i in range(cfg.convs_per_block):
                layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=False))
                if i == 0 and cfg.pool_after == "first_conv":
                    layers.append(nn.MaxPool2d(2, ceil_mode=True))
                layers += [nn.BatchNorm2d(width), _ACTIVATIONS[cfg.activation]()]
                c_in = width
            if cfg.pool_after == "block":
                # ceil_mode: odd sizes round up (7 -> 4) and a 1x1 map stays 1x1
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.head = self._head(cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)  # [b, C, H, W]
        x = self.stem(x)  # [b, 8C, H-1, W-1] with the whitening stem
        for block in self.blocks:
            x = block(x)  # [b, width, H', W']
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))  # [b, classes] logits
        return out

    def _head(self, num_classes: int) -> nn.Sequential:
        cfg = self.cfg
        features = cfg.widths[-1]
        if cfg.pool == "flatten":
            h, w = cfg.image_size
            if h < 1 or w < 1:
                raise ValueError("pool 'flatten' needs NetConfig.image_size")
            if cfg.stem == "whiten":  # a 2x2 conv without padding
                h, w = h - 1, w - 1
            for _ in cfg.widths:  # each block halves the map, rounding up
                h, w = -(-h // 2), -(-w // 2)
            features *= h * w
            pool: nn.Module = nn.Identity()
        elif cfg.pool == "gap":
            pool = nn.AdaptiveAvgPool2d(1)
        else:
            raise ValueError(f"unknown pool {cfg.pool!r}; one of gap, flatten")
        return nn.Sequential(
            pool,
            nn.Flatten(),
            nn.BatchNorm1d(features),
            nn.Dropout(cfg.dropout),
            nn.Linear(features, num_classes),
        )

    def new_head(self, num_classes: int) -> None:
        """Replace the head (fresh weights) for a different task."""
        self.head = self._head(num_classes)


def whiten_stem(net: ConvNet, images: torch.Tensor, eps: float = 1e-2) -> None:
    """Set the whitening stem's filters from ``images`` ([n, C, H, W] in [0, 1], the training
    split; at most 5,000 are used): with the normalised images' 2x2 patches' covariance
    ``V diag(l) V^T``, the filters are the rows of ``diag(l + eps)^(-1/2) V^T`` and their
    negatives, so the stem's outputs start decorrelated with unit variance and the activation
    keeps both signs (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024,
    section 3.2). The bias starts at zero. A net without the stem is left as it is."""
    if net.cfg.stem != "whiten":
        return
    assert isinstance(net.stem, nn.Sequential)
    conv = net.stem[0]
    assert isinstance(conv, nn.Conv2d)
    c = net.cfg.in_channels
    with torch.no_grad():
        x = net.normalize(images[:5000].to(conv.weight.device, torch.float32))  # [n, C, H, W]
        patches = F.unfold(x, 2).transpose(1, 2).reshape(-1, 4 * c)  # [n * positions, 4C]
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)  # [4C, 4C]
        eigenvalues, vectors = torch.linalg.eigh(cov.double())
        filters = (vectors.T / torch.sqrt(eigenvalues + eps)[:, None]).float()  # [4C, 4C]
        filters = filters.reshape(4 * c, c, 2, 2)  # unfold's order: channel, then 2x2 position
        conv.weight.copy_(torch.cat([filters, -filters]))
        assert conv.bias is not None
        conv.bias.zero_()


def new_net(cfg: NetConfig, images: torch.Tensor, seed: int | None = None) -> ConvNet:
    """A freshly initialised :class:`ConvNet` (seeded when ``seed`` is given), its whitening
    stem, if it has one, set from ``images`` (the training split)."""
    if seed is not None:
        torch.manual_seed(seed)
    net = ConvNet(cfg)
    whiten_stem(net, images)
    return net


class Probabilities(nn.Module):
    """``net`` followed by a softmax, for ONNX export (output named at export time)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    # The argument is called `input` because torch.export names the graph input after it.
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(input)  # [batch, 10]
        return logits.softmax(dim=-1)  # [batch, 10]


class NamedProbabilities(nn.Module):
    """``net`` followed by a softmax, returned as ``{"probabilities": ...}``.

    torch.export keeps the dict keys in the program's output spec, which is where the torch
    runtime reads output names from; a bare tensor would be served as ``output0``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        logits: torch.Tensor = self.net(input)  # [batch, 10]
        return {"probabilities": logits.softmax(dim=-1)}  # [batch, 10]


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def prune_filters(net: ConvNet, cfg: NetConfig) -> ConvNet:
    """A narrower copy of the trained ``net``: every conv layer keeps the ``cfg.widths`` filters
    of largest L1 norm (over the input channels the layer before kept), with their batch-norm
    parameters and statistics, and the head keeps the features of the channels left.

    Filter pruning by weight norm: Li, Kadav, Durdanovic, Samet and Graf, "Pruning Filters for
    Efficient ConvNets", ICLR 2017, section 3.1 (there followed by retraining, as GDTL does
    here). ``cfg`` must describe ``net``'s architecture except for the widths, each no larger
    than ``net``'s, and the head's dropout.
    """
    src = net.cfg
    problem = pruning_mismatch(src, cfg)
    if problem is not None:
        raise ValueError(f"cannot prune to this net: {problem}")
    for name in ("in_channels", "num_classes", "image_size", "mean", "std"):
        if getattr(cfg, name) != getattr(src, name):
            raise ValueError(
                f"cannot prune to this net: {name} is {getattr(cfg, name)!r}, "
                f"the source net's is {getattr(src, name)!r}"
            )
    device = next(net.parameters()).device
    out = ConvNet(cfg).to(device)
    kept = torch.arange(src.stem_channels, device=device)  # input channels of the next conv
    with torch.no_grad():
        out.normalize.load_state_dict(net.normalize.state_dict())
        out.stem.load_state_dict(net.stem.state_dict())  # the stem is kept whole
        for src_block, dst_block, width in zip(net.blocks, out.blocks, cfg.widths, strict=True):
            convs = [m for m in src_block.children() if isinstance(m, nn.Conv2d)]
            norms = [m for m in src_block.children() if isinstance(m, nn.BatchNorm2d)]
            dst_convs = [m for m in dst_block.children() if isinstance(m, nn.Conv2d)]
            dst_norms = [m for m in dst_block.children() if isinstance(m, nn.BatchNorm2d)]
            for conv, bn, dst_conv, dst_bn in zip(convs, norms, dst_convs, dst_norms, strict=True):
                weight = conv.weight[:, kept]  # [out, in kept, k, k]
                l1 = weight.abs().sum(dim=(1, 2, 3))  # [out]
                keep = torch.sort(torch.argsort(l1, descending=True, stable=True)[:width]).values
                dst_conv.weight.copy_(weight[keep])
                _copy_batchnorm(dst_bn, bn, keep)
                kept = keep
        # head: BatchNorm1d over the pooled features, then Linear; "flatten" lays the last map
        # out channel-major, so channel c owns features c * (h * w) ... (c + 1) * (h * w) - 1
        src_bn, src_fc = net.head[2], net.head[4]
        dst_bn1, dst_fc = out.head[2], out.head[4]
        assert isinstance(src_bn, nn.BatchNorm1d)
        assert isinstance(dst_bn1, nn.BatchNorm1d)
        assert isinstance(src_fc, nn.Linear)
        assert isinstance(dst_fc, nn.Linear)
        per_channel = src_bn.num_features // src.widths[-1]
        offsets = torch.arange(per_channel, device=kept.device)
        cols = (kept[:, None] * per_channel + offsets[None, :]).reshape(-1)
        _copy_batchnorm(dst_bn1, src_bn, cols)
        dst_fc.weight.copy_(src_fc.weight[:, cols])
        # the dropped features' contributions are simply lost (as in Li et al.): folding their
        # expected value (the batch norm's bias) into the logits' bias fixed the mean logits
        # but lowered the start's agreement with the Fashion-MNIST service (54.6% -> 41.3%)
        dst_fc.bias.copy_(src_fc.bias)
    return out.train(net.training)


def _copy_batchnorm(dst: nn.Module, src: nn.Module, idx: torch.Tensor) -> None:
    """``dst``'s affine parameters and running statistics: ``src``'s at the features ``idx``."""
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, key).copy_(getattr(src, key)[idx])
