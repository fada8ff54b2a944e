"""The gateway subclasses uvicorn's httptools protocol (an internal): the installed uvicorn must
be in the range pyproject.toml pins and still have every piece the subclass relies on."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import http_protocol
from gateway.http_protocol import internals_problems, limited_http_protocol

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _uvicorn_requirement() -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    deps = project["optional-dependencies"]["server"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "uvicorn")


def test_uvicorn_is_pinned_to_a_range_with_an_upper_bound() -> None:
    req = _uvicorn_requirement()
    assert any(s.operator in ("<", "<=", "==") for s in req.specifier), (
        "uvicorn needs an upper bound in pyproject.toml: gateway/http_protocol.py subclasses "
        "one of its internals"
    )
    installed = version("uvicorn")
    assert req.specifier.contains(installed), (
        f"uvicorn {installed} is installed, outside the range {req.specifier} that "
        "gateway/http_protocol.py was checked against"
    )


def test_every_uvicorn_internal_the_subclass_uses_is_there() -> None:
    problems = internals_problems()
    assert not problems, (
        f"uvicorn {version('uvicorn')} changed what gateway/http_protocol.py relies on: "
        + "; ".join(problems)
    )


def test_a_changed_internal_is_named_and_the_server_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the check does fail, by name, when an internal goes away or changes."""

    def on_header(self: object, name: bytes) -> None: ...

    monkeypatch.setattr(HttpToolsProtocol, "on_header", on_header)
    monkeypatch.delattr(HttpToolsProtocol, "send_400_response")
    problems = internals_problems()
    assert "HttpToolsProtocol.send_400_response is gone" in problems
    assert "HttpToolsProtocol.on_header takes ['name'], not ['name', 'value']" in problems
    with pytest.raises(RuntimeError, match="is not supported by gateway/http_protocol.py"):
        limited_http_protocol(10.0)
    assert http_protocol.LimitedHttpToolsProtocol.max_head_bytes == 64 * 1024
