"""Unloading and reloading a text model under load, a queued client that leaves, and prompts
too long to tokenise on the event loop.

In process (httpx over ASGI) where the test needs the model's engine: its steps are slowed
down by a sleep, so a long generation lasts seconds on any CPU whatever the machine; the
queued-disconnect test runs the real server, whose clients really close their connections.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.generation.service import TextModel
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY, serving_app
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.gateway.generation.factory import events, make_lm_repository, tokenizer

M = "slow"
BOUND_S = 60.0  # nothing here may take this long; the defects made requests hang forever
ADMIN = {"X-API-Key": ADMIN_KEY}


@asynccontextmanager
async def served(repo: Path, drain_s: float) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = Settings(
        model_repository=repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=drain_s,  # the repository's drain on unload and reload
    )
    async with serving_app(settings, timeout=BOUND_S) as (app, client):
        yield app, client


def text_model(app: FastAPI) -> TextModel:
    model: TextModel = app.state.generation.repository.text_model(M)
    return model


def slow_down(model: TextModel, step_s: float) -> None:
    """Every step of the engine takes at least ``step_s`` (a sleep in the scheduler's thread)."""
    step = model.engine.step_batch

    def slowed(seqs: Any) -> Any:
        time.sleep(step_s)
        return step(seqs)

    model.engine.step_batch = slowed


async def until(check: Any, what: str, timeout_s: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- unload and reload under load ------------------------------------------------------------


async def test_unload_drains_then_answers_every_request(tmp_path: Path) -> None:
    """Three sequences run and one waits when the model is unloaded: the short one finishes
    within the drain, the long ones (thousands of steps) are answered 503 naming the unload
    (a stream: an error event, then [DONE]), the queued one 503; none hangs, and none is
    counted as cancelled (no client cancelled)."""
    repo = make_lm_repository(
        tmp_path / "repo",
        name=M,
        context=4096,
        generation={"max_concurrent_sequences": 3, "max_queue_size": 4},
    )
    async with served(repo, drain_s=8.0) as (app, c):
        model = text_model(app)
        slow_down(model, 0.02)  # 4000 tokens: at least 800 steps, 16 s; the drain is 8 s
        long = {"model": M, "prompt": "def", "max_tokens": 4000, "ignore_eos": True}

        async def plain(body: dict[str, Any]) -> httpx.Response:
            return await c.post("/v1/completions", json=body)

        async def stream(body: dict[str, Any]) -> tuple[int, list[Any]]:
            r = await c.post("/v1/completions", json={**body, "stream": True})
            return r.status_code, events(r.text)

        running = [
            asyncio.ensure_future(plain(long)),
            asyncio.ensure_future(stream(long)),
            asyncio.ensure_future(stream({**long, "max_tokens": 10})),  # done within the drain
        ]
        await until(lambda: len(model.active) == 3, "three sequences running")
        queued = asyncio.ensure_future(plain(long))
        await until(lambda: model.waiting == 1, "a queued request")
        unload = await c.post(f"/v2/repository/models/{M}/unload", headers=ADMIN)
        assert unload.status_code == 200, unload.text
        done, pending = await asyncio.wait([*running, queued], timeout=BOUND_S)
        for task in pending:
            task.cancel()
        assert not pending, "requests in flight hang after the unload"

        a, (b_status, b_events), (s_status, s_events) = (t.result() for t in running)
        assert a.status_code == 503, a.text
        assert "was unloaded while generating" in a.json()["error"]["message"]
        assert b_status == 200
        assert b_events[-1] == "[DONE]"
        err = b_events[-2]["error"]
        assert err["type"] == "service_unavailable", err
        assert "was unloaded while generating" in err["message"]
        assert len(b_events) > 3  # it streamed tokens before the drain ran out
        assert s_status == 200
        assert s_events[-1] == "[DONE]"
        assert s_events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in s_events[:-1]) != ""
        q = queued.result()
        assert q.status_code == 503, q.text
        assert "unloaded" in q.json()["error"]["message"]

        text = (await c.get("/metrics")).text
        assert metric(text, "fides_generation_requests_total", finish_reason="cancelled") == 0
        assert metric(text, "fides_generation_running", model=M) == 0
        assert metric(text, "fides_generation_queue_depth", model=M) == 0


async def test_reload_under_load_answers_every_request(tmp_path: Path) -> None:
    """Requests running, queued and arriving while the model is reloaded: the running ones
    finish on the old version (the drain is long enough), the queued ones and those that
    arrive during the swap are served by the new one; every one answers 200. The old
    version's steps wait until the swap, so requests are queued on it when it happens."""
    repo = make_lm_repository(
        tmp_path / "repo",
        name=M,
        context=512,
        generation={"max_concurrent_sequences": 2, "max_queue_size": 16},
    )
    async with served(repo, drain_s=BOUND_S) as (app, c):
        old = text_model(app)
        swapped = threading.Event()
        step = old.engine.step_batch

        def held(seqs: Any) -> Any:
            swapped.wait(BOUND_S)
            return step(seqs)

        old.engine.step_batch = held
        moved = 0  # requests sent on from the old version to the new one
        successor = getattr(app.state.generation, "successor", None)
        if successor is not None:

            def counted(model: TextModel) -> TextModel:
                nonlocal moved
                moved += 1
                return successor(model)  # type: ignore[no-any-return]

            app.state.generation.successor = counted
        body = {"model": M, "prompt": "import", "max_tokens": 40, "ignore_eos": True}

        async def one(i: int) -> tuple[int, str]:
            if i % 2:
                r = await c.post("/v1/completions", json={**body, "stream": True, "seed": i})
                evs = events(r.text)
                assert evs[-1] == "[DONE]", evs[-2:]
                last = evs[-2]
                if "error" in last:
                    return 500, str(last)
                return r.status_code, last["choices"][0]["finish_reason"]
            r = await c.post("/v1/completions", json={**body, "seed": i})
            ok = r.status_code == 200
            return r.status_code, r.json()["choices"][0]["finish_reason"] if ok else r.text

        first = [asyncio.ensure_future(one(i)) for i in range(6)]
        await until(lambda: len(old.active) == 2 and old.waiting == 4, "running and queued")
        reload = asyncio.ensure_future(c.post(f"/v2/repository/models/{M}/load", headers=ADMIN))
        during = []
        for i in range(6, 12):  # arriving while the new version loads and the old one drains
            during.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(0.05)
        await until(lambda: text_model(app) is not old, "the new version")
        swapped.set()
        done, pending = await asyncio.wait([*first, *during, reload], timeout=BOUND_S)
        for task in pending:
            task.cancel()
        assert not pending, "requests hang across the reload"
        assert reload.result().status_code == 200, reload.result().text
        answers = [t.result() for t in [*first, *during]]
        assert answers == [(200, "length")] * 12, answers
        assert moved >= 4  # the four queued on the old version went to the new one
        assert not old.active
        r = await c.post("/v1/completions", json={**body, "max_tokens": 3})
        assert r.status_code == 200


# -- a queued client that leaves ------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("queued-leave")
    # one sequence at a time, one request queued; a long context so that a generation lasts
    # until the test closes it
    repo = make_lm_repository(
        base / "repo",
        name="one",
        context=16384,
        generation={"max_concurrent_sequences": 1, "max_queue_size": 1},
    )
    with running_gateway(repo, base / "logs") as gw:
        yield gw


@pytest.mark.e2e
def test_a_queued_client_that_leaves_frees_its_place(one_slot: GatewayProcess) -> None:
    """One slot, a queue of one: A runs; B (plain) and then B' (streamed) wait and their
    clients give up; each leaves the queue at once, counted as cancelled, so the next one is
    queued, not refused; C, queued last, is served once A ends. B and B' never start:
    the prompt tokens counted are A's and C's only."""
    gw = one_slot
    url = gw.base_url + "/v1/completions"
    headers = {"X-API-Key": USER_KEY}

    def scrape(name: str, **labels: str) -> float:
        return metric(httpx.get(gw.base_url + "/metrics").text, name, model="one", **labels)

    def wait_for(check: Any, what: str) -> None:
        deadline = time.monotonic() + BOUND_S
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    cancelled0 = scrape("fides_generation_requests_total", finish_reason="cancelled")
    prompt0 = scrape("fides_generation_prompt_tokens_total")
    long = {"model": "one", "max_tokens": 16000, "ignore_eos": True, "temperature": 1.0}
    waiter = [7] * 50  # 50 prompt tokens: what B and B' would add to the count if started
    with (
        httpx.Client(timeout=httpx.Timeout(BOUND_S, read=0.5)) as quick,
        httpx.Client(timeout=BOUND_S) as client,
        client.stream(
            "POST", url, json={**long, "prompt": [5], "stream": True}, headers=headers
        ) as a,
    ):
        assert a.status_code == 200
        lines = a.iter_lines()  # kept: closing the iterator would close A's connection
        next(lines)  # A is generating
        wait_for(lambda: scrape("fides_generation_running") == 1, "A running")
        for n, stream in enumerate((False, True), 1):
            # B waits for the slot; its client gives up after 0.5 s and closes the connection
            with pytest.raises(httpx.ReadTimeout):  # it was queued: a 503 would come at once
                quick.post(url, json={**long, "prompt": waiter, "stream": stream}, headers=headers)
            wait_for(
                lambda n=n: (
                    scrape("fides_generation_requests_total", finish_reason="cancelled")
                    == cancelled0 + n
                ),
                "the queued request counted as cancelled",
            )
            assert scrape("fides_generation_queue_depth") == 0
        result: dict[str, httpx.Response] = {}

        def send_c() -> None:
            with httpx.Client(timeout=BOUND_S) as own:
                result["c"] = own.post(
                    url, json={**long, "prompt": [5], "max_tokens": 3}, headers=headers
                )

        c = threading.Thread(target=send_c)
        c.start()
        wait_for(lambda: "c" in result or scrape("fides_generation_queue_depth") == 1, "C queued")
        assert "c" not in result, result["c"].text  # queued, not refused
    # A's connection is closed: its generation is cancelled and C gets the slot
    c.join(BOUND_S)
    assert result["c"].status_code == 200, result["c"].text
    assert result["c"].json()["usage"]["completion_tokens"] == 3
    assert scrape("fides_generation_requests_total", finish_reason="cancelled") == cancelled0 + 3
    assert scrape("fides_generation_prompt_tokens_total") == prompt0 + 2  # A's and C's


# -- prompts too long for the event loop --------------------------------------------------------


@pytest.fixture(scope="module")
def long_context_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lm_repository(tmp_path_factory.mktemp("big") / "repo", name=M, context=4096)


def record_encodes(model: TextModel, pause_s: float = 0.0) -> list[tuple[int, float, float]]:
    """Every tokenisation of ``model``: (characters, start, end); ``pause_s`` slows each down
    (a sleep: on the event loop it would stop everything else)."""
    calls: list[tuple[int, float, float]] = []
    encode = model.encode

    def recorded(text: str) -> list[int]:
        t0 = time.monotonic()
        time.sleep(pause_s)
        tokens = encode(text)
        calls.append((len(text), t0, time.monotonic()))
        return tokens

    model.encode = recorded  # type: ignore[method-assign]
    return calls


async def probing(c: httpx.AsyncClient, answered: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        r = await c.get("/v2/health/live")
        assert r.status_code == 200
        answered.append(time.monotonic())
        await asyncio.sleep(0.01)


async def test_a_prompt_too_long_to_fit_is_refused_before_tokenising(
    long_context_repo: Path,
) -> None:
    """A 4 MB prompt cannot fit 4096 tokens whatever its tokens (no token is longer than
    the tokenizer's longest entry): 400 at once, completions and chat, never tokenised,
    while the health probe keeps answering."""
    async with served(long_context_repo, drain_s=1.0) as (app, c):
        model = text_model(app)
        calls = record_encodes(model)
        big = "def read_config(path):\n    return open(path).read()\n" * 80_000  # 4 MB
        answered: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.ensure_future(probing(c, answered, stop))
        await until(lambda: bool(answered), "the probe")
        for path, body, chars in (
            ("/v1/completions", {"model": M, "prompt": big, "max_tokens": 1}, len(big)),
            # the chat template's text around the message counts too
            (
                "/v1/chat/completions",
                {"model": M, "messages": [{"role": "user", "content": big}]},
                None,
            ),
        ):
            before = len(answered)
            r = await asyncio.wait_for(c.post(path, json=body), BOUND_S)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded"
            assert "(a token of this model stands for at most 13 characters)" in err["message"]
            if chars is not None:
                assert f"the prompt has {chars} characters" in err["message"]
            await until(lambda b=before: len(answered) > b, "the probe after the big prompt")
        stop.set()
        await asyncio.wait_for(probe, BOUND_S)
        assert all(n < len(big) for n, _, _ in calls), "the big prompt was tokenised"


async def test_a_long_prompt_is_tokenised_off_the_event_loop(long_context_repo: Path) -> None:
    """A prompt above the inline size (but one that might fit) is tokenised, and a chat
    templated, in a worker thread: the health probe answers while the tokenizer works (made
    to take a second here); on the event loop nothing could answer meanwhile."""
    async with served(long_context_repo, drain_s=1.0) as (app, c):
        model = text_model(app)
        calls = record_encodes(model, pause_s=1.0)
        text = "x = 1\n" * 2000  # 12,000 characters: might fit 4096 tokens of at most 13
        assert len(text) < (model.max_context - 1) * 13
        answered: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.ensure_future(probing(c, answered, stop))
        await until(lambda: bool(answered), "the probe")
        for path, body in (
            ("/v1/completions", {"model": M, "prompt": text, "max_tokens": 2}),
            ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": text}]}),
        ):
            r = await asyncio.wait_for(c.post(path, json={**body, "max_tokens": 2}), BOUND_S)
            assert r.status_code in (200, 400), r.text  # 400: more tokens than the context
            _, t0, t1 = calls[-1]
            during = [t for t in answered if t0 < t < t1]
            assert during, "the health probe did not answer while the prompt was tokenised"
        stop.set()
        await asyncio.wait_for(probe, BOUND_S)


def test_chars_per_token_bounds_the_token_count() -> None:
    """c characters are at least c / K tokens, K = the longest vocabulary entry x what the
    normalizer can shrink; no bound where text can vanish or a whole word be one token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gateway.generation.service import max_chars_per_token

    tok = tokenizer()
    k = max_chars_per_token(tok)
    assert k == max(len(t) for t in tok.get_vocab())
    src = Path(__file__).read_text(encoding="utf-8")
    for text in (src, "é" * 500, "    " * 300, "ab" * 700, "😀 " * 200):
        assert len(tok.encode(text, add_special_tokens=False)) >= len(text) / k

    def fast(backend: Tokenizer) -> Any:
        return PreTrainedTokenizerFast(tokenizer_object=backend)  # type: ignore[no-untyped-call]

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    assert max_chars_per_token(fast(bpe)) == 2
    bpe.normalizer = normalizers.NFC()
    assert max_chars_per_token(fast(bpe)) == 8  # NFC composes up to 4 code points into one
    bpe.normalizer = normalizers.Strip()
    assert max_chars_per_token(fast(bpe)) is None
    bpe.normalizer = None
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace
    assert max_chars_per_token(fast(bpe)) is None
    word = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_chars_per_token(fast(word)) is None  # one [UNK] for a whole word
