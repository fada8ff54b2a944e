"""The embedded default text-generation pair: a small code-completion target LM and its
draft, trained on the Python standard library's own source (every Python installation
carries it; no download), with a byte-level BPE tokenizer trained by ``tokenizers``; the
draft is then distilled from the target with DistillSpec (:mod:`verifier.distillspec`).

Architecture as a dataclass (:class:`LMSpec`), built as a Hugging Face Llama so the served
directory is an ordinary ``AutoModelForCausalLM`` directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
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


# -- the default pair ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextRecipe:
    """Everything that decides the default pair (a change rebuilds it)."""

    vocab_size: int = 2048
    context: int = 256
    # deep and narrow: on a CPU a small model's per-token time is mostly per-layer overhead,
    # so 8 narrow layers cost ~6x the 1-layer draft per token yet train fast
    target: LMSpec = LMSpec(layers=8, dim=256, heads=4, vocab_size=2048, context=256)
    draft: LMSpec = LMSpec(layers=1, dim=128, heads=4, vocab_size=2048, context=256)
    target_steps: int = 200
    draft_steps: int = 200
    distill_steps: int = 30
    # TVD gave the highest greedy acceptance of the four on this pair (bench/results/
    # speculative.json: 0.855 vs 0.824-0.839 after 30 steps from the same corpus draft)
    divergence: str = "tvd"
    num_speculative_tokens: int = 4
    max_corpus_chars: int = 4_000_000
    held_out_every: int = 20  # every 20th stdlib file is held out for evaluation


def stdlib_sources(recipe: TextRecipe) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: the standard library's own ``.py`` files, tests excluded."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    train: list[str] = []
    held: list[str] = []
    size = 0
    for i, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if i % recipe.held_out_every == 0:
            held.append(text)
        elif size < recipe.max_corpus_chars:
            train.append(text)
            size += len(text)
    return train, held


def encode_corpus(tokenizer: Any, texts: list[str]) -> Any:
    """One 1-D token stream, documents separated by EOS."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TrainedPair:
    """A tokenizer, a target, the draft trained on the corpus alone and its DistillSpec copy."""

    tokenizer: Any
    target: Any
    draft_corpus: Any
    draft: Any
    report: dict[str, Any]

    def save(self, vdir: Path) -> None:
        """``vdir``: target + tokenizer; ``vdir/draft``: distilled; ``vdir/draft-corpus``."""
        self.target.save_pretrained(vdir)
        self.tokenizer.save_pretrained(vdir)
        self.draft.save_pretrained(vdir / "draft")
        self.draft_corpus.save_pretrained(vdir / "draft-corpus")


def train_pair(
    train_texts: list[str],
    held_texts: list[str],
    recipe: TextRecipe,
    *,
    seed: int,
    say: Callable[[str], None],
    label: str = "code",
) -> TrainedPair:
    """Tokenizer, target, corpus draft, then DistillSpec of a copy of the draft."""
    import copy

    from verifier.distillspec import DistillSpecConfig, distill
    from verifier.lm import LMTrainConfig, train_next_token

    r = recipe
    t0 = time.perf_counter()
    tok = train_tokenizer(train_texts, r.vocab_size)
    train_ids = encode_corpus(tok, train_texts)
    held_ids = encode_corpus(tok, held_texts)
    say(
        f"{label}: BPE tokenizer ({len(tok)} tokens) on {len(train_texts)} documents, "
        f"{len(train_ids):,} train / {len(held_ids):,} held-out tokens "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    eos = tok.eos_token_id
    target = r.target.build(seed, eos)
    n_t = sum(p.numel() for p in target.parameters())
    say(f"{label}: training the target ({n_t / 1e6:.1f}M parameters, {r.target_steps} steps)")
    t_info = train_next_token(
        target, train_ids, LMTrainConfig(r.target_steps, lr=3e-3), seed, "target"
    )
    draft = r.draft.build(seed + 1, eos)
    n_d = sum(p.numel() for p in draft.parameters())
    say(
        f"{label}: target loss {t_info['train_loss']:.2f} in {t_info['seconds']:.0f}s; training "
        f"the draft ({n_d / 1e6:.2f}M parameters, {r.draft_steps} steps)"
    )
    d_info = train_next_token(
        draft, train_ids, LMTrainConfig(r.draft_steps, batch_size=32, lr=3e-3), seed + 1, "draft"
    )
    say(
        f"{label}: draft loss {d_info['train_loss']:.2f} in {d_info['seconds']:.0f}s; "
        f"DistillSpec ({r.divergence}, {r.distill_steps} steps)"
    )
    distilled = copy.deepcopy(draft)
    ds = distill(
        target,
        distilled,
        train_ids,
        held_ids,
        DistillSpecConfig(
            divergence=r.divergence,  # type: ignore[arg-type]
            steps=r.distill_steps,
            seed=seed,
        ),
    )
    say(
        f"{label}: acceptance greedy {ds.before['greedy']:.3f} -> {ds.after['greedy']:.3f}, "
        f"T=1 {ds.before['t1']:.3f} -> {ds.after['t1']:.3f} ({ds.seconds:.0f}s)"
    )
    report = {
        "tokenizer_vocab": len(tok),
        "corpus_tokens": {"train": len(train_ids), "held_out": len(held_ids)},
        "target": {"parameters": n_t, **t_info, **asdict(r.target)},
        "draft": {"parameters": n_d, **d_info, **asdict(r.draft)},
        "distillspec": {
            "divergence": r.divergence,
            "steps": r.distill_steps,
            "acceptance_before": ds.before,
            "acceptance_after": ds.after,
            "seconds": ds.seconds,
        },
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return TrainedPair(tok, target, draft, distilled, report)


def build_text_default(
    root: Path, *, seed: int = 0, say: Callable[[str], None], recipe: TextRecipe | None = None
) -> dict[str, Any]:
    """Train the pair on stdlib source and write ``<root>/code`` (config.yaml, ``1/`` target,
    ``1/draft`` distilled draft, ``1/draft-corpus`` the draft before DistillSpec)."""
    import torch
    import yaml

    r = recipe or TextRecipe()
    train_texts, held_texts = stdlib_sources(r)
    # one intra-op thread: two threads on two busy cores were 7x slower per step (measured),
    # one is predictable wherever make run happens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = train_pair(train_texts, held_texts, r, seed=seed, say=say)
    finally:
        torch.set_num_threads(threads)
    pair.save(root / "code" / "1")
    cfg = {
        "platform": "causal_lm",
        "generation": {
            "draft": "draft",
            "num_speculative_tokens": r.num_speculative_tokens,
            "schedule": "constant",
            "num_threads": 1,
            "max_concurrent_sequences": 8,
            "max_queue_size": 16,
            "default_max_tokens": 64,
        },
        "parameters": {"task": "Python code completion (trained on the standard library)"},
    }
    body = yaml.safe_dump(cfg, sort_keys=False)
    (root / "code" / "config.yaml").write_text(
        "# code-completion LM pair: target + DistillSpec draft, speculative decoding at /v1\n"
        + body,
        encoding="utf-8",
    )
    return {
        "platform": "causal_lm",
        "role": "text generation (target + distilled draft)",
        "corpus": "the Python standard library's .py files (tests excluded)",
        **pair.report,
    }
