"""The speculative decoding engine, batched: many sequences, a target and an optional draft.

Sequences join and leave between steps (continuous batching). One :meth:`SpeculativeEngine.
step_batch` call is one scheduling step:

1. sequences that finished or were dropped leave the batch (their cache rows go);
2. every sequence in the batch runs one speculative round (module :mod:`gateway.generation.
   sampling` has the maths), all of them together:

   a. the draft proposes up to ``g`` tokens per sequence, one batched draft forward per
      drafted position (a sequence whose schedule or confidence stops early feeds nothing);
   b. the target scores every sequence's newest token + its drafts in ONE batched forward,
      giving ``p_1 .. p_{g+1}`` per sequence;
   c. each sequence accepts its own prefix ``n`` and emits one more token (correction or
      bonus), and its cache rows are cropped on their own (:class:`~gateway.generation.batch.
      BatchKV`): the target's holds every token but the newest, the draft's at most that;

3. new sequences are prefilled, chunk by chunk within a per-step token budget (so one long
   prompt cannot stall the batch), each in a one-row cache of its own; a finished prefill
   emits the sequence's first token and the sequence joins the batch for the next step.

A failure of one sequence's own work (its prefill in its own caches, its sampling or
verification: probabilities that are not finite) ends that sequence alone, with ``finished``
``"error"`` and its ``error``; the others go on.

How many tokens the draft may propose (the batch-wide cap on each sequence's own schedule) is
chosen every step by a :class:`~gateway.generation.schedule.SpeculationPolicy` from measured
forward times and acceptance: speculation pays at small batches and is switched off when the
batch is large enough that scoring extra positions costs more than it saves.

With no draft (or ``g = 0``) a round is plain decoding through the same code. Runs on one
worker thread per model (torch releases the GIL in its kernels); never call it on the event
loop. :meth:`step` runs a batch of one, for callers with a single sequence.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch

from gateway.generation.batch import BatchKV
from gateway.generation.runtime import CausalLM
from gateway.generation.sampling import (
    SamplingParams,
    is_greedy,
    sample,
    verify_greedy,
    verify_sampled,
    warp,
)
from gateway.generation.schedule import Lookahead, SpeculationPolicy


@dataclass
class Round:
    """What one step produced for one sequence: the new tokens and the draft's record."""

    tokens: list[int]
    drafted: int  # draft tokens proposed
    accepted: int  # of which accepted (a prefix)
    finished: str | None = None  # "stop" (EOS) or "length" when the sequence ended


