"""The speculative engine against independent references (no KV cache, no draft)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.runtime import CausalLM
from gateway.generation.sampling import warp
from gateway.generation.schedule import Lookahead
from gateway.generation.scheduler import Scheduler
from tests.gateway.generation.conftest import Pair

CONTEXT = 128


def reference_greedy(lm: CausalLM, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding recomputing the whole prefix every step (no cache at all)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def run(engine: SpeculativeEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    for rnd in engine.generate(prompt, params):
        out.extend(rnd.tokens)
    return out


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_speculative_equals_target_greedy_on_60_prompts(pair: Pair) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    engines = {
        "near k=4": SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT),
        "near adaptive": SpeculativeEngine(
            pair.target, pair.near, Lookahead(2, "adaptive", 8), CONTEXT
        ),
        "near confidence": SpeculativeEngine(
            pair.target, pair.near, Lookahead(8, "confidence", 8, 0.5), CONTEXT
        ),
        "far k=3": SpeculativeEngine(pair.target, pair.far, Lookahead(3), CONTEXT),
    }
    drafted = dict.fromkeys(engines, 0)
    accepted = dict.fromkeys(engines, 0)
    for i, prompt in enumerate(prompts(60, pair.target.vocab_size)):
        want = reference_greedy(pair.target, prompt, greedy.max_tokens)
        for name, engine in engines.items():
            seq = engine.start(prompt, greedy)
            while seq.finished is None:
                engine.step(seq)
            assert seq.generated == want, f"prompt {i} ({name}) differs from plain greedy"
            drafted[name] += seq.stats["draft_tokens"]
            accepted[name] += seq.stats["accepted"]
    # both paths were exercised: accepted drafts and corrections after a rejection
    for name in engines:
        assert 0 < accepted[name] < drafted[name], (name, accepted[name], drafted[name])
    assert accepted["near k=4"] / drafted["near k=4"] > 0.5
    assert accepted["far k=3"] / drafted["far k=3"] < 0.3


def test_zero_speculative_tokens_is_plain_decoding(pair: Pair) -> None:
    plain = SpeculativeEngine(pair.target, pair.near, Lookahead(0), CONTEXT)
    no_draft = SpeculativeEngine(pair.target, None, Lookahead(4), CONTEXT)
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=11)
    for prompt in prompts(8, pair.target.vocab_size, seed=1):
        # the reference sampler: warp + multinomial on the full prefix, same seeded generator
        g = torch.Generator().manual_seed(11)
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                logits = pair.target.model(input_ids=torch.tensor([ids])).logits[0, -1:]
                ids.append(int(torch.multinomial(warp(logits, params)[0], 1, generator=g)))
        want = ids[len(prompt) :]
        assert run(plain, prompt, params) == want
        assert run(no_draft, prompt, params) == want
        greedy = SamplingParams(max_tokens=20, temperature=0.0)
        assert run(plain, prompt, greedy) == reference_greedy(pair.target, prompt, 20)


def test_kv_cache_crop_leaves_no_stale_entries(pair: Pair) -> None:
    """After every step each sequence's cache rows hold exactly its accepted prefix, and the
    target's keys (valid slots) equal those of a fresh prefill of it: stale draft positions
    would show up as extra length or as different keys. Three sequences share the batch, so
    one row's crop must not touch its neighbours'."""
    engine = SpeculativeEngine(pair.target, pair.far, Lookahead(4), CONTEXT)
    seqs = [
        engine.start(p, SamplingParams(40, 0.0)) for p in prompts(3, pair.target.vocab_size, seed=5)
    ]
    rejections = 0
    while any(s.finished is None for s in seqs):
        rounds = engine.step_batch(seqs)
        rejections += sum(r.accepted < r.drafted for r in rounds.values())
        assert engine.draft_kv is not None
        for row, seq in enumerate(engine.batch):
            assert engine.target_kv.lengths[row] == len(seq.ids) - 1
            assert int(engine.target_kv.valid[row].sum()) == len(seq.ids) - 1
            assert engine.draft_kv.lengths[row] <= len(seq.ids) - 1
            assert int(engine.draft_kv.valid[row].sum()) == engine.draft_kv.lengths[row]
    assert rejections > 5
    # the keys themselves, on a live batch after a sequence left it mid-way
    seqs = [
        engine.start(p, SamplingParams(30, 0.0)) for p in prompts(3, pair.target.vocab_size, seed=6)
    ]
    for _ in range(8):
        engine.step_batch(seqs)
    engine.step_batch(seqs[::2])  # the middle one leaves the batch
    assert len(engine.batch) == 2
    for row, seq in enumerate(engine.batch):
        fresh = pair.target.new_cache()
        pair.target.forward(seq.ids[:-1], fresh, keep=1)
        for layer, ref in enumerate(fresh.cache.layers):
            keys, values = engine.target_kv.row_keys(row, layer)  # [heads, positions, dim]
            assert keys.shape == ref.keys[0].shape
            torch.testing.assert_close(keys, ref.keys[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(values, ref.values[0], atol=1e-4, rtol=1e-4)


def test_max_tokens_and_eos_end_the_sequence(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    prompt = prompts(1, pair.target.vocab_size, seed=2)[0]
    for n in (1, 2, 5, 7):
        out = run(engine, prompt, SamplingParams(max_tokens=n, temperature=0.0))
        assert len(out) == n
    full = run(engine, prompt, SamplingParams(max_tokens=30, temperature=0.0))
    eos = full[9]  # pretend the 10th token is EOS: generation stops right after it
    out = run(engine, prompt, SamplingParams(30, 0.0, eos_token_ids=frozenset({eos})))
    assert out == full[: full.index(eos) + 1]


def test_prompt_past_the_context_is_refused(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    with pytest.raises(ValueError, match="context"):
        engine.start([1] * 100, SamplingParams(max_tokens=29, temperature=0.0))
    with pytest.raises(ValueError, match="empty"):
        engine.start([], SamplingParams(max_tokens=1))


def test_warp_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = warp(logits, SamplingParams(1, temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = warp(logits, SamplingParams(1, temperature=1.0, top_p=0.9))  # 0.5+0.3 < 0.9: keep 3
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    p = warp(logits, SamplingParams(1, temperature=1.0, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_every_greedy_sequence_of_a_mixed_batch_equals_target_greedy(pair: Pair) -> None:
    """Continuous batching: 24 sequences through a batch of at most 6, joining as others
    finish, greedy ones beside sampled ones with other temperatures, top-k and lengths; every
    greedy output equals plain greedy decoding of the target, whatever shared its steps."""
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    todo = list(enumerate(prompts(24, pair.target.vocab_size, seed=7)))
    live: list = []
    want: dict[int, list[int]] = {}
    greedy_done = 0
    batch_sizes = set()
    while todo or live:
        while todo and len(live) < 6:
            i, prompt = todo.pop(0)
            if i % 3 == 2:  # a sampled neighbour
                params = SamplingParams(5 + i, temperature=0.9, top_k=20, seed=i)
            else:
                params = SamplingParams(4 + i % 17, temperature=0.0)
                want[id(prompt)] = reference_greedy(pair.target, prompt, params.max_tokens)
            seq = engine.start(prompt, params)
            seq.key = id(prompt)  # type: ignore[attr-defined]
            live.append(seq)
        engine.step_batch(live)
        batch_sizes.add(len(engine.batch))
        for seq in [s for s in live if s.finished is not None]:
            live.remove(seq)
            if seq.params.greedy:
                assert seq.generated == want[seq.key], "a greedy sequence differs in a batch"
                greedy_done += 1
            else:
                assert len(seq.generated) == seq.params.max_tokens or seq.finished == "stop"
    assert greedy_done == 16
    assert max(batch_sizes) == 6
    assert len(batch_sizes) > 2
    assert engine.target_kv.rows == 0
    assert engine.batch == []


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT, prefill_chunk=8)
    short = engine.start([5, 6, 7], SamplingParams(60, 0.0))
    long_prompt = prompts(1, pair.target.vocab_size, seed=9)[0] * 5  # 40-120 tokens
    long = engine.start(long_prompt, SamplingParams(6, 0.0))
    first = engine.step_batch([short])  # the short one is prefilled and in the batch
    assert short in first
    steps_before_first_token = 0
    while long.finished is None:
        rounds = engine.step_batch([short, long])
        assert short in rounds, "the decoding sequence stalled behind a prefill"
        if long not in rounds:
            steps_before_first_token += 1
            assert long.prefilled <= len(long_prompt)
        elif len(long.generated) == 1:
            assert long.prefilled == len(long_prompt)
    # chunks of 8 prompt tokens per step: the prompt took that many steps
    assert steps_before_first_token == -(-len(long_prompt) // 8) - 1
    assert long.generated == reference_greedy(pair.target, long_prompt, 6)


def test_a_failed_sequence_set_leaves_the_engine_usable(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    seqs = [engine.start(p, SamplingParams(10, 0.0)) for p in prompts(3, 300, seed=3)]
    engine.step_batch(seqs)
    engine.step_batch(seqs)
    engine.reset()
    assert engine.batch == []
    assert engine.target_kv.rows == 0
    prompt = prompts(1, pair.target.vocab_size, seed=4)[0]
    assert run(engine, prompt, SamplingParams(12, 0.0)) == reference_greedy(pair.target, prompt, 12)


def test_cache_memory_stays_bounded_over_many_sequences(pair: Pair) -> None:
    """120 sequences through a batch of 8 with many rejections (the far draft): the cache's
    slots never exceed the longest row + the compaction slack + what one step adds and its
    crops take back (5 slots each), nor the context + slack + a step, and the batch is empty
    at the end (no rows leak)."""
    engine = SpeculativeEngine(pair.target, pair.far, Lookahead(4), CONTEXT)
    todo = prompts(120, pair.target.vocab_size, seed=8)
    live: list = []
    while todo or live:
        while todo and len(live) < 8:
            p = todo.pop()
            live.append(engine.start(p, SamplingParams(CONTEXT - len(p) - 1, temperature=0.0)))
        engine.step_batch(live)
        kv = engine.target_kv
        if kv.rows:
            assert kv.slots <= max(kv.lengths) + kv.slack + 10
            assert kv.slots <= CONTEXT + kv.slack + 5
        live = [s for s in live if s.finished is None]
    assert engine.target_kv.rows == 0
    assert engine.batch == []
    assert engine.draft_kv is not None
    assert engine.draft_kv.rows == 0


def test_a_failed_prefill_fails_only_its_own_sequence(pair: Pair) -> None:
    """A prompt whose own prefill fails (here a token id past the embedding table, as an out
    of memory on a long prompt would) ends that sequence with its error; the batch it was
    joining decodes on, exactly."""
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    ps = prompts(3, pair.target.vocab_size, seed=13)
    good = [engine.start(p, SamplingParams(12, 0.0)) for p in ps[:2]]
    engine.step_batch(good)
    assert len(engine.batch) == 2
    bad = engine.start(ps[2], SamplingParams(12, 0.0))
    bad.ids[0] = pair.target.vocab_size + 1000
    engine.step_batch([*good, bad])
    assert bad.finished == "error"
    assert isinstance(bad.error, IndexError)
    assert bad not in engine.batch
    assert bad.target_kv is None
    while any(s.finished is None for s in good):
        engine.step_batch(good)
    for seq, p in zip(good, ps[:2], strict=True):
        assert seq.generated == reference_greedy(pair.target, p, 12)
    assert engine.target_kv.rows == 0


class CancelledAfterOneRound:
    """A scheduler job whose client leaves after its first round of tokens."""

    def __init__(self, seq: object) -> None:
        self.seq = seq
        self.rounds = 0
        self.done = threading.Event()

    def check(self) -> bool:
        if self.rounds:
            self.done.set()
            return True
        return False

    def on_round(self, rnd: object) -> bool:
        self.rounds += 1
        return False

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(f"the job failed: {exc!r}")


def test_the_last_cancelled_sequence_frees_its_rows_without_a_next_request(pair: Pair) -> None:
    run_until_rows_freed(pair, CancelledAfterOneRound, count=3, seed=14, wait_s=10)


def run_until_rows_freed(
    pair: Pair, job_type: Any, *, count: int, seed: int, wait_s: float
) -> list[Any]:
    """``count`` greedy jobs of ``job_type`` (each ends itself after a round, its ``done``
    set) on a scheduler; once they are done, the engine must free every cache row and batch
    place on its own within 10 s, with no next request to wake it. Returns the jobs."""
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    scheduler = Scheduler(engine, "tiny")
    try:
        jobs = [
            job_type(engine.start(p, SamplingParams(40, 0.0)))
            for p in prompts(count, pair.target.vocab_size, seed=seed)
        ]
        for job in jobs:
            scheduler.submit(job)
        for job in jobs:
            assert job.done.wait(wait_s)
        deadline = time.monotonic() + 10
        # the stepping thread frees the cache rows, then empties the batch list: wait for both
        while (engine.target_kv.rows or engine.batch) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.target_kv.rows == 0, "the ended sequences kept their cache rows"
        assert engine.batch == []
        return jobs
    finally:
        scheduler.close()
