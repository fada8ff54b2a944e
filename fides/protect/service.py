"""The service to protect, opened with the gateway's own runtimes.

A repository model (onnx, torch, or an ``upstream`` entry) is loaded as the gateway loads it;
a remote endpoint goes through :class:`gateway.runtimes.upstream.UpstreamRuntime` (pooled
HTTP, retries with backoff on 5xx / 429 / timeouts, ``Retry-After``, a circuit breaker). The
kit therefore sees the service as the fronting gateway will, with differences for a paid
endpoint (:class:`_PaidEndpoint`): a request is retried only where the provider cannot have
processed it (a failure after it was sent is :class:`PossiblyPaid`, counted as paid for); a
redirect (3xx), an async 202 or a 204 / 205 (no content) is refused at once, by name
(:class:`NotAnswered`), neither followed, retried nor taken for an unusable answer; nothing
is sent (nor retried) once the run is stopped; and no credential of the URL is ever shown.
"""

from __future__ import annotations

import logging
import re
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from gateway.errors import GatewayError, UpstreamError
from gateway.model_config import ConfigError, ModelConfig, UpstreamOptions, load_model_config
from gateway.runtimes import Runtime, runtime_class
from gateway.runtimes.base import TensorSpec
from gateway.runtimes.upstream import UpstreamRuntime, _Rejected, _Retryable

__all__ = [
    "NotAnswered",
    "NotSent",
    "PossiblyPaid",
    "Service",
    "ServiceError",
    "open_service",
]

log = logging.getLogger(__name__)

_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8}


class ServiceError(RuntimeError):
    """The service cannot be opened or queried; the message names what is wrong."""


class NotAnswered(_Rejected):
    """The endpoint answered a request without an answer: a redirect (3xx), an async
    acceptance (202) or no content (204 / 205). Not retried: a redirect is configuration (the
    endpoint moved, or the URL is not the inference endpoint), not a passing fault, and a 202
    / 204 says the request was taken (asking again may be billed again). Not a circuit-breaker
    failure (the endpoint is up and answering). ``possibly_paid``: the response says the
    request was (or will be) processed, so a provider may bill it (202, 204, 205, 303)."""

    def __init__(self, message: str, *, possibly_paid: bool = False) -> None:
        super().__init__(message)
        self.possibly_paid = possibly_paid


class PossiblyPaid(UpstreamError):
    """A request was sent and then failed without an answer in a way that does not say the
    provider did not process it (a read timeout, a connection broken after the request was
    sent, a 5xx other than 503): not retried, and its batch counted as possibly paid for."""


class NotSent(UpstreamError):
    """The run was stopped (Ctrl-C, SIGTERM) before this request (or its retry) was sent."""


#: Statuses that say, by definition, that the response has no body.
NO_CONTENT = (204, 205)
#: Statuses that say the request was taken and will be (or was) processed elsewhere / later.
TAKEN = (202, 303)

#: Failures of a paid request that say the provider cannot have processed it: retried.
#: (httpx.ConnectError: no connection was made; a connect or pool timeout: nothing was sent.)
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Statuses of a paid request that say it was not processed: retried (with Retry-After).
_NOT_PROCESSED = (429, 503)

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _without_userinfo(url: str) -> str:
    """``url`` without the ``user:password@`` of its authority (the rest as it is written)."""
    return _USERINFO.sub(r"\1", url)


