"""The embedded default text-generation pair: a small code-completion target LM and its
draft, trained on the Python standard library's own source (every Python installation
carries it; no download), with a byte-level BPE tokenizer trained by ``tokenizers``; the
draft is then distilled from the target with DistillSpec (:mod:`verifier.distillspec`).

Architecture as a dataclass (:class:`LMSpec`), built as a Hugging Face Llama so the served
directory is an ordinary ``AutoModelForCausalLM`` directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class LMSpec:
    """A Llama-style decoder (nanoGPT ``GPTConfig`` in spirit)."""

    layers: int
    dim: int
    heads: int
    vocab_size: int
    context: int = 256
    mlp_ratio: float = 2.75
    init_std: float = 0.02  # tests use larger values: sharper, more varied random models

    def hf_config(self, eos_token_id: int = 0) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=int(self.dim * self.mlp_ratio),
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=True,
            initializer_range=self.init_std,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )

    def build(self, seed: int, eos_token_id: int = 0) -> Any:
        """A randomly initialised ``LlamaForCausalLM`` (deterministic for a seed)."""
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(self.hf_config(eos_token_id)).eval()  # type: ignore[no-untyped-call]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer.

    Token 0 is ``<|endoftext|>`` (EOS); byte-level, so any text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None
    )
