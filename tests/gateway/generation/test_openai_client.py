"""The real ``openai`` package against the real gateway process: completions and chat,
streaming and not, errors; plus queue shedding and cancellation on client disconnect."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import USER_KEY
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.gateway.generation.factory import make_lm_repository

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("openai-e2e")
    repo = make_lm_repository(base / "repo", name="tiny")
    # a long-context model that admits one sequence and queues none: for shedding/cancel tests
    make_lm_repository(
        repo,
        name="long",
        context=2048,
        generation={"max_concurrent_sequences": 1, "max_queue_size": 0},
    )
    # one slot and a queue: for the time limit of a request that waits for its slot
    make_lm_repository(
        repo,
        name="queued",
        context=2048,
        generation={"max_concurrent_sequences": 1, "max_queue_size": 4},
    )
    with running_gateway(repo, base / "logs") as gw:
        yield gw


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=USER_KEY, max_retries=0) as c:
        yield c  # closed after the test: no pooled connection left open


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(gw.base_url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_and_completion(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["long", "queued", "tiny"]
    c = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
    assert c.object == "text_completion"
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None
    assert c.usage.completion_tokens == 8
    again = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
    assert again.choices[0].text == c.choices[0].text


def test_streaming_completion_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="import", max_tokens=16, temperature=0)
    stream = client.completions.create(
        model="tiny",
        prompt="import",
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].choices == []
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text


def test_chat_streaming_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "print hello"}]
    r = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text


def test_errors_raise_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="missing", prompt="a")
    assert exc.value.code == "model_not_found"
    assert exc.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="a", temperature=3.0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_disconnect_cancels_and_full_queue_sheds(
    gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    before = metric(gateway, "fides_generation_requests_total", finish_reason="cancelled")
    stream = client.completions.create(
        model="long",
        prompt="def",
        max_tokens=2000,
        temperature=1.0,
        stream=True,
        extra_body={"ignore_eos": True},  # a sampled EOS must not end it before the cancel
    )
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    # the one slot is taken and no queue is allowed: the next request is shed
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(model="long", prompt="a", max_tokens=5)
    assert exc.value.status_code == 503
    stream.close()  # the client goes away mid-stream
    # non-streaming: the client gives up after 0.3 s; the server must stop generating
    deadline = time.monotonic() + 10

    def cancelled() -> float:
        return metric(gateway, "fides_generation_requests_total", finish_reason="cancelled")

    while cancelled() < before + 1:
        assert time.monotonic() < deadline, "streaming generation not cancelled"
        time.sleep(0.05)
    quick = openai.OpenAI(base_url=client.base_url, api_key=USER_KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        quick.completions.create(
            model="long",
            prompt="def",
            max_tokens=2000,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
    while cancelled() < before + 2:
        assert time.monotonic() < deadline, "non-streaming generation not cancelled"
        time.sleep(0.05)
    assert metric(gateway, "fides_generation_running", model="long") == 0


def test_back_to_back_requests_are_not_shed(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    """One slot and no queue: a client that has its answer may send the next request at once;
    the slot is free before the answer goes out, so it is never refused as busy."""
    for i in range(40):
        r = client.completions.create(model="long", prompt="def", max_tokens=2, seed=i)
        assert r.usage is not None
        assert r.usage.completion_tokens >= 1
    assert metric(gateway, "fides_generation_running", model="long") == 0


LONG = {"prompt": "def", "max_tokens": 2000, "temperature": 1.0, "ignore_eos": True}


def test_a_request_past_its_timeout_is_stopped_and_answers_504(gateway: GatewayProcess) -> None:
    """2,000 tokens take seconds on any CPU; the request allows 0.3 s: the sequence stops and
    the answer is OpenAI's error body with 504; streamed, the stream ends with that error."""
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    before = metric(gateway, "fides_generation_requests_total", finish_reason="timeout")
    r = httpx.post(
        gateway.base_url + "/v1/completions",
        json={"model": "long", "timeout": 0.3, **LONG},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["type"] == "timeout_error"
    assert "timed out after 0.3 s" in err["message"]
    with httpx.stream(
        "POST",
        gateway.base_url + "/v1/completions",
        json={"model": "long", "timeout": 0.5, "stream": True, **LONG},
        headers=headers,
        timeout=30,
    ) as stream:
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "timeout_error" in events[-2], events[-2]
    assert len(events) > 3  # tokens went out before the limit
    assert metric(gateway, "fides_generation_requests_total", finish_reason="timeout") == before + 2
    assert metric(gateway, "fides_generation_running", model="long") == 0


def test_a_request_that_waits_past_its_timeout_for_a_slot_answers_504(
    gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    stream = client.completions.create(
        model="queued", stream=True, extra_body={"ignore_eos": True}, **_long_args()
    )
    next(iter(stream))  # the one slot is taken
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as exc:
            client.completions.create(
                model="queued", prompt="a", max_tokens=5, extra_body={"timeout": 0.3}
            )
        assert exc.value.status_code == 504
        assert "no sequence slot" in str(exc.value)
        assert time.monotonic() - t0 < 5
        assert metric(gateway, "fides_generation_queue_depth", model="queued") == 0
    finally:
        stream.close()
    # the slot comes back and the next request is served
    deadline = time.monotonic() + 10
    while metric(gateway, "fides_generation_running", model="queued") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = client.completions.create(model="queued", prompt="a", max_tokens=2)
    assert ok.usage is not None


def _long_args() -> dict[str, object]:
    return {"prompt": "def", "max_tokens": 2000, "temperature": 1.0}


def test_concurrent_requests_share_the_batch_and_keep_their_answers(
    gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    """Eight clients at once (the tiny model's default batch of 8): every greedy answer is
    the one that prompt gets alone, sampled neighbours with a stop string and a mid-stream
    disconnect ride in the same steps, and the engine did run steps with several
    sequences."""
    import concurrent.futures

    prompts = [f"def f{i}(x):" for i in range(6)]
    alone = {
        p: client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
        .choices[0]
        .text
        for p in prompts
    }
    batched_before = metric(gateway, "fides_generation_batch_size_bucket", model="tiny", le="1.0")
    steps_before = metric(gateway, "fides_generation_batch_size_count", model="tiny")

    def greedy(p: str) -> str:
        c = client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
        return c.choices[0].text

    def sampled(i: int) -> str:
        c = client.completions.create(
            model="tiny", prompt="class", max_tokens=30, temperature=1.0, seed=i, stop=["\n"]
        )
        return c.choices[0].finish_reason

    def dropped() -> None:  # reads two chunks of a stream, then goes away
        stream = client.completions.create(
            model="tiny",
            prompt="import",
            max_tokens=100,
            temperature=1.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for n, _ in enumerate(stream):
            if n == 1:
                stream.close()
                return

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = {p: pool.submit(greedy, p) for p in prompts}
        reasons = [pool.submit(sampled, i) for i in range(2)]
        gone = pool.submit(dropped)
        assert {p: f.result(timeout=60) for p, f in answers.items()} == alone
        assert all(r.result(timeout=60) in ("stop", "length") for r in reasons)
        gone.result(timeout=60)
    steps = metric(gateway, "fides_generation_batch_size_count", model="tiny") - steps_before
    singles = (
        metric(gateway, "fides_generation_batch_size_bucket", model="tiny", le="1.0")
        - batched_before
    )
    assert steps > 0
    assert singles < steps, "no step decoded more than one sequence"
    # every slot came back: the model has no running sequence left
    deadline = time.monotonic() + 10
    while metric(gateway, "fides_generation_running", model="tiny") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gateway, "fides_generation_running", model="tiny") == 0