def _phrase(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _shown(url: httpx.URL) -> str:
    """``url`` without what may be a secret: user info, path parameters (``;jsessionid=``),
    the query (a signed URL's) and the fragment; ``...`` marks what was left out."""
    path, params, _ = url.path.partition(";")
    shown = url.copy_with(username=None, password=None, path=path, query=None, fragment=None)
    dropped = bool(params) or bool(url.query) or bool(url.fragment)
    return str(shown) + ("..." if dropped else "")


def _shown_text(location: str) -> str:
    """A Location httpx cannot parse, as :func:`_shown` would show it: cut at the first ``?``,
    ``#`` or ``;`` and without anything before an ``@`` (user info), at most 200 characters."""
    text = re.split(r"[?#;]", location, maxsplit=1)[0]
    dropped = len(text) < len(location)
    if "@" in text:
        scheme, sep, rest = text.partition("://")
        text = (scheme + sep if sep else "") + (rest if sep else text).rsplit("@", 1)[1]
    if len(text) > 200:
        text, dropped = text[:200], True
    return text + ("..." if dropped else "")


def _moved_base(request: httpx.URL, target: httpx.URL) -> str | None:
    """The base URL to set (service.upstream.url) when ``target`` (a Location) is the same
    OIP path (``/v2/models/<name>[/versions/<v>][/infer]``) as the request's, elsewhere."""
    at = request.path.rfind("/v2/models/")
    path = target.path.partition(";")[0]
    if at < 0 or not path.endswith(request.path[at:]):
        return None
    base = target.copy_with(
        username=None,
        password=None,
        path=path[: len(path) - len(request.path) + at] or "/",
        query=None,
        fragment=None,
    )
    return str(base).rstrip("/")


def _asked(method: str, url: httpx.URL) -> str:
    """The request, by its method and path (the message is prefixed with the service's
    name, which gives the endpoint's URL: it is not repeated)."""
    return f"{method} {url.path.partition(';')[0]}"


def _redirect(method: str, url: httpx.URL, status: int, location: str | None) -> NotAnswered:
    """The refusal of a redirect: where it points (without secrets), and what to do."""
    paid = status in TAKEN
    target: httpx.URL | None = None
    if not location:
        where = "no Location header"
    else:
        try:
            target = url.join(location)
            where = f"Location {_shown(target)}"
        except (httpx.InvalidURL, ValueError, TypeError):
            where = f"Location {_shown_text(location)!r} (not a valid URL)"
    base = _moved_base(url, target) if target is not None and not paid else None
    if base is not None:
        where = f"to the same model's path under {base}"
    advice = (
        " If the endpoint moved and you trust its new address, set service.upstream.url to "
        + ("that base URL" if base is not None else "its base URL (what comes before /v2/)")
        + ": the answer store is tied to the endpoint's URL, so the new one needs a new "
        "--answers file (the kit starts over; the answers recorded here stay where they are)"
    )
    if paid:  # 303 See Other: the request was processed, its result is elsewhere
        counted = (
            " The provider may have processed and billed it (a 303 points to its result), so "
            "its inputs are counted as paid for; nothing was answered or recorded."
        )
        advice = " Point service.upstream.url at an endpoint that answers 200 with the outputs"
    else:
        counted = " Nothing was answered; not counted as paid for (a redirect is no answer)."
    return NotAnswered(
        f"{_asked(method, url)} was redirected ({_phrase(status)}, {where}); not "
        "followed: a paid query carries your credentials and is sent only to the endpoint "
        f"the configuration names.{counted}{advice}",
        possibly_paid=paid,
    )


def _refuse_unanswered(response: httpx.Response) -> None:
    """An httpx response hook: a redirect, an async acceptance or a response without content
    is no answer (a 304 Not Modified, to a request that asked for none, too)."""
    status = response.status_code
    url = response.request.url
    method = response.request.method
    if 300 <= status < 400 and status != 304:
        raise _redirect(method, url, status, response.headers.get("Location"))
    if status == 304:
        raise NotAnswered(
            f"{_asked(method, url)} was answered {_phrase(status)} to a request that asked for no "
            "cached copy: not an inference endpoint's answer (is service.upstream the model's "
            "OIP endpoint?). Nothing was answered; not counted as paid for, not retried"
        )
    if status == 202:
        raise NotAnswered(
            f"{_asked(method, url)} was answered {_phrase(status)}: an asynchronous endpoint "
            "queued the request, to be answered later elsewhere, which the kit does not fetch "
            "(point service.upstream at a synchronous OIP endpoint that answers 200 with the "
            "outputs). The provider may bill the queued request: its inputs are counted as "
            "paid for; nothing was recorded, and it is not retried",
            possibly_paid=True,
        )
    if status in NO_CONTENT:
        raise NotAnswered(
            f"{_asked(method, url)} was answered {_phrase(status)}: a response without a body, "
            "where an inference endpoint answers 200 with the outputs (is service.upstream "
            "the model's OIP endpoint?). The server says it processed the request, so the "
            "provider may bill it: its inputs are counted as paid for; nothing was recorded, "
            "and it is not retried",
            possibly_paid=True,
        )


class _PaidEndpoint(UpstreamRuntime):
    """The gateway's upstream runtime for a paid endpoint:

    * redirects, async acceptances and empty answers refused by name (:class:`NotAnswered`)
      before its retry loop sees them (it would take them for an invalid answer);
    * an inference request retried only when the provider cannot have processed it (no
      connection, a connect or pool timeout, 429, 503); any other failure after it was sent
      is :class:`PossiblyPaid`, not retried (a retry could be billed again);
    * ``stop`` (set on Ctrl-C / SIGTERM): no request and no retry is sent once it is set, and
      a retry's backoff ends at once (:class:`NotSent`);
    * user info in the URL (``https://user:password@host``) sent as basic auth, never shown:
      the runtime's URLs (its messages, logs) are without it."""

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        super().__init__(name, version, path, config)
        self._hook_lock = threading.Lock()
        self.stop = threading.Event()
        self._auth: httpx.BasicAuth | None = None
        raw = self.options.url.rstrip("/")
        clean = _without_userinfo(raw)
        if clean != raw:
            parsed = httpx.URL(raw)
            self._auth = httpx.BasicAuth(parsed.username, parsed.password)
            self.base_url = clean
            for attr in ("model_url", "infer_url", "ready_url"):
                setattr(self, attr, clean + getattr(self, attr)[len(raw) :])
            self.breaker.name = clean

    @property
    def client(self) -> httpx.Client:
        client = super().client  # made on first use, again after an unload
        hooks = client.event_hooks["response"]
        if _refuse_unanswered not in hooks:
            with self._hook_lock:
                if _refuse_unanswered not in hooks:
                    if self._auth is not None:
                        client.auth = self._auth
                    hooks.append(_refuse_unanswered)
        return client

    def ready(self) -> bool:
        try:
            return super().ready()
        except NotAnswered:
            return False

    def _backoff(self, delay: float) -> None:
        """A retry's backoff, ended at once by ``stop``."""
        self.stop.wait(delay)

    def _before_attempt(self, url: str, last: _Retryable | None) -> None:
        """No request (or retry) is sent once ``stop`` is set."""
        if self.stop.is_set():
            raise NotSent(
                f"upstream {url}: not sent, the run was stopped"
                + (f" (after {last.cause})" if last is not None else "")
            )

    def _attempt(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str] | None
    ) -> Any:
        """One attempt; for a paid request (a POST), a failure that may have been processed
        is :class:`PossiblyPaid` (not retried) rather than retried."""
        try:
            return super()._attempt(method, url, content, headers)
        except _Retryable as exc:
            if method != "POST" or isinstance(exc.__cause__, _UNSENT):
                raise
            status = re.match(r"HTTP (\d{3})", exc.cause)
            if status is not None and int(status.group(1)) in _NOT_PROCESSED:
                raise
            raise PossiblyPaid(
                f"{method} {urlsplit(url).path} failed after the request was sent "
                f"({exc.cause}); not retried: the provider may have processed and billed it"
            ) from None


