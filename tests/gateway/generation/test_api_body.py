"""/v1 bodies that are not a strict JSON object: each a 400 in OpenAI's error body that names
the problem (NaN and Infinity were parsed into non-finite floats, the rest got generic
messages, a lone surrogate a 500), and the server serves the next good request."""

from __future__ import annotations

import httpx
import pytest

MODEL = "tiny"
JSON = {"content-type": "application/json"}
COMPLETION = b'{"model": "tiny", "prompt": "a", "max_tokens": 2'
CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'


async def assert_serves(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


# (case, route, body, headers, words the message must hold, param)
BAD: list[tuple[str, str, bytes, dict[str, str], list[str], str | None]] = [
    ("not JSON", "completions", b"hello", JSON, ["not valid JSON", "line 1 column 1"], None),
    ("truncated", "completions", COMPLETION, JSON, ["not valid JSON", "end of data"], None),
    ("bad key", "chat/completions", b'{"model": "tiny", messages', JSON, ["not valid JSON"], None),
    ("empty", "completions", b"", JSON, ["body is empty", "JSON object"], None),
    ("array", "completions", b"[1, 2]", JSON, ["must be a JSON object, not an array"], None),
    ("string", "chat/completions", b'"hi"', JSON, ["must be a JSON object, not a string"], None),
    ("null", "chat/completions", b"null", JSON, ["must be a JSON object, not null"], None),
    ("number", "completions", b"5", JSON, ["must be a JSON object, not a number"], None),
    ("text/plain", "completions", COMPLETION + b"}", {"content-type": "text/plain"},
     ["application/json", "'text/plain'"], None),
    ("no content type", "completions", COMPLETION + b"}", {}, ["no Content-Type"], None),
    ("deep nesting", "completions", b"[" * 100_000, JSON, ["nests deeper than 1024"], None),
    ("deep in a field", "chat/completions", CHAT + b', "stop": ' + b"[" * 5000 + b"]" * 5000
     + b"}", JSON, ["nests deeper than 1024"], None),
    ("not UTF-8", "completions", b'{"model": "tiny", "prompt": "\xff"}', JSON,
     ["not utf-8", "0xff"], None),
    ("lone surrogate", "chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', JSON,
     ["not valid JSON", "surrogate"], None),
    ("NaN temperature", "completions", COMPLETION + b', "temperature": NaN}', JSON,
     ["'temperature' is NaN", "finite"], "temperature"),
    ("NaN max_tokens", "completions", b'{"model": "tiny", "prompt": "a", "max_tokens": NaN}',
     JSON, ["'max_tokens' is NaN"], "max_tokens"),
    ("Infinity top_p", "chat/completions", CHAT + b', "top_p": Infinity}', JSON,
     ["'top_p' is Infinity", "finite"], "top_p"),
    ("Infinity timeout", "completions", COMPLETION + b', "timeout": Infinity}', JSON,
     ["'timeout' is Infinity"], "timeout"),
    ("-Infinity temperature", "chat/completions", CHAT + b', "temperature": -Infinity}', JSON,
     ["'temperature' is -Infinity", "finite"], "temperature"),
    ("NaN streaming", "chat/completions", CHAT + b', "stream": true, "temperature": NaN}', JSON,
     ["'temperature' is NaN"], "temperature"),
    ("-Infinity in the prompt's ids", "completions",
     b'{"model": "tiny", "prompt": [1, -Infinity], "max_tokens": 2}', JSON,
     ["'prompt.1' is -Infinity"], "prompt.1"),
    ("-Infinity in logit_bias", "completions",
     COMPLETION + b', "logit_bias": {"50256": -Infinity}}', JSON,
     ["'logit_bias.50256' is -Infinity"], "logit_bias.50256"),
    ("1e999", "completions", COMPLETION + b', "timeout": 1e999}', JSON,
     ["number out of range", "'timeout' is 1e999"], "timeout"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "route", "body", "headers", "words", "param"), BAD, ids=[b[0] for b in BAD]
)
async def test_a_bad_body_is_a_400_naming_the_problem(
    client: httpx.AsyncClient,
    case: str,
    route: str,
    body: bytes,
    headers: dict[str, str],
    words: list[str],
    param: str | None,
) -> None:
    r = await client.post(f"/v1/{route}", content=body, headers=headers)
    assert r.status_code == 400, (case, r.text)
    assert r.headers["content-type"] == "application/json"  # not an event stream
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    for word in words:
        assert word in err["message"], err["message"]
    assert len(err["message"]) < 300  # a 100,000-deep or 5,000-digit body is not echoed back
    await assert_serves(client)


async def test_a_number_past_a_float_is_named_not_echoed(client: httpx.AsyncClient) -> None:
    body = COMPLETION + b', "seed": 1' + b"0" * 5000 + b"}"
    r = await client.post("/v1/completions", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "number out of range" in message
    assert "5001 characters" in message
    await assert_serves(client)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\xef\xbb\xbf" + COMPLETION + b"}", JSON),  # a UTF-8 byte order mark
        ((COMPLETION + b"}").decode().encode("utf-16"), JSON),  # Python's json read UTF-16 too
        (COMPLETION + b"}", {"content-type": "application/json; charset=utf-8"}),
        (COMPLETION + b"}", {"content-type": "application/merge-patch+json"}),
        (b"\n " + COMPLETION + b', "temperature": 0.5, "top_p": 1e-3}' + b"\n", JSON),
    ],
    ids=["bom", "utf-16", "charset", "+json", "whitespace and exponents"],
)
async def test_bodies_served_before_are_still_served(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
) -> None:
    r = await client.post("/v1/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


async def test_streaming_still_streams(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", content=CHAT + b', "stream": true, "temperature": 0}', headers=JSON
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")


async def test_integers_past_64_bits_stay_exact(client: httpx.AsyncClient) -> None:
    """orjson would read 2**64 as a float ("a valid integer"); the bound is still named."""
    too_big = COMPLETION + b', "seed": 18446744073709551616}'
    r = await client.post("/v1/completions", content=too_big, headers=JSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "seed"
    assert "less than or equal to 18446744073709551615" in err["message"]
    served = await client.post(
        "/v1/completions", content=COMPLETION + b', "seed": 18446744073709551615}', headers=JSON
    )
    assert served.status_code == 200, served.text
