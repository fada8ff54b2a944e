"""/v1 in process (httpx over ASGI): response shapes, SSE, usage, auth and every bad input."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.api.openai.protocol import CompletionRequest
from gateway.api.openai.serving import _params
from tests.conftest import USER_KEY
from tests.gateway.generation.factory import events

MODEL = "tiny"


async def test_models_lists_the_causal_lm(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    assert data[0]["object"] == "model"
    # the OIP repository does not try to serve it
    r = await client.get("/v2/health/ready")
    assert r.status_code == 200


async def test_completion_greedy_is_deterministic_and_counts_tokens(
    client: httpx.AsyncClient,
) -> None:
    body = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 12, "temperature": 0}
    a = (await client.post("/v1/completions", json=body)).json()
    b = (await client.post("/v1/completions", json=body)).json()
    assert a["object"] == "text_completion"
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    u = a["usage"]
    assert u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + 12
    assert a["choices"][0]["finish_reason"] == "length"
    assert a["spec_decode"]["draft_tokens"] > 0


async def test_seeded_sampling_is_reproducible(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 16, "seed": 7, "top_p": 0.9}
    texts = {
        (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        for _ in range(2)
    }
    assert len(texts) == 1


async def test_ignore_eos_generates_max_tokens_whatever_is_sampled(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 100,
        "temperature": 2.0,
        "ignore_eos": True,
    }
    for seed in range(4):
        r = (await client.post("/v1/completions", json={**body, "seed": seed})).json()
        assert r["usage"]["completion_tokens"] == 100
        assert r["choices"][0]["finish_reason"] == "length"


def test_ignore_eos_empties_the_end_of_sequence_set() -> None:
    model = SimpleNamespace(eos_token_ids=frozenset({0, 5}))
    plain = CompletionRequest(model=MODEL, prompt="a")
    ignoring = CompletionRequest(model=MODEL, prompt="a", ignore_eos=True)
    assert _params(plain, model, 8).eos_token_ids == {0, 5}  # type: ignore[arg-type]
    assert _params(ignoring, model, 8).eos_token_ids == frozenset()  # type: ignore[arg-type]


async def test_stop_sequence_cuts_the_text(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "class A:\n", "max_tokens": 30, "temperature": 0}
    full = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    stop = full[5:7]
    cut = (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    choice = cut["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"


async def test_streaming_completion_matches_and_ends_with_done(
    client: httpx.AsyncClient,
) -> None:
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 20, "temperature": 0}
    full = (await client.post("/v1/completions", json=body)).json()
    r = await client.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    usage_chunk = ev[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == full["usage"]
    chunks = ev[:-2]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_chat_completion_and_stream(client: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 10,
        "temperature": 0,
    }
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "chat.completion"
    msg = doc["choices"][0]["message"]
    assert msg["role"] == "assistant"
    ev = events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert ev[-1] == "[DONE]"
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in ev[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in ev[1:-1])
    assert text == msg["content"]
    assert ev[-2]["choices"][0]["finish_reason"] == "length"


async def test_metrics_count_drafts_and_acceptance(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "for i in", "max_tokens": 20, "temperature": 0}
    doc = (await client.post("/v1/completions", json=body)).json()
    text = (await client.get("/metrics")).text

    def value(name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    spec = doc["spec_decode"]
    assert value("fides_spec_decode_num_draft_tokens_total") == spec["draft_tokens"]
    assert value("fides_spec_decode_num_accepted_tokens_total") == spec["accepted_tokens"]
    assert value("fides_spec_decode_num_accepted_tokens_per_pos_total") == spec["accepted_tokens"]
    assert value("fides_spec_decode_num_emitted_tokens_total") == 20
    assert value("fides_generation_time_to_first_token_seconds_count") == 1
    assert value("fides_generation_inter_token_latency_seconds_count") == 19
    assert value("fides_generation_requests_total") == 1


async def test_api_key_is_required(client: httpx.AsyncClient) -> None:
    anon = httpx.AsyncClient(transport=client._transport, base_url="http://test")
    r = await anon.get("/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    r = await anon.get("/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == 200


BAD: list[tuple[str, dict[str, Any], str | None]] = [
    ("unknown model", {"model": "nope", "prompt": "a"}, "model"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, "prompt"),
    ("empty prompt list", {"model": MODEL, "prompt": []}, "prompt"),
    ("two prompts", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ("token id out of range", {"model": MODEL, "prompt": [1, 10**6]}, "prompt"),
    ("max_tokens 0", {"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"model": MODEL, "prompt": "a", "max_tokens": -3}, "max_tokens"),
    ("max_tokens past context", {"model": MODEL, "prompt": "a", "max_tokens": 500}, "max_tokens"),
    ("prompt past context", {"model": MODEL, "prompt": "x" * 2000}, "prompt"),
    ("temperature < 0", {"model": MODEL, "prompt": "a", "temperature": -0.1}, "temperature"),
    ("temperature > 2", {"model": MODEL, "prompt": "a", "temperature": 2.5}, "temperature"),
    ("top_p 0", {"model": MODEL, "prompt": "a", "top_p": 0}, "top_p"),
    ("top_p > 1", {"model": MODEL, "prompt": "a", "top_p": 1.5}, "top_p"),
    ("max_tokens as string", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("temperature as string", {"model": MODEL, "prompt": "a", "temperature": "hot"}, None),
    ("prompt as number", {"model": MODEL, "prompt": 5}, "prompt"),
    ("stream as string", {"model": MODEL, "prompt": "a", "stream": "yes"}, "stream"),
    ("timeout 0", {"model": MODEL, "prompt": "a", "timeout": 0}, "timeout"),
    ("timeout negative", {"model": MODEL, "prompt": "a", "timeout": -1.5}, "timeout"),
    ("timeout as string", {"model": MODEL, "prompt": "a", "timeout": "10"}, "timeout"),
    ("ignore_eos as string", {"model": MODEL, "prompt": "a", "ignore_eos": "yes"}, "ignore_eos"),
    ("n > 1", {"model": MODEL, "prompt": "a", "n": 2}, "n"),
    ("unknown field", {"model": MODEL, "prompt": "a", "max_tokenz": 5}, "max_tokenz"),
    ("five stops", {"model": MODEL, "prompt": "a", "stop": list("abcde")}, "stop"),
    ("missing model", {"prompt": "a"}, "model"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD, ids=[b[0] for b in BAD])
async def test_bad_completion_requests_get_openai_400(
    client: httpx.AsyncClient, case: str, body: dict[str, Any], param: str | None
) -> None:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, (case, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    if param is not None:
        assert err["param"] is not None
        assert err["param"].startswith(param), err


BAD_CHAT: list[tuple[str, dict[str, Any]]] = [
    ("no messages", {"model": MODEL, "messages": []}),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "a"}]}),
    ("empty content", {"model": MODEL, "messages": [{"role": "user", "content": ""}]}),
    ("content as number", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}),
    ("messages not a list", {"model": MODEL, "messages": "hi"}),
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "a"}]}),
    (
        "max_tokens past context",
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 10**4},
    ),
]


@pytest.mark.parametrize(("case", "body"), BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
async def test_bad_chat_requests_get_openai_400(
    client: httpx.AsyncClient, case: str, body: dict[str, Any]
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, (case, r.text)
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
async def test_a_seed_outside_64_bits_is_a_400_streamed_or_not(
    client: httpx.AsyncClient, seed: int, stream: bool
) -> None:
    """It was a 500 (an overflow inside the engine), or a 200 with an error event."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "seed": seed, "stream": stream}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"
    ok = {**body, "seed": 2**64 - 1}
    assert (await client.post("/v1/completions", json=ok)).status_code == 200


async def test_a_body_that_is_not_json_says_so(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        content=b'{"model": "tiny", prompt',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON"), message
    assert "body.0" not in message