class Service:
    """One classifier: images (float32 NCHW in [0, 1]) in, one answer row per image out."""

    def __init__(
        self, runtime: Runtime, output: str | None, identity: str, legacy_identity: str = ""
    ) -> None:
        self.runtime = runtime
        self.identity = identity  # what the answer store is keyed to (never a credential)
        # what an earlier version named this service (with a URL's user info): its stores
        # are this service's (adopted, and re-recorded under ``identity``)
        self.legacy_identity = legacy_identity
        # set on Ctrl-C / SIGTERM: a paid endpoint sends no request (nor retry) once it is
        self.stop: threading.Event = getattr(runtime, "stop", None) or threading.Event()
        if len(runtime.inputs) != 1:
            raise ServiceError(
                f"{identity} takes {len(runtime.inputs)} inputs "
                f"({[s.name for s in runtime.inputs]}); a classifier of images takes one"
            )
        self.input: TensorSpec = runtime.inputs[0]
        if self.input.datatype not in _DTYPES:
            raise ServiceError(
                f"{identity}: input {self.input.name!r} is {self.input.datatype}; images are "
                f"sent as one of {sorted(_DTYPES)}"
            )
        names = [s.name for s in runtime.outputs]
        if output is None:
            if len(names) != 1:
                raise ServiceError(
                    f"{identity} has outputs {names}: name the class scores with service.output"
                )
            output = names[0]
        elif output not in names:
            raise ServiceError(f"{identity} has no output {output!r} (outputs: {names})")
        self.output = output
        spec = next(s for s in runtime.outputs if s.name == output)
        # [batch, C] class scores (C >= 2), or [batch] / [batch, 1] integer class indices
        dims = list(spec.shape[1:])
        scores = len(dims) == 1 and dims[0] != 1
        indices = (dims in ([], [1])) and spec.datatype.startswith(("INT", "UINT"))
        if not (scores or indices):
            raise ServiceError(
                f"{identity} is not a classifier: output {output!r} is {spec.datatype} "
                f"{dims} per input, where a classifier answers [classes] scores or an "
                "integer class index"
            )
        self.index_answers = indices  # one class index per input, not a row of scores
        self.max_batch = runtime.config.max_batch_size
        if self.max_batch == 0:
            raise ServiceError(
                f"{identity} has max_batch_size 0 (no batch dimension); the kit sends batches "
                "of images"
            )

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[1:]) if self.max_batch > 0 else tuple(self.input.shape)

    def check_images(self, image_shape: tuple[int, ...]) -> None:
        """Raises :class:`ServiceError` when images of ``image_shape`` ([C, H, W]) cannot be
        sent to the service as they are."""
        want = self.item_shape
        ok = len(want) == len(image_shape) and all(
            w in (-1, g) for w, g in zip(want, image_shape, strict=True)
        )
        if not ok:
            raise ServiceError(
                f"{self.identity} takes {self.input.name!r} of shape {list(want)} per image "
                f"({self.input.datatype}), but the inputs are {list(image_shape)} ([C, H, W]): "
                "give images the service was built for"
            )

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Images (float32 [n, C, H, W] in [0, 1]) as the service takes them."""
        dtype = _DTYPES[self.input.datatype]
        if dtype is np.uint8:
            return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(x, dtype=dtype)

    def ask(self, batch: np.ndarray) -> np.ndarray:
        """The service's answers to an encoded batch (thread-safe; raises GatewayError)."""
        out = self.runtime.predict({self.input.name: batch}, [self.output])
        return np.asarray(out[self.output])

    def close(self) -> None:
        self.runtime.unload()


