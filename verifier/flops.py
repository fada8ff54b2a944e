"""Cost of a network: FLOPs per image and the memory it needs in the enclave."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MemoryEstimate", "count_flops", "memory_estimate"]

BYTES = 4  # float32


def count_flops(net: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs for one image (a multiply-add counts 2), by ``FlopCounterMode``."""
    was_training = net.training
    net.eval()
    x = torch.zeros(1, *image_shape)  # [1, C, H, W]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    net.train(was_training)
    return int(counter.get_total_flops())


def _activation_elements(net: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Elements of every leaf module's output for one image (all kept, an upper bound)."""
    total = 0

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *image_shape))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return total


#: Bytes in the MB of every memory budget: the verifier's and the enclave's count alike.
MB = 10**6


@dataclass(frozen=True)
class MemoryEstimate:
    parameters_bytes: int
    optimizer_bytes: int  # gradients + Adam's two moments for the trainable parameters
    activations_bytes: int  # at the configured batch size

    @property
    def total_bytes(self) -> int:
        return self.parameters_bytes + self.optimizer_bytes + self.activations_bytes

    @property
    def total_mb(self) -> float:
        """In MB of 10^6 bytes, the unit of ``memory_budget_mb`` and of the enclave's own
        budget (``fides enclave run --memory-budget-mb``)."""
        return self.total_bytes / MB


def memory_estimate(
    net: nn.Module, image_shape: tuple[int, int, int], batch_size: int, training: bool = True
) -> MemoryEstimate:
    """Bytes for the parameters, (when ``training``) the gradient and Adam state of the
    trainable parameters, and every layer's activations at ``batch_size``.

    GDTL fine-tunes the verifier where it will run, so a step that unfreezes more parameters
    needs more memory; with ``training=False`` this is the inference footprint.
    """
    params = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad) if training else 0
    acts = _activation_elements(net, image_shape) * batch_size
    return MemoryEstimate(params * BYTES, 3 * trainable * BYTES, acts * BYTES)