class PrefillError(RuntimeError):
    """A prompt's prefill (or its first token's sampling) failed in its own caches
    (``cause``); the batch is untouched."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(eq=False)
class Sequence:
    """One request's decoding state; ``ids`` is prompt + generated tokens."""

    ids: list[int]
    prompt_len: int
    params: SamplingParams
    lookahead: Lookahead
    generator: torch.Generator
    finished: str | None = None  # "stop", "length", or "error" (it failed alone: error)
    prefilled: int = 0  # prompt tokens fed so far (== prompt_len once in the batch)
    target_kv: BatchKV | None = None  # the one-row caches of its prefill, until it joins
    draft_kv: BatchKV | None = None
    error: Exception | None = None  # its own prefill or sampling failed (the others go on)
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
        policy: SpeculationPolicy | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        self.target = target
        self.draft = draft
        self.lookahead = lookahead
        self.max_context = max_context
        self.policy = policy
        self.prefill_chunk = prefill_chunk
        self.batch: list[Sequence] = []  # row i of both caches is batch[i]
        self.target_kv = BatchKV(target)
        self.draft_kv = BatchKV(draft) if draft is not None else None
        self.last_cap: int | None = None  # the policy's last choice (for metrics)
        # (start, batch size, seconds in forwards) of the last round: the time between two
        # rounds that is not forward passes is their overhead (verification, sampling, the
        # scheduler handing tokens to requests), which speculation pays less often
        self._last_round: tuple[float, int, float] | None = None
        self._forward_s = 0.0

    def start(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A new sequence (checked, nothing computed yet): pass it to :meth:`step_batch`."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_context} tokens"
            )
        if params.temperature > 0 and is_greedy(params):  # 1e-300 would overflow float32
            params = replace(params, temperature=0.0)
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
        )

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Round]:
        """Rounds until EOS or max_tokens; stop iterating to cancel."""
        seq = self.start(prompt, params)
        while seq.finished is None:
            rnd = self.step(seq)
            if rnd is not None:
                yield rnd

    def reset(self) -> None:
        """Drop every sequence of the batch (after a failed step, or on unload)."""
        self._last_round = None
        self.batch = []
        self.target_kv = BatchKV(self.target)
        self.draft_kv = BatchKV(self.draft) if self.draft is not None else None

    def finish(self, seqs: Iterable[Sequence], reason: str) -> None:
        """End ``seqs`` from outside (a stop string, their request failed) and free their
        cache rows now: a sequence leaves the batch at the next step otherwise, and an idle
        model runs none."""
        for seq in seqs:
            if seq.finished is None:
                seq.finished = reason
        self._keep({id(s) for s in self.batch if s.finished is None})

    def step(self, seq: Sequence) -> Round | None:
        """One step of ``seq`` alone (None while a long prompt is still being prefilled)."""
        return self.step_batch([seq]).get(seq)

    def calibrate(self, max_batch: int, context: int = 32, repeats: int = 3) -> float:
        """Measure the forward times the policy needs (batch sizes 1, 2, 4 .. ``max_batch``,
        widths 1, 2, 3, 5, 9, 17 up to its maximum + 1, the policy interpolating between them;
        rows of ``context`` tokens); the seconds it took. Also a warm-up: the first real
        requests do not pay for torch's first calls."""
        if self.policy is None or self.draft is None or self.draft_kv is None or self.batch:
            return 0.0
        t_start = time.perf_counter()
        sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        g = torch.Generator().manual_seed(0)
        vocab = self.target.vocab_size
        context = max(1, min(context, self.max_context - self.policy.maximum - 2))
        for b in sizes:
            for lm, timed in ((self.target, True), (self.draft, False)):
                kv = BatchKV(lm)
                for _ in range(b):
                    row = BatchKV(lm)
                    row.add_empty_row()
                    row.forward([torch.randint(1, vocab, (context,), generator=g).tolist()], [0])
                    kv.merge(row)
                most = self.policy.maximum + 1
                widths = sorted({w for w in (1, 2, 3, 5, 9, 17) if w < most} | {most})
                widths = widths if timed else [1]
                for w in widths:
                    times = []
                    for _ in range(repeats + 1):  # the first call warms up
                        feeds = torch.randint(1, vocab, (b, w), generator=g).tolist()
                        t0 = time.perf_counter()
                        kv.forward(feeds, [1] * b)
                        times.append(time.perf_counter() - t0)
                        for i in range(b):
                            kv.crop(i, context)
                    t = sorted(times[1:])[len(times[1:]) // 2]
                    if timed:
                        self.policy.target_s[(b, w)] = t
                    else:
                        self.policy.draft_s[b] = t
        return time.perf_counter() - t_start

    # -- one scheduling step ---------------------------------------------------------------------

    def step_batch(self, seqs: list[Sequence]) -> dict[Sequence, Round]:
        """One step of every sequence in ``seqs`` (module docstring); the rounds produced.

        A sequence in the batch that is not in ``seqs`` (or finished) leaves it; a sequence
        not yet in the batch is prefilled within the step's budget, in order.
        """
        self._keep({id(s) for s in seqs if s.finished is None})
        rounds = self._round() if self.batch else {}
        self._keep({id(s) for s in self.batch if s.finished is None})  # finished ones leave
        in_batch = {id(s) for s in self.batch}
        budget = self.prefill_chunk
        for seq in seqs:
            if budget <= 0:
                break
            if seq.finished is None and id(seq) not in in_batch:
                try:
                    fed, rnd = self._prefill(seq, budget)
                except PrefillError as exc:  # that prompt's own caches: the batch goes on
                    seq.target_kv = seq.draft_kv = None
                    seq.error, seq.finished = exc.cause, "error"
                    continue
                self._last_round = None  # a prefill in the gap: not a round's overhead
                budget -= fed
                if rnd is not None:
                    rounds[seq] = rnd
        return rounds

    def _keep(self, wanted: set[int]) -> None:
        """Drop the batch's rows of sequences not in ``wanted`` (ids)."""
        rows = [i for i, s in enumerate(self.batch) if id(s) in wanted]
        if len(rows) != len(self.batch):
            self.target_kv.select(rows)
            if self.draft_kv is not None:
                self.draft_kv.select(rows)
            self.batch = [self.batch[i] for i in rows]

    def _prefill(self, seq: Sequence, budget: int) -> tuple[int, Round | None]:
        """Feed up to ``budget`` more prompt tokens; at the prompt's end, the first token."""
        if seq.target_kv is None:
            seq.target_kv = BatchKV(self.target)
            seq.target_kv.add_empty_row()
            if self.draft is not None:
                seq.draft_kv = BatchKV(self.draft)
                seq.draft_kv.add_empty_row()
        chunk = seq.ids[seq.prefilled : seq.prefilled + budget]
        last = seq.prefilled + len(chunk) == seq.prompt_len
        try:  # the sequence's own one-row caches: a failure here (out of memory on a long
            # prompt) is this request's alone
            logits = seq.target_kv.forward([chunk], [1 if last else 0])[0]
            if seq.draft_kv is not None:
                seq.draft_kv.forward([chunk], [0])
        except Exception as exc:
            raise PrefillError(exc) from exc
        seq.prefilled += len(chunk)
        if not last:
            return len(chunk), None
        params = seq.params
        if params.greedy:
            token = int(logits[-1].argmax())
        else:
            try:  # its own probabilities (not finite): this request's alone as well
                token = sample(warp(logits[-1:], params)[0], seq.generator)
            except Exception as exc:
                raise PrefillError(exc) from exc
        rnd = self._emit(seq, [token], 0, 0)
        if seq.finished is None:  # joins the batch for the next step
            self.target_kv.merge(seq.target_kv)
            if self.draft_kv is not None and seq.draft_kv is not None:
                self.draft_kv.merge(seq.draft_kv)
            self.batch.append(seq)
        seq.target_kv = seq.draft_kv = None
        return len(chunk), rnd

    def _round(self) -> dict[Sequence, Round]:
        """One speculative round of every sequence in the batch, together."""
        batch = self.batch
        size = len(batch)
        now = time.perf_counter()
        if self.policy is not None and self._last_round is not None:
            start, last_size, forward_s = self._last_round
            if last_size == size:
                self.policy.observe_overhead(size, now - start - forward_s)
        self._forward_s = 0.0
        cap = self.policy.cap(size) if (self.policy is not None and self.draft) else None
        self.last_cap = cap
        gammas = []
        for seq in batch:
            remaining = seq.params.max_tokens - len(seq.generated)
            # a round emits up to g + 1 tokens: never draft past max_tokens
            g = max(0, min(seq.lookahead.gamma, remaining - 1))
            # the load-dependent cap changes how many random numbers a sampled sequence
            # draws, so a seeded one is exempt: its sample does not depend on the load
            seeded = not seq.params.greedy and seq.params.seed is not None
            gammas.append(g if cap is None or seeded else min(g, cap))
        drafts, qs = self._propose(gammas)

        # the target sees its newest token + every draft, all sequences in one forward
        feeds = [seq.ids[self.target_kv.lengths[i] :] + drafts[i] for i, seq in enumerate(batch)]
        t0 = time.perf_counter()
        logits = self.target_kv.forward(feeds, [len(d) + 1 for d in drafts])
        if self.policy is not None:
            took = time.perf_counter() - t0
            self._forward_s += took
            self.policy.observe_target(size, max(len(f) for f in feeds), took)
            self._last_round = (now, size, self._forward_s)

        rounds: dict[Sequence, Round] = {}
        for i, seq in enumerate(batch):
            if seq.finished is not None:  # its drafting failed: it leaves after this round
                continue
            params, d = seq.params, drafts[i]
            try:  # one row's verification: its failure (probabilities that are not finite)
                # is that sequence's alone, unlike a batched forward's
                if params.greedy:
                    n, nxt = verify_greedy(logits[i], d)
                else:
                    p = warp(logits[i], params)  # [g + 1, V]
                    qi = qs[i]
                    q = qi if qi is not None else torch.empty(0, p.shape[-1])
                    n, nxt = verify_sampled(p, q, d, seq.generator)
            except Exception as exc:
                seq.error, seq.finished = exc, "error"
                continue
            base = len(seq.ids)
            # keep the KV of every token but the newest (not fed yet): rejected drafts go
            self.target_kv.crop(i, base + n)
            if self.draft_kv is not None and self.draft_kv.lengths[i] > base + n:
                self.draft_kv.crop(i, base + n)
            seq.lookahead.update(len(d), n)
            if self.policy is not None and d:
                self.policy.observe_acceptance(len(d), n)
            rounds[seq] = self._emit(seq, [*d[:n], nxt], len(d), n)
        return rounds

    def _emit(self, seq: Sequence, tokens: list[int], drafted: int, accepted: int) -> Round:
        params = seq.params
        remaining = params.max_tokens - len(seq.generated)
        finished = None
        for i, t in enumerate(tokens):
            if t in params.eos_token_ids:
                tokens, finished = tokens[: i + 1], "stop"
                break
        if finished is None and len(tokens) >= remaining:
            tokens, finished = tokens[:remaining], "length"
        seq.ids.extend(tokens)
        seq.finished = finished
        st = seq.stats
        st["rounds"] += 1
        if drafted:
            st["drafts"] += 1
            st["draft_tokens"] += drafted
            st["accepted"] += accepted
        return Round(tokens, drafted, accepted, finished)

    def _propose(self, gammas: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to ``gammas[i]`` draft tokens per sequence; their draft distributions when
        sampling (``[g, V]``), one batched draft forward per position."""
        batch = self.batch
        drafts: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        kv = self.draft_kv
        active = [g > 0 for g in gammas]
        if kv is None or not any(active):
            return drafts, [None] * len(batch)
        for _ in range(max(gammas)):
            feeds = [
                (seq.ids + drafts[i])[kv.lengths[i] :] if active[i] else []
                for i, seq in enumerate(batch)
            ]
            t0 = time.perf_counter()
            logits = kv.forward(feeds, [1 if f else 0 for f in feeds])
            if self.policy is not None:
                took = time.perf_counter() - t0
                self._forward_s += took
                if max(len(f) for f in feeds) <= 2:  # a draft step, not a row catching up on
                    self.policy.observe_draft(len(batch), took)  # tokens it did not draft
            for i, seq in enumerate(batch):
                if not active[i]:
                    continue
                params, row = seq.params, logits[i][0]  # [V]
                if params.greedy:
                    x = int(row.argmax())
                    conf = float(torch.softmax(row, -1)[x]) if seq.lookahead.min_confidence else 1.0
                else:
                    try:  # its own probabilities: a failure ends this sequence alone
                        qi = warp(row[None], params)[0]  # [V]
                        x = sample(qi, seq.generator)
                    except Exception as exc:
                        seq.error, seq.finished = exc, "error"
                        active[i] = False
                        continue
                    probs[i].append(qi)
                    conf = float(qi[x])
                drafts[i].append(x)
                if len(drafts[i]) >= gammas[i] or conf < seq.lookahead.min_confidence:
                    active[i] = False
            if not any(active):
                break
        return drafts, [torch.stack(p) if p else None for p in probs]