def _open(runtime: Runtime, output: str | None, identity: str, legacy: str = "") -> Service:
    """Load ``runtime`` and check it is a classifier (unloaded again when it is not)."""
    try:
        runtime.load()
    except GatewayError as exc:
        raise ServiceError(f"{identity}: {exc.message}") from None
    try:
        return Service(runtime, output, identity, legacy)
    except ServiceError:
        runtime.unload()
        raise


#: The longest a provider's Retry-After is waited, unless service.upstream sets its own.
PROTECT_RETRY_AFTER_S = 120.0


def open_service(
    *,
    repository: Path | None,
    model: str | None,
    upstream: UpstreamOptions | None,
    output: str | None,
    max_batch_size: int,
) -> Service:
    """The service of a protect file: ``model`` of ``repository`` (its latest version), or
    the ``upstream`` endpoint."""
    if upstream is not None:
        if "max_retry_after_s" not in upstream.model_fields_set:
            # a batch client is not answering anyone while it waits: honour a provider's
            # Retry-After (up to 2 minutes) rather than retry into more 429s
            upstream = upstream.model_copy(update={"max_retry_after_s": PROTECT_RETRY_AFTER_S})
        remote = upstream.model_name or "model"
        path = f"/v2/models/{remote}"
        if upstream.model_version:
            path += f"/versions/{upstream.model_version}"
        raw = upstream.url.rstrip("/")
        identity = f"upstream {_without_userinfo(raw)}{path}"  # no password in any message
        legacy = f"upstream {raw}{path}" if _without_userinfo(raw) != raw else ""
        config = ModelConfig(
            name=upstream.model_name,
            platform="upstream",
            max_batch_size=max_batch_size,
            upstream=upstream,
        )
        try:
            runtime: Runtime = _PaidEndpoint(remote, 1, Path("."), config)
        except GatewayError as exc:
            raise ServiceError(f"{identity}: {exc.message}") from None
        return _open(runtime, output, identity, legacy)
    assert model is not None
    assert repository is not None
    model_dir = repository / model
    try:
        config = load_model_config(model_dir / "config.yaml", model)
    except ConfigError as exc:
        raise ServiceError(f"model {model!r} of {repository}: {exc}") from None
    if config.platform == "causal_lm":
        raise ServiceError(f"model {model!r} is a causal_lm (text generation), not a classifier")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ServiceError(f"model {model!r}: no version directory in {model_dir}")
    identity = f"model {model!r} v{versions[-1]} of {repository.resolve()}"
    try:
        runtime = runtime_class(config.platform)(
            model, versions[-1], model_dir / str(versions[-1]), config
        )
    except GatewayError as exc:
        raise ServiceError(f"{identity}: {exc.message}") from None
    return _open(runtime, output, identity)
