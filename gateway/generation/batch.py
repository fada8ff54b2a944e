"""The KV cache of a batch of sequences: one row per sequence, rows of different lengths.

Continuous batching needs rows that grow, shrink and come and go independently: a sequence
that rejects draft tokens drops its newest cache entries while its neighbour keeps all of
its own, a finished sequence leaves, a new one joins after its prefill. :class:`BatchKV`
keeps one ``transformers`` cache of shape ``[rows, heads, slots, head_dim]`` per layer and a
boolean ``valid[rows, slots]`` mask:

* feeding tokens appends ``w`` slots to every row (``w``: the longest feed this call; a
  shorter feed is padded and its padding slots are invalid);
* cropping a row marks its newest valid slots invalid (no copy);
* the attention mask of every forward is ``valid`` (+ the causal order of the new slots), and
  position ids are given per row, so a row's keys and queries keep their true positions
  whatever slot they sit in (rotary embeddings are applied by position, not by slot);
* :meth:`compact` gathers each row's valid slots to the front once the holes add up to
  ``slack`` slots, so memory stays bounded by ``rows * (longest sequence + slack)``.

Invalid slots hold finite values (zeros or a real token's keys): masked attention weights
are exactly zero, and ``0 * finite`` adds nothing. No row is ever empty when it is fed
through the model with others: a sequence is prefilled in a one-row batch of its own and
joins (:meth:`merge`) afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from gateway.generation.runtime import CausalLM

__all__ = ["BatchKV", "unbatchable_layers"]


def unbatchable_layers(lm: CausalLM) -> list[str]:
    """The kinds of ``lm``'s cache layers that :class:`BatchKV` cannot hold (sliding-window
    layers crop and mask in their own way), by name; empty when every layer is full
    attention."""
    layers = lm.new_cache().cache.layers
    return sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})


class BatchKV:
    """The KV cache of ``rows`` sequences of ``lm``; ``lengths[i]``: tokens row ``i`` holds."""

    def __init__(self, lm: CausalLM, slack: int = 32) -> None:
        self.lm = lm
        self.slack = slack
        self._empty()

    def _empty(self) -> None:
        """No rows, and a fresh cache (its layers' buffers go)."""
        self.cache: Any = self.lm.new_cache().cache
        if all(type(layer) is DynamicLayer for layer in self.cache.layers):
            self.cache.layers = [_GrowingLayer() for _ in self.cache.layers]
        self.valid = torch.zeros((0, 0), dtype=torch.bool)
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        return int(self.valid.shape[1])

    def _layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if layer.is_initialized]

    # -- membership ------------------------------------------------------------------------------

    def add_empty_row(self) -> None:
        """A row holding nothing (a one-row batch before its prefill)."""
        if self.rows:
            raise ValueError("only an empty batch takes an empty row; merge prefilled rows")
        self.valid = torch.zeros((1, 0), dtype=torch.bool)
        self.lengths = [0]

    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows (same model) after this batch's; ``other`` is consumed."""
        if not other.rows:
            return
        if not self.rows:
            self.cache, self.valid, self.lengths = other.cache, other.valid, list(other.lengths)
            return
        slots = max(self.slots, other.slots)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad(mine.keys, slots), _pad(theirs.keys, slots)])
            mine.values = torch.cat([_pad(mine.values, slots), _pad(theirs.values, slots)])
        self.valid = torch.cat([_pad_mask(self.valid, slots), _pad_mask(other.valid, slots)])
        self.lengths += other.lengths

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order): sequences that left are dropped."""
        if rows == list(range(self.rows)):
            return
        if not rows:
            self._empty()
            return
        index = torch.tensor(rows)
        for layer in self._layers():
            on = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, on)
            layer.values = layer.values.index_select(0, on)
        self.valid = self.valid.index_select(0, index)
        self.lengths = [self.lengths[i] for i in rows]
        self._maybe_compact()  # the longest row may have left

    # -- contents --------------------------------------------------------------------------------

    def forward(self, feeds: list[list[int]], keep: list[int]) -> list[torch.Tensor]:
        """Append ``feeds[i]`` to row ``i`` (an empty feed appends nothing valid); the logits
        of the last ``keep[i]`` tokens of each feed, ``[keep[i], vocab]`` float32 on the CPU."""
        if len(feeds) != self.rows or len(keep) != self.rows:
            raise ValueError(f"{len(feeds)} feeds for a batch of {self.rows} rows")
        lens = [len(f) for f in feeds]
        width = max(lens)
        if width == 0:
            return [torch.empty(0) for _ in feeds]
        if any(k > n for k, n in zip(keep, lens, strict=True)):
            raise ValueError("keep exceeds a feed")
        self._maybe_compact()
        dev = self.lm.device
        ids = torch.zeros((self.rows, width), dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        new_valid = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
        valid = torch.cat([self.valid, new_valid], dim=1)
        limit = (self.lm.max_positions or 1 << 30) - 1
        positions = (torch.tensor(self.lengths)[:, None] + torch.arange(width)[None, :]).clamp(
            max=limit
        )  # padding tokens' positions do not matter, only that they are in range
        start = self.slots
        # the LM head runs on the last ``last`` positions only (at least one: transformers
        # reads logits_to_keep=0 as "all of them")
        last = max([width - (n - k) for n, k in zip(lens, keep, strict=True) if k] or [1])
        # no hole, no padding: every slot is its position, and the model's own causal path
        # (no mask tensor to build) is exact and faster; always so for a batch of one row
        dense = bool(valid.all()) and all(n == start for n in self.lengths)
        with torch.inference_mode():
            out = self.lm.model(
                input_ids=ids.to(dev),
                attention_mask=None if dense else valid.to(dev, torch.long),
                position_ids=None if dense else positions.to(dev),
                cache_position=torch.arange(start, start + width, device=dev),
                use_cache=True,
                logits_to_keep=last,
                **{self.lm.cache_arg: self.cache},
            )
        self.valid = valid
        self.lengths = [n + m for n, m in zip(self.lengths, lens, strict=True)]
        logits = out.logits.float().cpu()  # [rows, last, V]: positions width - last .. width
        return [
            logits[i, last - width + n - k : last - width + n] if k else logits[i, :0]
            for i, (n, k) in enumerate(zip(lens, keep, strict=True))
        ]

    def crop(self, row: int, length: int) -> None:
        """Row ``row`` keeps its first ``length`` tokens (the newest ones are dropped)."""
        held = self.lengths[row]
        if length > held or length < 0:
            raise ValueError(f"cannot crop a row of {held} tokens to {length}")
        if length < held:
            slots = self.valid[row].nonzero()[:, 0]
            self.valid[row, slots[length:]] = False
            self.lengths[row] = length
            self._trim()

    def _trim(self) -> None:
        """Drop the newest slots that no row holds (views, no copy): a batch of one row
        never has a hole, since a crop always drops its newest slots."""
        used = self.valid.any(dim=0).nonzero()
        end = int(used[-1, 0]) + 1 if len(used) else 0
        if end < self.slots:
            for layer in self._layers():
                layer.keys = layer.keys[:, :, :end]
                layer.values = layer.values[:, :, :end]
            self.valid = self.valid[:, :end]

    def row_keys(self, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``row``'s keys and values at ``layer``, valid slots only: ``[heads, n, dim]``."""
        cached = self.cache.layers[layer]
        slots = self.valid[row].nonzero()[:, 0]
        return cached.keys[row][:, slots], cached.values[row][:, slots]

    def _maybe_compact(self) -> None:
        if self.slots > max(self.lengths) + self.slack:
            self.compact()

    def compact(self) -> None:
        """Move each row's valid slots to the front and drop the slots no row needs."""
        longest = max(self.lengths)
        index = torch.zeros((self.rows, longest), dtype=torch.long)
        valid = torch.zeros((self.rows, longest), dtype=torch.bool)
        for i, n in enumerate(self.lengths):
            index[i, :n] = self.valid[i].nonzero()[:, 0]
            valid[i, :n] = True
        for layer in self._layers():
            b, h, _, d = layer.keys.shape
            gather = index.to(layer.keys.device)[:, None, :, None].expand(b, h, longest, d)
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        self.valid = valid


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room to grow: a step
    writes its new slots in place instead of copying the whole layer with ``torch.cat``
    (transformers' way, which costs as much as the attention itself at batch 8).

    ``keys`` / ``values`` stay what :class:`BatchKV` reads and replaces: views of the first
    ``slots`` of the buffer. When :class:`BatchKV` replaces them (a row left, rows were
    compacted or merged), the next update starts a new buffer from them; a trim keeps the
    same storage, so the slots it dropped are simply written over.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        if not self.is_initialized or keys is None or values is None or keys.dim() != 4:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self._kbuf = self._vbuf = None
            return key_states, value_states
        used, new = keys.shape[2], key_states.shape[2]
        kbuf, vbuf = self._kbuf, self._vbuf
        if (
            kbuf is None
            or vbuf is None
            or kbuf.data_ptr() != keys.data_ptr()
            or kbuf.shape[:2] != keys.shape[:2]
            or kbuf.shape[2] < used + new
        ):
            b, h, _, d = keys.shape
            room = max(2 * (used + new), 64)
            kbuf, vbuf = keys.new_empty((b, h, room, d)), values.new_empty((b, h, room, d))
            kbuf[:, :, :used] = keys
            vbuf[:, :, :used] = values
            self._kbuf, self._vbuf = kbuf, vbuf
        kbuf[:, :, used : used + new] = key_states
        vbuf[:, :, used : used + new] = value_states
        self.keys, self.values = kbuf[:, :, : used + new], vbuf[:, :, : used + new]
        return self.keys, self.values


def _pad(t: torch.Tensor, slots: int) -> torch.Tensor:
    """``[rows, heads, n, dim]`` zero-padded to ``slots`` along the slot axis."""
    extra = slots - t.shape[2]
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def _pad_mask(m: torch.Tensor, slots: int) -> torch.Tensor:
    extra = slots - m.shape[1]
    return torch.nn.functional.pad(m, (0, extra), value=False) if extra else m
