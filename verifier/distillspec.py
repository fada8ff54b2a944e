"""DistillSpec: distil a draft LM from a target LM for speculative decoding.

Zhou et al., "DistillSpec: Improving Speculative Decoding via Knowledge Distillation",
ICLR 2024, arXiv:2310.08461: train the draft q on data generated *on-policy* by the draft
itself (mixed with target-generated and fixed corpus data), minimising a divergence
``D(p || q)`` between the target's and the draft's next-token distributions on every
continuation position:

    L(q) = E_{x ~ mix(q, p, corpus)} [ (1/N) sum_t D(p(.|x_<t) || q(.|x_<t)) ]

The divergence is one of FKL, RKL, JSD, TVD from :mod:`verifier.losses` (the KD losses the
verifier pipeline uses too). TVD maximises the acceptance rate directly, since
``alpha = 1 - E[TVD(p, q)]`` (Leviathan et al. 2023); which one wins depends on the task and
on greedy vs sampled decoding, so :func:`evaluate_divergences` reports each.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from verifier.lm import acceptance, generate, windows
from verifier.losses import fkl, jsd, rkl, tvd

Divergence = Literal["fkl", "rkl", "jsd", "tvd"]
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "tvd": tvd,
}


@dataclass(frozen=True)
class DistillSpecConfig:
    divergence: Divergence = "fkl"
    steps: int = 40
    batch_size: int = 16
    prompt_len: int = 32
    gen_len: int = 64
    lr: float = 1e-3
    temperature: float = 1.0  # sampling temperature of the generated data
    # shares of each batch: on-policy draft samples, target samples, fixed corpus text
    draft_share: float = 0.5
    target_share: float = 0.25
    seed: int = 0
    eval_prompts: int = 32
    eval_tokens: int = 48

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; one of {list(DIVERGENCES)}")
        if not 0 <= self.draft_share + self.target_share <= 1:
            raise ValueError("draft_share + target_share must be within [0, 1]")


@dataclass
class DistillResult:
    config: dict[str, Any]
    before: dict[str, float]
    after: dict[str, float]
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(
    target: Any, draft: Any, held_out: torch.Tensor, cfg: DistillSpecConfig
) -> dict[str, float]:
    """Acceptance alpha on held-out prompts, greedy and at temperature 1."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = windows(held_out, cfg.eval_prompts, cfg.prompt_len, g)  # [n, P]
    return {
        "greedy": round(acceptance(target, draft, prompts, cfg.eval_tokens, 0.0), 4),
        "t1": round(acceptance(target, draft, prompts, cfg.eval_tokens, 1.0, seed=1), 4),
    }


def distill(
    target: Any,
    draft: Any,
    train_ids: torch.Tensor,
    held_out: torch.Tensor,
    cfg: DistillSpecConfig,
    desc: str = "distillspec",
) -> DistillResult:
    """Train ``draft`` in place; acceptance before and after on ``held_out`` tokens."""
    t0 = time.perf_counter()
    before = evaluate(target, draft, held_out, cfg)
    divergence = DIVERGENCES[cfg.divergence]
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, weight_decay=0.0)
    n_draft = round(cfg.batch_size * cfg.draft_share)
    n_target = round(cfg.batch_size * cfg.target_share)
    n_corpus = cfg.batch_size - n_draft - n_target
    total = cfg.prompt_len + cfg.gen_len
    history: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        prompts = windows(train_ids, n_draft + n_target, cfg.prompt_len, g)  # [n, P]
        parts = []
        if n_draft:  # on-policy: the draft's own samples
            draft.eval()
            parts.append(generate(draft, prompts[:n_draft], cfg.gen_len, cfg.temperature, step))
        if n_target:
            parts.append(
                generate(target, prompts[n_draft:], cfg.gen_len, cfg.temperature, 10**6 + step)
            )
        if n_corpus:
            parts.append(windows(train_ids, n_corpus, total, g))
        x = torch.cat(parts)  # [B, P + N]
        with torch.inference_mode():
            p_logits = target(input_ids=x[:, :-1]).logits[:, cfg.prompt_len - 1 :]  # [B, N, V]
        p_logits = p_logits.clone()
        draft.train()
        q_logits = draft(input_ids=x[:, :-1]).logits[:, cfg.prompt_len - 1 :]  # [B, N, V]
        loss = divergence(p_logits, q_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        history.append(round(value, 5))
        bar.set_postfix({cfg.divergence: f"{value:.4f}"})
    bar.close()
    draft.eval()
    after = evaluate(target, draft, held_out, cfg)
    return DistillResult(asdict(cfg), before, after, history, round(time.perf_counter() - t0, 1))


def evaluate_divergences(
    target: Any,
    draft: Any,
    train_ids: torch.Tensor,
    held_out: torch.Tensor,
    cfg: DistillSpecConfig,
    divergences: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd"),
) -> dict[str, DistillResult]:
    """DistillSpec from the same starting draft once per divergence (the draft is copied)."""
    out = {}
    for name in divergences:
        run_cfg = DistillSpecConfig(**{**asdict(cfg), "divergence": name})
        out[name] = distill(target, copy.deepcopy(draft), train_ids, held_out, run_cfg, name)
    return out
