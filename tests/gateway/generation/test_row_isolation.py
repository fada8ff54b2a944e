"""One sequence's trouble stays its own: a near-zero temperature, a sampling failure in the
batch, a stop string inside a speculative round (its text, its token count, its cache rows)."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.sampling import warp
from gateway.generation.schedule import Lookahead
from gateway.generation.scheduler import Scheduler
from gateway.generation.text import Detokenizer
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving_app
from tests.gateway.generation.conftest import Pair
from tests.gateway.generation.factory import tokenizer
from tests.gateway.generation.test_engine import (
    CONTEXT,
    prompts,
    reference_greedy,
    run_until_rows_freed,
)

TINY_T = 1e-300  # 0 in float32: dividing logits by it gave infinities, then NaN probabilities


def finish_all(engine: SpeculativeEngine, seqs: list[Any]) -> None:
    while any(s.finished is None for s in seqs):
        engine.step_batch(seqs)


# -- a near-zero temperature ---------------------------------------------------------------------


def test_warp_at_a_near_zero_temperature_is_the_argmax() -> None:
    logits = torch.tensor([[0.5, 3.0, -2.0, 3.0], [-1e4, -3e4, 0.0, 1.0]])
    probs = warp(logits, SamplingParams(1, temperature=TINY_T))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_a_tiny_temperature_beside_greedy_sequences_is_served_as_greedy(pair: Pair) -> None:
    """Three greedy sequences decode while a T=1e-300 one is prefilled and joins them: every
    one finishes with the target's greedy tokens (the step used to raise for all of them)."""
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    ps = prompts(4, pair.target.vocab_size, seed=21)
    greedy = [engine.start(p, SamplingParams(12, 0.0)) for p in ps[:3]]
    engine.step_batch(greedy)
    assert len(engine.batch) == 3
    tiny = engine.start(ps[3], SamplingParams(12, temperature=TINY_T, top_p=0.9, seed=5))
    seqs = [*greedy, tiny]
    engine.step_batch(seqs)
    assert tiny in engine.batch
    finish_all(engine, seqs)
    for seq, p in zip(seqs, ps, strict=True):
        assert seq.error is None
        assert seq.generated == reference_greedy(pair.target, p, 12)
    assert engine.target_kv.rows == 0


# -- a sampling failure in one row ---------------------------------------------------------------


@pytest.mark.parametrize("drafted", [True, False], ids=["draft", "no-draft"])
def test_a_sequence_whose_sampling_fails_fails_alone(pair: Pair, drafted: bool) -> None:
    """A sequence of the batch whose probabilities turn NaN (here its temperature, as a model
    emitting NaN logits would) ends with its error, in the draft's proposal or the target's
    verification; the rest of the batch decodes on, exactly."""
    engine = SpeculativeEngine(pair.target, pair.near if drafted else None, Lookahead(4), CONTEXT)
    ps = prompts(3, pair.target.vocab_size, seed=22)
    good = [engine.start(p, SamplingParams(12, 0.0)) for p in ps[:2]]
    bad = engine.start(ps[2], SamplingParams(12, temperature=1.0, seed=3))
    seqs = [*good, bad]
    engine.step_batch(seqs)
    assert len(engine.batch) == 3
    bad.params = replace(bad.params, temperature=float("nan"))
    engine.step_batch(seqs)
    assert bad.finished == "error"
    assert bad.error is not None
    assert "not finite" in str(bad.error)
    assert bad not in engine.batch
    finish_all(engine, good)
    for seq, p in zip(good, ps[:2], strict=True):
        assert seq.generated == reference_greedy(pair.target, p, 12)
    assert engine.target_kv.rows == 0


class Collect:
    """A scheduler job that keeps its tokens until its sequence ends (or its error)."""

    def __init__(self, seq: Any) -> None:
        self.seq = seq
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def check(self) -> bool:
        return False

    def on_round(self, rnd: Any) -> bool:
        self.tokens.extend(rnd.tokens)
        if rnd.finished is not None:
            self.done.set()
            return True
        return False

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()


