"""A third-party MLaaS reached over the Open Inference Protocol (KServe V2) REST API.

The gateway treats the remote model like a local one: :meth:`UpstreamRuntime.load` reads the
remote model's metadata, :meth:`UpstreamRuntime.predict` forwards an already validated (and
possibly batched) request as OIP JSON and decodes the answer back into numpy arrays.

Resilience, per logical call:

* retries with exponential backoff (``backoff_s * 2**attempt`` plus a little jitter) on
  connection errors, timeouts, 5xx and 429 (honouring ``Retry-After`` up to a cap);
* no retry on other 4xx -- our input was already validated, so a rejection is reported as
  502 with the upstream's own error message;
* a :class:`~gateway.circuit_breaker.CircuitBreaker` around the whole call, so that a remote
  that is down is refused fast (503) instead of tying up worker threads;
* the caller's deadline (the batch's latest, given by the batcher) bounds the whole call: no
  attempt starts after it, a backoff that would end after it is not waited, and an attempt's
  timeout is ``timeout_s`` or the time left until it, whichever is less; the call then ends
  in :class:`~gateway.errors.UpstreamTimeout` saying that the caller's deadline passed. Once
  nobody waits for the answer the worker thread is free again (without it, the retries ran
  on for ``(retries + 1) * timeout_s`` plus backoffs after every caller had been answered).

An answer is trusted no further than it has to be: ``timeout_s`` bounds each attempt's whole
answer (httpx's own timeout bounds each read, which a trickled answer never trips), the
answer is read up to ``max_response_bytes`` (:data:`MAX_RESPONSE_BYTES` by default) after
decompression, one for another model or
version is refused, and an output is converted to its declared datatype only when no value
changes. Credentials (the URL's user info, the configured header values) never appear in a
message: an upstream's error body that quotes them is redacted before it is quoted.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import numpy as np
import orjson

from fides_core.oip import (
    DATATYPES,
    TensorError,
    decode_json_tensor,
    encode_json_tensor,
    oip_datatype,
)
from gateway.circuit_breaker import CircuitBreaker
from gateway.errors import (
    BadRequest,
    GatewayError,
    ModelLoadError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.model_config import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ConfigError,
    ModelConfig,
    UpstreamOptions,
)
from gateway.runtimes.base import Runtime, Tensors, TensorSpec

logger = logging.getLogger(__name__)

#: Jitter added to each backoff, as a fraction of it.
JITTER = 0.1
#: Longest piece of an upstream's error body quoted in our messages.
_MAX_QUOTED = 300
#: Timeout of :meth:`UpstreamRuntime.ready` (capped by the configured timeout).
_READY_TIMEOUT_S = 2.0
#: Largest answer read from an upstream by default, after decompression (a model's JSON
#: outputs; four times the gateway's default request body limit). A larger one is an invalid
#: response. config.yaml's ``upstream.max_response_bytes`` sets it per model.
MAX_RESPONSE_BYTES = DEFAULT_MAX_RESPONSE_BYTES
#: Most of an error answer's body that is read (only its start is quoted).
_MAX_ERROR_BODY = 64 * 1024
#: Content codings asked for and accepted: zlib's inflate is bounded per chunk read (about
#: 1000:1), brotli's and zstd's are not, so a small body of theirs could inflate past memory.
_ENCODINGS = ("gzip", "deflate")
#: Shorter header values are not redacted from quoted text (they would blank out words).
_MIN_SECRET = 6
_REDACTED = "[redacted]"
#: The retry loop's clock (module-level, so that a test replacing ``time`` keeps it).
_now = time.monotonic


class _Rejected(UpstreamError):
    """The upstream answered 4xx: not retried and not a circuit-breaker failure."""


class _Retryable(Exception):
    """One failed attempt that may be retried (internal to the retry loop)."""

    def __init__(
        self, cause: str, *, timeout: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.timeout = timeout
        self.retry_after_s = retry_after_s
        #: a timeout of ours: the attempt was cut at the caller's deadline, before its own
        #: ``timeout_s`` (says nothing about the remote's health)
        self.cut = False


class _DeadlinePassed(UpstreamTimeout):
    """The caller's deadline ended the call (504). ``remote_failed``: an attempt before it
    failed the remote's way (a 5xx, a connection error, a whole ``timeout_s``), which the
    circuit breaker counts; otherwise the remote did not fail, it was only slower than the
    caller's deadline, and the breaker is told nothing."""

    def __init__(self, message: str, *, remote_failed: bool) -> None:
        super().__init__(message)
        self.remote_failed = remote_failed


