"""The speculative decoding engine: one sequence, a target and an optional draft.

Each :meth:`SpeculativeEngine.step` is one round (module :mod:`gateway.generation.sampling`
has the maths):

1. the draft proposes ``g`` tokens one at a time from its own KV cache;
2. the target scores every new position (the tokens it has not seen + the ``g`` drafts) in
   ONE forward pass, giving ``p_1 .. p_{g+1}``;
3. ``n`` drafts are accepted and one more token is emitted (correction or bonus), so every
   round emits ``n + 1 >= 1`` tokens;
4. both KV caches are cropped back to the accepted sequence: the target's holds every token
   but the newest, the draft's at most that. Nothing before the rejection is recomputed.

With no draft (or ``g = 0``) a round is plain decoding through the same code. Runs on a worker
thread (torch releases the GIL in its kernels); never call it on the event loop.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gateway.generation.runtime import CausalLM, KVCache
from gateway.generation.sampling import (
    SamplingParams,
    sample,
    verify_greedy,
    verify_sampled,
    warp,
)
from gateway.generation.schedule import Lookahead


@dataclass
class Round:
    """What one round produced: the new tokens and the draft's record."""

    tokens: list[int]
    drafted: int  # draft tokens proposed
    accepted: int  # of which accepted (a prefix)
    finished: str | None = None  # "stop" (EOS) or "length" when the sequence ended


@dataclass
class Sequence:
    """One request's decoding state; ``ids`` is prompt + generated tokens."""

    ids: list[int]
    prompt_len: int
    params: SamplingParams
    lookahead: Lookahead
    generator: torch.Generator
    target_cache: KVCache
    draft_cache: KVCache | None
    finished: str | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"rounds": 0, "drafts": 0, "draft_tokens": 0, "accepted": 0}
    )

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len :]


class SpeculativeEngine:
    def __init__(
        self,
        target: CausalLM,
        draft: CausalLM | None,
        lookahead: Lookahead,
        max_context: int,
    ) -> None:
        self.target = target
        self.draft = draft
        self.lookahead = lookahead
        self.max_context = max_context

    def start(self, prompt: list[int], params: SamplingParams) -> Sequence:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_context} tokens"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        la = Lookahead(
            self.lookahead.gamma,
            self.lookahead.kind,
            self.lookahead.maximum,
            self.lookahead.min_confidence,
        )
        return Sequence(
            ids=list(prompt),
            prompt_len=len(prompt),
            params=params,
            lookahead=la if self.draft is not None else Lookahead(0),
            generator=torch.Generator().manual_seed(seed),
            target_cache=self.target.new_cache(),
            draft_cache=self.draft.new_cache() if self.draft is not None else None,
        )

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Round]:
        """Rounds until EOS or max_tokens; stop iterating to cancel."""
        seq = self.start(prompt, params)
        while seq.finished is None:
            yield self.step(seq)

    def step(self, seq: Sequence) -> Round:
        params = seq.params
        remaining = params.max_tokens - len(seq.generated)
        # a round emits up to g + 1 tokens: never draft past max_tokens
        gamma = max(0, min(seq.lookahead.gamma, remaining - 1))
        drafts, q = self._propose(seq, gamma) if gamma else ([], None)
        g = len(drafts)

        # the target sees what it has not seen yet + every draft, in one pass
        seen = seq.target_cache.length
        feed = seq.ids[seen:] + drafts
        logits = self.target.forward(feed, seq.target_cache, keep=g + 1)  # [g + 1, V]
        if params.greedy:
            n, nxt = verify_greedy(logits, drafts)
        else:
            p = warp(logits, params)  # [g + 1, V]
            if q is None:
                q = torch.empty(0, p.shape[-1])
            n, nxt = verify_sampled(p, q, drafts, seq.generator)

        base = len(seq.ids)
        # keep the KV of every token but the newest (not fed yet): rejected drafts go
        seq.target_cache.crop(base + n)
        if seq.draft_cache is not None and seq.draft_cache.length > base + n:
            seq.draft_cache.crop(base + n)

        tokens = [*drafts[:n], nxt]
        finished = None
        for i, t in enumerate(tokens):
            if t in params.eos_token_ids:
                tokens, finished = tokens[: i + 1], "stop"
                break
        if finished is None and len(seq.generated) + len(tokens) >= params.max_tokens:
            tokens, finished = tokens[:remaining], "length"
        seq.ids.extend(tokens)
        seq.finished = finished
        seq.lookahead.update(g, n)
        st = seq.stats
        st["rounds"] += 1
        if g:
            st["drafts"] += 1
            st["draft_tokens"] += g
            st["accepted"] += n
        return Round(tokens, g, n, finished)

    def _propose(self, seq: Sequence, gamma: int) -> tuple[list[int], torch.Tensor | None]:
        """Draft up to ``gamma`` tokens; their draft distributions when sampling."""
        assert self.draft is not None
        assert seq.draft_cache is not None
        params = seq.params
        cache = seq.draft_cache
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(gamma):
            feed = (seq.ids + drafts)[cache.length :]
            logits = self.draft.forward(feed, cache, keep=1)[0]  # [V]
            if params.greedy:
                x = int(logits.argmax())
                conf = float(torch.softmax(logits, -1)[x]) if seq.lookahead.min_confidence else 1.0
            else:
                qi = warp(logits[None], params)[0]  # [V]
                x = sample(qi, seq.generator)
                probs.append(qi)
                conf = float(qi[x])
            drafts.append(x)
            if conf < seq.lookahead.min_confidence:
                break
        return drafts, (torch.stack(probs) if probs else None)  # q: [g, V]