def test_the_scheduler_fails_only_the_sequence_whose_sampling_failed(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    ps = prompts(4, pair.target.vocab_size, seed=23)
    good = [Collect(engine.start(p, SamplingParams(16, 0.0))) for p in ps[:3]]
    bad = Collect(engine.start(ps[3], SamplingParams(16, temperature=float("nan"), seed=1)))
    scheduler = Scheduler(engine, "tiny")
    try:
        for job in [*good, bad]:
            scheduler.submit(job)
        for job in [*good, bad]:
            assert job.done.wait(60)
    finally:
        scheduler.close()
    for job, p in zip(good, ps[:3], strict=True):
        assert job.error is None
        assert job.tokens == reference_greedy(pair.target, p, 16)
    assert bad.error is not None
    assert "not finite" in str(bad.error)


# -- stop strings and speculative rounds ----------------------------------------------------------


class Chars:
    """A tokenizer whose tokens are characters (ids index ``alphabet``)."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.alphabet[i] for i in ids)

    def ids(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]


def feed(det: Detokenizer, ids: list[int], sizes: list[int]) -> tuple[str, bool, int]:
    """(text, stopped, tokens fed before the chunk that stopped) feeding ``ids`` in chunks
    of ``sizes`` (cycled); ``det.consumed`` then says how many of that chunk were taken."""
    out, i, k = "", 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        delta, stopped = det.add(ids[i : i + n])
        out += delta
        if stopped:
            return out, True, i
        i, k = i + n, k + 1
    return out + det.flush(), False, len(ids)


def test_overlapping_stops_cut_where_one_token_at_a_time_would() -> None:
    """Of the stops "main()" and "in(", the first starts earlier but the second completes
    first: token by token the text stops at "in(", and so it must when the whole text comes
    in one chunk (a speculative round), which takes the tokens up to that "(" only."""
    text = "def main(): return 42"
    tok = Chars("".join(sorted(set(text))))
    ids = tok.ids(text)
    stops = ["main()", "in("]
    whole = Detokenizer(tok, stops)
    assert whole.add(ids) == ("def ma", True)
    assert whole.consumed == len("def main(")
    single = Detokenizer(tok, stops)
    assert feed(single, ids, [1]) == ("def ma", True, len("def main"))
    assert single.consumed == 1
    for sizes in ([5], [2, 3], [4, 1]):
        det = Detokenizer(tok, stops)
        out, stopped, fed = feed(det, ids, sizes)
        assert (out, stopped) == ("def ma", True), sizes
        assert fed + det.consumed == len("def main("), sizes


def test_chunks_and_single_tokens_give_the_same_text_and_count_with_a_bpe_tokenizer() -> None:
    tok = tokenizer()
    rng = random.Random(0)
    texts = ["def f(x):\n    return x + 1\n", "import os, sys\nclass A(B): pass\n", "naïve ü ✓ end"]
    for trial in range(300):
        text = texts[trial % len(texts)]
        ids = tok.encode(text)
        a = rng.randrange(len(text) - 1)
        b = rng.randrange(len(text) - 1)
        stops = [text[a : a + rng.randint(2, 6)], text[b : b + rng.randint(1, 3)]]
        single = Detokenizer(tok, stops)
        out1, stopped1, fed1 = feed(single, ids, [1])
        sizes = [rng.randint(1, 6) for _ in range(4)]
        chunked = Detokenizer(tok, stops)
        out, stopped, fed = feed(chunked, ids, sizes)
        assert (out, stopped) == (out1, stopped1), (text, stops, sizes)
        if stopped:  # the same tokens taken, up to the one that completed the stop
            assert fed + chunked.consumed == fed1 + single.consumed, (text, stops, sizes)


@pytest.fixture(scope="module")
def spec_repo(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``spec`` (the target as its own draft, so every greedy draft is accepted and a round
    brings 5 tokens) and ``plain`` (the same target, no drafting)."""
    root = tmp_path_factory.mktemp("stops") / "repo"
    for name, gen in (
        ("spec", {"draft": "draft", "num_speculative_tokens": 4, "speculation": "fixed"}),
        ("plain", {"num_speculative_tokens": 0}),
    ):
        vdir = root / name / "1"
        target_only = shutil.ignore_patterns("draft")
        shutil.copytree(lm_repo / "tiny" / "1", vdir, ignore=target_only)
        if name == "spec":
            shutil.copytree(lm_repo / "tiny" / "1", vdir / "draft", ignore=target_only)
        cfg = {"platform": "causal_lm", "generation": gen}
        (root / name / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


@pytest.fixture
async def served(spec_repo: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = Settings(
        model_repository=spec_repo, api_keys=[USER_KEY], log_json=False, shutdown_grace_s=1
    )
    async with serving_app(settings, timeout=120) as (app, c):
        yield c, app


BODY = {"prompt": "def main():\n", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


async def test_a_stop_string_counts_the_same_tokens_with_and_without_speculation(
    served: tuple[httpx.AsyncClient, Any],
) -> None:
    client, _ = served
    full = (await client.post("/v1/completions", json={**BODY, "model": "plain"})).json()
    text = full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] == 24
    spec_full = (await client.post("/v1/completions", json={**BODY, "model": "spec"})).json()
    assert spec_full["choices"][0]["text"] == text
    assert spec_full["spec_decode"]["accepted_tokens"] == spec_full["spec_decode"]["draft_tokens"]
    cut_short = 0
    for a in range(2, min(len(text) - 2, 30), 3):
        stop = text[a : a + 2]
        got = {}
        for model in ("plain", "spec"):
            body = {**BODY, "model": model, "stop": [stop]}
            got[model] = (await client.post("/v1/completions", json=body)).json()
        plain, spec = got["plain"], got["spec"]
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"], stop
        assert spec["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert spec["usage"] == plain["usage"], stop
        cut_short += plain["usage"]["completion_tokens"] < 24
    assert cut_short >= 3  # the stops did end the completions early


async def test_a_tiny_temperature_request_beside_greedy_ones_is_served(
    served: tuple[httpx.AsyncClient, Any],
) -> None:
    client, _ = served

    async def complete(prompt: str, temperature: float) -> Any:
        body = {**BODY, "model": "spec", "prompt": prompt, "temperature": temperature}
        return await client.post("/v1/completions", json=body)

    prompts_ = ["def main():\n", "import os\n", "class A:\n", "x = "]
    replies = await asyncio.gather(*(complete(p, 0) for p in prompts_), complete("x = ", TINY_T))
    assert [r.status_code for r in replies] == [200] * 5
    texts = [r.json()["choices"][0]["text"] for r in replies]
    assert texts[4] == texts[3]  # served as greedy


async def test_a_stop_string_frees_the_cache_row_at_once(
    served: tuple[httpx.AsyncClient, Any],
) -> None:
    """Ended by a stop string, the sequence's rows go without waiting for a next step (an idle
    model runs none: they used to stay held until the next request)."""
    client, app = served
    engine = app.state.generation.get("spec").engine
    text = (await client.post("/v1/completions", json={**BODY, "model": "spec"})).json()
    stop = text["choices"][0]["text"][4:6]
    r = await client.post("/v1/completions", json={**BODY, "model": "spec", "stop": [stop]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + 10
    # the stepping thread frees the target's rows, then the draft's, then empties the batch
    while (
        engine.target_kv.rows or engine.draft_kv.rows or engine.batch
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.target_kv.rows == 0, "the stopped sequence kept its cache row"
    assert engine.draft_kv.rows == 0
    assert engine.batch == []


class StopsAfterOneRound:
    """A job that a stop string ends at its first round (the engine does not know)."""

    def __init__(self, seq: Any) -> None:
        self.seq = seq
        self.done = threading.Event()

    def check(self) -> bool:
        return False

    def on_round(self, rnd: Any) -> bool:
        self.done.set()
        return True

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(f"the job failed: {exc!r}")


def test_the_scheduler_frees_a_stop_string_finish_at_once(pair: Pair) -> None:
    jobs = run_until_rows_freed(pair, StopsAfterOneRound, count=2, seed=24, wait_s=30)
    assert all(job.seq.finished == "stop" for job in jobs)
