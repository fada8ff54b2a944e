"""The causal-LM runtime: a local Hugging Face model directory, run one sequence at a time
with a KV cache the caller owns (so the engine can keep it across rounds and crop it)."""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gateway.errors import ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCache:
    """A ``transformers`` DynamicCache and the number of positions it holds.

    ``length`` is tracked here (not read back from the cache every round) and :meth:`crop`
    drops the newest entries, so rejected draft tokens never stay in the cache.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        if drop:
            self.cache.crop(-drop)  # transformers 5: a negative count of tokens to remove
            self.length = length


@dataclass
class CausalLM:
    """One loaded model: ``forward`` feeds new tokens and returns the last logits."""

    model: Any  # transformers PreTrainedModel
    device: torch.device
    path: Path
    _cache_arg: str = field(init=False, default="cache")

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def cache_arg(self) -> str:
        """The forward's keyword for the KV cache (``cache`` or ``past_key_values``)."""
        return self._cache_arg

    def new_cache(self) -> KVCache:
        from transformers import DynamicCache

        return KVCache(DynamicCache(config=self.model.config))

    def forward(self, tokens: list[int], cache: KVCache, keep: int) -> torch.Tensor:
        """Append ``tokens`` to the sequence in ``cache``; logits of the last ``keep``.

        Positions continue from ``cache.length``; only ``keep`` rows go through the LM head.
        """
        ids = torch.tensor([tokens], device=self.device)  # [1, n]
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                **{self._cache_arg: cache.cache},
                use_cache=True,
                logits_to_keep=keep,
            )
        cache.length += len(tokens)
        logits: torch.Tensor = out.logits[0, -keep:].float().cpu()  # [keep, V]
        return logits

    def __post_init__(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renames ``past_key_values`` to ``cache`` model by model
        self._cache_arg = "cache" if "cache" in params else "past_key_values"


# transformers' from_pretrained builds a model's weights on the meta device through process-
# wide patches of torch, so two loads in threads at once corrupt each other ("Cannot copy out of
# meta tensor"): the repository loads models side by side (its locks are per model), and these
# loads take turns.
_FROM_PRETRAINED = threading.Lock()


def load_causal_lm(path: Path, device: str = "cpu", dtype: str = "float32") -> CausalLM:
    """Load a local Hugging Face causal LM directory (no download: local files only)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in logs

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    dev = torch.device(device)
    with _FROM_PRETRAINED:
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], local_files_only=True
        )
        model.to(dev).eval()
    return CausalLM(model, dev, path)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    with _FROM_PRETRAINED:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_same_vocabulary(
    target: CausalLM, draft: CausalLM, target_tok: Any, draft_tok: Any | None
) -> None:
    """Refuse a draft whose vocabulary differs from the target's (ModelLoadError)."""
    if target.vocab_size != draft.vocab_size:
        raise ModelLoadError(
            f"draft {draft.path} has a vocabulary of {draft.vocab_size} tokens but the target "
            f"{target.path} has {target.vocab_size}: draft and target must share a tokenizer"
        )
    if draft_tok is not None and draft_tok.get_vocab() != target_tok.get_vocab():
        a, b = target_tok.get_vocab(), draft_tok.get_vocab()
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise ModelLoadError(
            f"draft {draft.path} uses a different tokenizer than the target {target.path} "
            f"(e.g. {diff}): draft and target must share a vocabulary"
        )