class UpstreamRuntime(Runtime):
    """Forwards inference to a remote Open Inference Protocol endpoint.

    Thread-safe: one pooled :class:`httpx.Client` is shared by the worker threads.
    """

    platform = "upstream"

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        super().__init__(name, version, path, config)
        if config.upstream is None:  # ModelConfig already enforces this for 'upstream'
            raise ModelLoadError(f"model {name!r}: platform 'upstream' needs an 'upstream:' block")
        self.options: UpstreamOptions = config.upstream
        try:
            self._headers = self.options.resolved_headers()
        except ConfigError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from None
        self.base_url = self.options.url.rstrip("/")
        # what is requested, and what messages, logs and the breaker's name show: the URL
        # without its user info, which goes as basic auth instead (httpx logs each request's
        # URL at INFO: a password in it would be in the log once per call)
        self.shown_url = _without_userinfo(self.base_url)
        self._auth: httpx.BasicAuth | None = None
        if self.shown_url != self.base_url:
            parsed = httpx.URL(self.base_url)
            self._auth = httpx.BasicAuth(parsed.username, parsed.password)
        self._secrets = _secrets(self._headers.values(), urlsplit(self.base_url).password)
        #: Largest answer read, after decompression (config.yaml's max_response_bytes).
        self.max_response_bytes = self.options.max_response_bytes
        remote_name = self.options.model_name or name
        model_path = f"/v2/models/{quote(remote_name, safe='')}"
        if self.options.model_version:
            model_path += f"/versions/{quote(self.options.model_version, safe='')}"
        self.model_url = self.base_url + model_path
        self.infer_url = self.model_url + "/infer"
        self.ready_url = self.model_url + "/ready"
        cb = self.options.circuit_breaker
        self.breaker = CircuitBreaker(cb.failure_threshold, cb.reset_timeout_s, name=self.shown_url)
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._warned_integrity = False
        # the deadline of the call each worker thread is making (read by _attempt, whose
        # signature subclasses override; None: no deadline but timeout_s per attempt)
        self._calling = threading.local()
        # set by the app to count retries in its metrics
        self.on_retry: Callable[[], None] = lambda: None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = httpx.Client(
                        timeout=self.options.timeout_s,
                        headers={"Accept-Encoding": ", ".join(_ENCODINGS), **self._headers},
                        auth=self._auth,
                        follow_redirects=False,
                    )
                client = self._client
        return client

    def load(self) -> None:
        """Read the remote model's metadata; fall back to config.yaml's specs if unreachable."""
        have_specs = self.config.inputs is not None and self.config.outputs is not None
        try:
            meta = self._call("GET", self.model_url)
        except _Rejected as exc:
            # The upstream is up but does not know the model: a configuration error.
            self.unload()
            raise ModelLoadError(f"model {self.name!r}: {exc.message}") from exc
        except GatewayError as exc:
            if not have_specs:
                self.unload()
                raise ModelLoadError(
                    f"model {self.name!r}: cannot read the upstream model's metadata "
                    f"({exc.message}); the upstream must be reachable at load time unless "
                    "config.yaml gives both 'inputs' and 'outputs'"
                ) from exc
            logger.warning(
                "model %r: upstream metadata unavailable (%s); using inputs/outputs from "
                "config.yaml",
                self.name,
                exc.message,
            )
        else:
            try:
                self.inputs = _parse_specs(meta, "inputs")
                self.outputs = _parse_specs(meta, "outputs")
            except ValueError as exc:
                if not have_specs:
                    self.unload()
                    raise ModelLoadError(
                        f"model {self.name!r}: upstream {self._show(self.model_url)} returned "
                        f"invalid model metadata: {exc}"
                    ) from exc
                logger.warning(
                    "model %r: ignoring invalid upstream metadata (%s); using config.yaml",
                    self.name,
                    exc,
                )
            else:
                self._warn_on_spec_mismatch()
        self.apply_config_specs()
        logger.info(
            "model %r v%d: upstream %s, %d input(s), %d output(s)",
            self.name,
            self.version,
            self._show(self.model_url),
            len(self.inputs),
            len(self.outputs),
        )

    def unload(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def ready(self) -> bool:
        """``GET .../ready`` once (no retries, no breaker): is the remote model ready?"""
        timeout = min(self.options.timeout_s, _READY_TIMEOUT_S)
        try:
            response = self.client.get(self._show(self.ready_url), timeout=timeout)
        except httpx.HTTPError as exc:
            logger.debug("upstream %s not ready: %s", self._show(self.ready_url), _describe(exc))
            return False
        return response.status_code == 200

    # -- inference ----------------------------------------------------------------------

    def fails_every_request(self, exc: Exception) -> bool:
        """A timeout, an open circuit, a 5xx or an unreadable answer is the remote's fault,
        whichever requests the batch held; a 4xx rejection may be one request's (each then
        runs on its own)."""
        return isinstance(exc, UpstreamTimeout | UpstreamError) and not isinstance(exc, _Rejected)

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        """Forward ``inputs``; ``deadline`` (``time.monotonic()``): when the last caller
        waiting for this answer gives up (the call ends then, see the module's docstring)."""
        if deadline is not None and _now() >= deadline:
            # before the breaker's admission: a call never made tells it nothing (and must not
            # hold a half-open breaker's one trial)
            raise _DeadlinePassed(
                f"upstream {self._show(self.infer_url)} not called: the caller's deadline had "
                "already passed",
                remote_failed=False,
            )
        body: dict[str, Any] = {"inputs": [self._encode(n, a) for n, a in inputs.items()]}
        requested = output_names
        if requested is None and self.config.outputs is not None:
            # config.yaml narrowed the outputs: do not ship the others over the network
            requested = [s.name for s in self.outputs]
        if requested is not None:
            body["outputs"] = [{"name": n} for n in requested]
        payload = _dumps(body)
        admitted = self.breaker.before_call()
        try:
            answer = self._call("POST", self.infer_url, content=payload, deadline=deadline)
            result = self._decode(answer, inputs, output_names)
        except _Rejected:
            self.breaker.record_success(admitted)  # the upstream is alive and answering
            raise
        except _DeadlinePassed as exc:
            # A cut attempt is a timeout of ours, not the remote's failure: counting it would
            # open the circuit on a healthy remote whenever callers set short deadlines (and
            # one cut trial would re-open a half-open one). It is no success either (no answer
            # came): the call is released without a verdict (a half-open trial's slot goes
            # to the next call). Failed attempts before the cut are the remote's failure,
            # counted as ever.
            if exc.remote_failed:
                self.breaker.record_failure(admitted)
            else:
                self.breaker.release(admitted)
            raise
        except BaseException:
            self.breaker.record_failure(admitted)
            raise
        self.breaker.record_success(admitted)
        return result

    # -- HTTP with retries --------------------------------------------------------------

    def _call(
        self,
        method: str,
        url: str,
        content: bytes | None = None,
        *,
        deadline: float | None = None,
    ) -> Any:
        """One logical call: retries, then the parsed JSON body, or a GatewayError; none of
        it past ``deadline`` (then :class:`_DeadlinePassed`)."""
        self._calling.deadline = deadline
        try:
            return self._retrying(method, url, content, deadline)
        finally:
            self._calling.deadline = None

    def _retrying(
        self, method: str, url: str, content: bytes | None, deadline: float | None
    ) -> Any:
        opts = self.options
        shown = self._show(url)
        headers = {"Content-Type": "application/json"} if content is not None else None
        last: _Retryable | None = None
        failed = 0  # attempts that failed the remote's way (not cut at the deadline)
        for attempt in range(opts.retries + 1):
            if last is not None:
                delay = opts.backoff_s * 2 ** (attempt - 1)
                delay += random.uniform(0, JITTER * delay)
                if last.retry_after_s is not None:
                    delay = max(delay, min(last.retry_after_s, opts.max_retry_after_s))
                left = math.inf if deadline is None else deadline - _now()
                if delay >= left:  # the retry would start after every caller has gone
                    raise _DeadlinePassed(
                        f"upstream {shown} failed ({last.cause}) and the caller's deadline "
                        f"passes before a retry could start (retry {attempt}/{opts.retries} "
                        f"was due in {delay:.2f}s, {max(left, 0.0):.2f}s were left); "
                        f"{_attempts(attempt)} made",
                        remote_failed=True,
                    )
                logger.warning(
                    "upstream %s %s failed (%s); retry %d/%d in %.2fs",
                    method,
                    shown,
                    last.cause,
                    attempt,
                    opts.retries,
                    delay,
                )
                self.on_retry()
                self._backoff(delay)
            if deadline is not None and _now() >= deadline:  # e.g. a backoff overslept
                raise _DeadlinePassed(
                    f"upstream {shown} not called: the caller's deadline had already passed"
                    if last is None
                    else f"upstream {shown} failed ({last.cause}) and the caller's deadline "
                    f"passed before retry {attempt}/{opts.retries}; {_attempts(attempt)} made",
                    remote_failed=failed > 0,
                )
            self._before_attempt(url, last)
            try:
                return self._attempt(method, url, content, headers)
            except _Retryable as exc:
                if exc.cut:
                    raise _DeadlinePassed(
                        f"upstream {shown} had not answered when the caller's deadline passed "
                        f"(attempt {attempt + 1} cut short of its {opts.timeout_s:g}s "
                        f"timeout_s); {_attempts(attempt + 1)} made"
                        + (f", the earlier failing ({last.cause})" if last is not None else ""),
                        remote_failed=failed > 0,
                    ) from None
                last = exc
                failed += 1
        assert last is not None
        attempts = opts.retries + 1
        if last.timeout:
            raise UpstreamTimeout(
                f"upstream {shown} timed out after {opts.timeout_s:g}s"
                + (f" ({attempts} attempts)" if attempts > 1 else "")
            )
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        extra = {}
        if last.retry_after_s is not None:
            extra["Retry-After"] = str(max(1, math.ceil(last.retry_after_s)))
        raise UpstreamError(f"upstream {shown} failed{tries}: {last.cause}", headers=extra)

    def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry (a subclass may end the wait early)."""
        time.sleep(delay)

    def _before_attempt(self, url: str, last: _Retryable | None) -> None:
        """Called before each attempt is sent, ``last`` the previous one's failure (a
        subclass may refuse to send it by raising)."""

    def _attempt(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str] | None
    ) -> Any:
        shown = self._show(url)
        invalid = f"upstream returned an invalid response: {shown}"
        start = _now()
        deadline = start + self.options.timeout_s  # the whole answer, not each read
        caller: float | None = getattr(self._calling, "deadline", None)
        # cut short at the caller's deadline: no answer is wanted after it
        cut = caller is not None and caller < deadline
        timeout: float | httpx.Timeout = self.client.timeout
        if cut:
            assert caller is not None
            deadline = caller
            timeout = max(caller - start, 0.001)
        try:
            return self._exchange(method, shown, content, headers, deadline, timeout, invalid)
        except _Retryable as exc:
            exc.cut = cut and exc.timeout
            raise

    def _exchange(
        self,
        method: str,
        shown: str,
        content: bytes | None,
        headers: dict[str, str] | None,
        deadline: float,
        timeout: float | httpx.Timeout,
        invalid: str,
    ) -> Any:
        """One request and its answer, the whole of it by ``deadline``."""
        try:
            with self.client.stream(
                method, shown, content=content, headers=headers, timeout=timeout
            ) as response:
                status = response.status_code
                coding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if coding not in ("identity", *_ENCODINGS):
                    raise UpstreamError(
                        f"{invalid} sent an answer in Content-Encoding {_snippet(coding)!r}; "
                        f"only {', '.join(_ENCODINGS)} are accepted"
                    )
                if status == 200:
                    body = self._read(response, self.max_response_bytes, deadline, shown)
                else:  # only its start is quoted
                    body = self._read(response, _MAX_ERROR_BODY, deadline, shown, truncate=True)
        except httpx.TimeoutException as exc:
            raise _Retryable(_describe(exc), timeout=True) from exc
        except httpx.TransportError as exc:
            raise _Retryable(_describe(exc)) from exc
        except httpx.HTTPError as exc:  # e.g. a body that does not inflate (DecodingError)
            raise UpstreamError(f"{invalid} sent an unreadable answer ({_describe(exc)})") from None
        if status == 429 or status >= 500:
            retry_after = _retry_after(response) if status in (429, 503) else None
            raise _Retryable(f"HTTP {status}{self._error_detail(body)}", retry_after_s=retry_after)
        if 400 <= status < 500:
            raise _Rejected(
                f"upstream {shown} rejected the request (HTTP {status}){self._error_detail(body)}"
            )
        if status != 200:
            raise UpstreamError(
                f"upstream returned an invalid response: unexpected HTTP {status} from {shown}"
            )
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            text = self._redact(body[: _MAX_QUOTED * 4].decode("utf-8", "replace"))
            raise UpstreamError(
                f"{invalid} sent a body that is not JSON ({_snippet(text)!r})"
            ) from None

    def _read(
        self,
        response: httpx.Response,
        limit: int,
        deadline: float,
        shown: str,
        *,
        truncate: bool = False,
    ) -> bytes:
        """The (decompressed) body, up to ``limit`` bytes (more: an invalid response, or cut
        when ``truncate``), read by ``deadline`` (else a timed-out attempt)."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                if truncate:
                    chunks.append(chunk[: len(chunk) - (size - limit)])
                    break
                raise UpstreamError(
                    f"upstream returned an invalid response: {shown} sent an answer larger "
                    f"than {_size(limit)} (the most that is read from an upstream)"
                )
            chunks.append(chunk)
            if _now() > deadline:
                raise _Retryable(
                    f"the answer was still arriving after {self.options.timeout_s:g}s",
                    timeout=True,
                )
        return b"".join(chunks)

    def _show(self, url: str) -> str:
        """``url`` as it is requested and shown: without the user info of the base URL."""
        return url.replace(self.base_url, self.shown_url, 1)

    def _redact(self, text: str) -> str:
        """``text`` (quoted from an upstream) without our credentials in it."""
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    def _error_detail(self, body: bytes) -> str:
        """``': <message>'`` from an OIP ``{"error": ...}`` body, else from the raw text."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and "error" in parsed:
            text = str(parsed["error"])
        else:
            text = body.decode("utf-8", "replace").strip()
        return f": {_snippet(self._redact(text))}" if text else ""

    # -- encoding / decoding ------------------------------------------------------------

    def _encode(self, name: str, array: np.ndarray) -> dict[str, Any]:
        spec = next((s for s in self.inputs if s.name == name), None)
        datatype = oip_datatype(array.dtype)
        if spec is not None and spec.datatype == "BF16" and datatype == "FP32":
            datatype = "BF16"
        try:
            return encode_json_tensor(name, array, datatype)
        except TensorError as exc:
            raise BadRequest(f"{exc}; it cannot be sent to the upstream as JSON") from None

    def _note_upstream_integrity(self, answer: Any) -> None:
        """Say once (not silently) that the upstream's own integrity parameters are not
        passed on: its evidence binds the batch this gateway sent, not a client's request,
        and this gateway's verification (its own enclave) is what its answers carry."""
        params = answer.get("parameters") if isinstance(answer, dict) else None
        if self._warned_integrity or not isinstance(params, dict):
            return
        theirs = sorted(k for k in params if isinstance(k, str) and k.startswith("integrity_"))
        if theirs:
            self._warned_integrity = True
            logger.warning(
                "upstream %s answers with its own integrity parameters %s; they are not passed "
                "on (its evidence covers the batch this gateway sent, not a client's request): "
                "give this model an integrity block to verify it here",
                self._show(self.infer_url),
                theirs,
                extra={"model": self.name},
            )

    def _decode(self, answer: Any, inputs: Tensors, output_names: list[str] | None) -> Tensors:
        self._note_upstream_integrity(answer)
        try:
            return self._decode_outputs(answer, inputs, output_names)
        except ValueError as exc:
            raise UpstreamError(
                f"upstream returned an invalid response: {self._show(self.infer_url)}: {exc}"
            ) from None

    def _decode_outputs(
        self, answer: Any, inputs: Tensors, output_names: list[str] | None
    ) -> Tensors:
        if not isinstance(answer, dict) or not isinstance(answer.get("outputs"), list):
            raise ValueError("expected an object with an 'outputs' list")
        # an answer that names another model or version is not an answer to this request
        # (a misrouting proxy or load balancer): refused, even if its outputs look right
        remote = self.options.model_name or self.name
        their_name = answer.get("model_name")
        if their_name is not None and their_name != remote:
            raise ValueError(f"answered for model {_snippet(str(their_name))!r}, not {remote!r}")
        version, theirs = self.options.model_version, answer.get("model_version")
        if version and theirs is not None and str(theirs) != version:
            raise ValueError(
                f"answered for version {_snippet(str(theirs))!r}, not {version!r} (config.yaml's "
                "upstream.model_version)"
            )
        decoded: Tensors = {}
        for item in answer["outputs"]:
            name, array = decode_json_tensor(item, "output")
            if name in decoded:
                raise ValueError(f"output {name!r} appears twice")
            decoded[name] = array
        wanted = output_names if output_names is not None else [s.name for s in self.outputs]
        missing = [n for n in wanted if n not in decoded]
        if missing:
            raise ValueError(f"missing output(s) {missing}")
        if wanted:  # exactly the outputs asked for, or those the model declares
            decoded = {n: decoded[n] for n in wanted}
        specs = {s.name: s for s in self.outputs}
        batch = _batch_size(inputs) if self.config.max_batch_size > 0 else None
        for name, array in decoded.items():
            spec = specs.get(name)
            if spec is not None:
                decoded[name] = _conform(name, array, spec)
            if batch is not None and (array.ndim == 0 or array.shape[0] != batch):
                raise ValueError(
                    f"output {name!r} has shape {list(array.shape)} but the batch has "
                    f"{batch} row(s)"
                )
        return decoded

    def _warn_on_spec_mismatch(self) -> None:
        for kind, configured, remote in (
            ("input", self.config.inputs, self.inputs),
            ("output", self.config.outputs, self.outputs),
        ):
            if configured is None:
                continue
            known = {s.name for s in remote}
            unknown = [t.name for t in configured if t.name not in known]
            if unknown:
                logger.warning(
                    "model %r: config.yaml %s(s) %s are not in the upstream's metadata %s",
                    self.name,
                    kind,
                    unknown,
                    sorted(known),
                )


