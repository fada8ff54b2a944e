"""The /v1 body parser's second pass: Python's ``json`` re-reads a body only where orjson read
an integer past 64 bits as a float (so that it stays exact and its bound is named), never
because a prompt (a string) holds long runs of digits, which cost about 30% more parse time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from gateway.api.openai.json_body import parse_json_object

JSON = {"content-type": "application/json"}


@pytest.fixture
def reparses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the texts Python's ``json.loads`` parsed (it still parses them)."""
    calls: list[int] = []
    loads: Callable[..., Any] = json.loads

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(text))
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", spy)  # the module json_body calls it through
    return calls


def digit_prompt(size: int) -> str:
    """Code-like text of about ``size`` characters, full of 20- to 40-digit runs."""
    line = "x = 12345678901234567890123 * 98765432109876543210 + 31415926535897932384626433\n"
    return line * (size // len(line))


def test_digits_in_strings_keep_the_fast_path(reparses: list[int]) -> None:
    """A 100 KB prompt, chat content, stop strings, a user id and logit_bias keys (strings)
    full of long digit runs, and token ids: orjson's parse, no second pass."""
    prompt = digit_prompt(100_000)
    for doc in (
        {"model": "tiny", "prompt": prompt, "max_tokens": 2, "seed": 18446744073709551615},
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "stop": ["00000000000000000000000"],
            "user": "user-123456789012345678901234",
            "logit_bias": {"123456789012345678901": -100},
        },
        {"model": "tiny", "prompt": list(range(25_000)), "stop": [prompt[:500]] * 4},
    ):
        raw = orjson.dumps(doc)
        assert len(raw) > 100_000
        assert parse_json_object(raw) == doc
    assert reparses == []


@pytest.mark.parametrize(
    "value",
    [2**64, 2**64 - 1 + 10**10, 10**30, -(2**63) - 1, -(10**25)],
    ids=["2**64", "past u64", "10**30", "-2**63-1", "-10**25"],
)
@pytest.mark.parametrize("where", ["seed", "prompt list", "logit_bias"])
def test_an_integer_past_64_bits_stays_exact(reparses: list[int], value: int, where: str) -> None:
    """A number value past 64 bits, at the top or nested, in a body whose prompt has digit runs
    too: read again by Python's json, exact (orjson alone gives a float)."""
    base: dict[str, Any] = {"model": "tiny", "prompt": digit_prompt(2000)}
    doc = {
        "seed": {**base, "seed": value},
        "prompt list": {**base, "prompt": [1, [2, value]]},
        "logit_bias": {**base, "logit_bias": {"7": value}},
    }[where]
    text = json.dumps(doc)  # compared as text: 2**64 == float(2**64) in Python
    assert json.dumps(orjson.loads(text)) != text  # a float: what the second pass is for
    assert json.dumps(parse_json_object(text.encode())) == text
    assert reparses == [len(text)]


def test_integers_within_64_bits_are_orjson_s(reparses: list[int]) -> None:
    """2**64 - 1 and -2**63 (20 and 19 digits) are exact in orjson: no second pass."""
    doc = {"a": 2**64 - 1, "b": -(2**63), "c": [9999999999999999999, 0.1234567890123456789]}
    text = json.dumps(doc)
    assert json.dumps(parse_json_object(text.encode())) == text
    assert reparses == []


async def test_a_seed_below_64_bits_is_named(client: httpx.AsyncClient) -> None:
    """-2**63 - 1 has 19 digits: the 20-digit filter let orjson's float through, refused as
    "a valid integer"; the bound is named as for 2**64. -2**63 is served."""
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2, "seed": %d}'
    r = await client.post("/v1/completions", content=body % (-(2**63) - 1), headers=JSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "seed"
    assert "greater than or equal to -9223372036854775808" in err["message"], err
    ok = await client.post("/v1/completions", content=body % -(2**63), headers=JSON)
    assert ok.status_code == 200, ok.text


async def test_a_prompt_of_digit_runs_is_served(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "n = 123456789012345678901234567890", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
