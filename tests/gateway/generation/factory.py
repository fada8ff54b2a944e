"""Tiny real language models for the generation tests: a BPE tokenizer trained on a few
kilobytes of text and randomly initialised Llama target / draft pairs, saved as ordinary
Hugging Face directories (no download, ~1 s to build)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import orjson
import torch
import yaml

from fides.defaults.text import LMSpec, train_tokenizer

# a few kilobytes of varied text for the tokenizer
CORPUS = [inspect.getsource(inspect), inspect.getsource(yaml)]
VOCAB = 300


def tokenizer() -> Any:
    return train_tokenizer(CORPUS, VOCAB)


def perturbed(model: Any, scale: float, seed: int) -> Any:
    """A copy of ``model`` with Gaussian noise on every weight: a draft that agrees often."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return other


def save(model: Any, tok: Any, path: Path) -> Path:
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def make_lm_repository(
    root: Path,
    name: str = "tiny",
    generation: dict[str, Any] | None = None,
    context: int = 128,
    draft_noise: float = 0.3,
    init_std: float = 0.2,
) -> Path:
    """``<root>/<name>/config.yaml`` (platform causal_lm) + ``1/`` target + ``1/draft``."""
    tok = tokenizer()
    spec = LMSpec(
        layers=2, dim=64, heads=4, vocab_size=len(tok), context=context, init_std=init_std
    )
    target = spec.build(seed=1, eos_token_id=tok.eos_token_id)
    vdir = root / name / "1"
    save(target, tok, vdir)
    save(perturbed(target, draft_noise, seed=2), tok, vdir / "draft")
    # speculation fixed: on these tiny models the measured costs say drafting does not pay,
    # and most tests are about the drafting path (the auto policy has tests of its own)
    gen = {"draft": "draft", "speculation": "fixed", **(generation or {})}
    cfg = {"platform": "causal_lm", "generation": gen}
    (root / name / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


def events(body: str) -> list[Any]:
    """The SSE ``data:`` payloads, ``[DONE]`` kept as a string."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out