# -- helpers ------------------------------------------------------------------------------


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        # e.g. a numpy dtype orjson does not handle natively: go through Python lists.
        for tensor in body["inputs"]:
            if isinstance(tensor["data"], np.ndarray):
                tensor["data"] = tensor["data"].tolist()
        return orjson.dumps(body)


def _parse_specs(meta: Any, key: str) -> list[TensorSpec]:
    if not isinstance(meta, dict) or not isinstance(meta.get(key), list):
        raise ValueError(f"expected an object with an {key!r} list")
    specs = []
    for item in meta[key]:
        if not isinstance(item, dict):
            raise ValueError(f"{key}: expected objects, got {item!r}")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{key}: tensor without a name: {item!r}")
        if datatype not in DATATYPES:
            raise ValueError(f"{key}: {name!r} has unknown datatype {datatype!r}")
        if not _is_int_list(shape) or any(d < -1 for d in shape):
            raise ValueError(f"{key}: {name!r} has invalid shape {shape!r}")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return specs


def _is_int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    )


def _conform(name: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Check an output against its spec; cast between numeric datatypes when they differ."""
    if len(spec.shape) != array.ndim or any(
        d != -1 and d != a for d, a in zip(spec.shape, array.shape, strict=True)
    ):
        raise ValueError(
            f"output {name!r} has shape {list(array.shape)}, expected {list(spec.shape)}"
        )
    want = DATATYPES[spec.datatype]
    if array.dtype == want:
        return array
    if (array.dtype == np.object_) != (want == np.object_):
        raise ValueError(f"output {name!r} is {array.dtype}, expected {spec.datatype}")
    with np.errstate(all="ignore"):
        cast = array.astype(want)
        if want.kind == "f" and array.dtype.kind == "f":
            # a narrower float rounds (as FP32 does anyway), but a finite value stays finite
            exact = bool(np.array_equal(np.isfinite(cast), np.isfinite(array)))
        else:  # every value must survive the trip: no truncated fraction, no wrapped integer
            exact = bool(
                np.array_equal(cast, array)  # numpy compares int64 with uint64 by value
                and np.array_equal(cast.astype(array.dtype), array)  # and ints beyond 2**53
            )
    if not exact:
        raise ValueError(
            f"output {name!r} has values that cannot be {spec.datatype} (the upstream sent "
            f"{oip_datatype(array.dtype)}; they would be changed, not converted)"
        )
    return cast


def _batch_size(inputs: Tensors) -> int | None:
    for array in inputs.values():
        if array.ndim > 0:
            return int(array.shape[0])
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _snippet(text: str) -> str:
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _describe(exc: httpx.HTTPError) -> str:
    detail = str(exc)
    kind = type(exc).__name__
    return f"{kind}: {detail}" if detail else kind


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (httpx sends it as basic auth; it is a secret)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _secrets(header_values: Iterable[str], password: str | None) -> list[str]:
    """What must not be quoted: each configured header value and its credential alone (the
    token after ``Bearer``/``Basic``), the URL's password; longest first."""
    found = set()
    for value in header_values:
        found.add(value.strip())
        found.add(value.strip().rpartition(" ")[2])
    if password:
        found.update((password, unquote(password)))
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)
