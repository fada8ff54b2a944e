"""Language-model training helpers shared by the default text pair and DistillSpec: token
windows from a corpus, a next-token training loop, and acceptance-rate evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from verifier.losses import cross_entropy


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.01


def windows(ids: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens from the 1-D token stream ``ids``."""
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator)  # [n]
    return torch.stack([ids[s : s + length] for s in starts.tolist()])  # [n, length]


def lr_at(step: int, cfg: LMTrainConfig) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_next_token(
    model: Any, ids: torch.Tensor, cfg: LMTrainConfig, seed: int, desc: str
) -> dict[str, float]:
    """Maximum-likelihood next-token training (AdamW); returns loss and seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    ema = None
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = windows(ids, cfg.batch_size, cfg.seq_len + 1, g)  # [B, T + 1]
        logits = model(input_ids=x[:, :-1]).logits  # [B, T, V]
        loss = cross_entropy(logits, x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    model.eval()
    return {"train_loss": round(ema or 0.0, 4), "seconds": round(time.perf_counter() - t0, 1)}


def generate(
    model: Any, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int
) -> torch.Tensor:
    """Batched continuation of equal-length prompts (KV cache; greedy at temperature 0)."""
    # prompts: [B, P] -> [B, P + new_tokens]
    torch.manual_seed(seed)
    with torch.inference_mode():
        out: torch.Tensor = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
            pad_token_id=0,
        )
    return out.clone()


def acceptance(
    target: Any,
    draft: Any,
    prompts: torch.Tensor,
    new_tokens: int,
    temperature: float,
    seed: int = 0,
) -> float:
    """The expected per-token acceptance alpha on the target's own continuations.

    Temperature 0: ``P(argmax q = argmax p)``; else ``E[sum_x min(p(x), q(x))] = 1 - E[TVD]``
    (Leviathan et al. 2023, section 3.1), with both distributions at ``temperature``.
    """
    seqs = generate(target, prompts, new_tokens, temperature, seed)  # [B, P + N]
    start = prompts.shape[1] - 1  # positions predicting the continuation
    with torch.inference_mode():
        p_logits = target(input_ids=seqs[:, :-1]).logits[:, start:]  # [B, N, V]
        q_logits = draft(input_ids=seqs[:, :-1]).logits[:, start:]  # [B, N, V]
    if temperature == 0:
        return float((p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())
    p = F.softmax(p_logits / temperature, dim=-1)
    q = F.softmax(q_logits / temperature, dim=-1)
    return float(torch.minimum(p, q).sum(-1).mean())
