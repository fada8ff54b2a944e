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
  that is down is refused fast (503) instead of tying up worker threads.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote

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
from gateway.model_config import ConfigError, ModelConfig, UpstreamOptions
from gateway.runtimes.base import Runtime, Tensors, TensorSpec

logger = logging.getLogger(__name__)

#: Jitter added to each backoff, as a fraction of it.
JITTER = 0.1
#: Longest piece of an upstream's error body quoted in our messages.
_MAX_QUOTED = 300
#: Timeout of :meth:`UpstreamRuntime.ready` (capped by the configured timeout).
_READY_TIMEOUT_S = 2.0


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
        remote_name = self.options.model_name or name
        model_path = f"/v2/models/{quote(remote_name, safe='')}"
        if self.options.model_version:
            model_path += f"/versions/{quote(self.options.model_version, safe='')}"
        self.model_url = self.base_url + model_path
        self.infer_url = self.model_url + "/infer"
        self.ready_url = self.model_url + "/ready"
        cb = self.options.circuit_breaker
        self.breaker = CircuitBreaker(cb.failure_threshold, cb.reset_timeout_s, name=self.base_url)
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._warned_integrity = False
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
                        headers=self._headers,
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
                        f"model {self.name!r}: upstream {self.model_url} returned invalid "
                        f"model metadata: {exc}"
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
            self.model_url,
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
            response = self.client.get(self.ready_url, timeout=timeout)
        except httpx.HTTPError as exc:
            logger.debug("upstream %s not ready: %s", self.ready_url, _describe(exc))
            return False
        return response.status_code == 200

    # -- inference ----------------------------------------------------------------------

    def predict(self, inputs: Tensors, output_names: list[str] | None = None) -> Tensors:
        body: dict[str, Any] = {"inputs": [self._encode(n, a) for n, a in inputs.items()]}
        requested = output_names
        if requested is None and self.config.outputs is not None:
            # config.yaml narrowed the outputs: do not ship the others over the network
            requested = [s.name for s in self.outputs]
        if requested is not None:
            body["outputs"] = [{"name": n} for n in requested]
        payload = _dumps(body)
        self.breaker.before_call()
        try:
            answer = self._call("POST", self.infer_url, content=payload)
            result = self._decode(answer, inputs, output_names)
        except _Rejected:
            self.breaker.record_success()  # the upstream is alive and answering
            raise
        except BaseException:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    # -- HTTP with retries --------------------------------------------------------------

    def _call(self, method: str, url: str, content: bytes | None = None) -> Any:
        """One logical call: retries, then the parsed JSON body, or a GatewayError."""
        opts = self.options
        headers = {"Content-Type": "application/json"} if content is not None else None
        last: _Retryable | None = None
        for attempt in range(opts.retries + 1):
            if last is not None:
                delay = opts.backoff_s * 2 ** (attempt - 1)
                delay += random.uniform(0, JITTER * delay)
                if last.retry_after_s is not None:
                    delay = max(delay, min(last.retry_after_s, opts.max_retry_after_s))
                logger.warning(
                    "upstream %s %s failed (%s); retry %d/%d in %.2fs",
                    method,
                    url,
                    last.cause,
                    attempt,
                    opts.retries,
                    delay,
                )
                self.on_retry()
                self._backoff(delay)
            self._before_attempt(url, last)
            try:
                return self._attempt(method, url, content, headers)
            except _Retryable as exc:
                last = exc
        assert last is not None
        attempts = opts.retries + 1
        if last.timeout:
            raise UpstreamTimeout(
                f"upstream {url} timed out after {opts.timeout_s:g}s"
                + (f" ({attempts} attempts)" if attempts > 1 else "")
            )
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        extra = {}
        if last.retry_after_s is not None:
            extra["Retry-After"] = str(max(1, math.ceil(last.retry_after_s)))
        raise UpstreamError(f"upstream {url} failed{tries}: {last.cause}", headers=extra)

    def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry (a subclass may end the wait early)."""
        time.sleep(delay)

    def _before_attempt(self, url: str, last: _Retryable | None) -> None:
        """Called before each attempt is sent, ``last`` the previous one's failure (a
        subclass may refuse to send it by raising)."""

    def _attempt(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str] | None
    ) -> Any:
        try:
            response = self.client.request(method, url, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Retryable(_describe(exc), timeout=True) from exc
        except httpx.TransportError as exc:
            raise _Retryable(_describe(exc)) from exc
        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = _retry_after(response) if status in (429, 503) else None
            raise _Retryable(f"HTTP {status}{_error_detail(response)}", retry_after_s=retry_after)
        if 400 <= status < 500:
            raise _Rejected(
                f"upstream {url} rejected the request (HTTP {status}){_error_detail(response)}"
            )
        if status != 200:
            raise UpstreamError(
                f"upstream returned an invalid response: unexpected HTTP {status} from {url}"
            )
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"upstream returned an invalid response: {url} sent a body that is not JSON "
                f"({_snippet(response.text)!r})"
            ) from None

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
                self.infer_url,
                theirs,
                extra={"model": self.name},
            )

    def _decode(self, answer: Any, inputs: Tensors, output_names: list[str] | None) -> Tensors:
        self._note_upstream_integrity(answer)
        try:
            return self._decode_outputs(answer, inputs, output_names)
        except ValueError as exc:
            raise UpstreamError(
                f"upstream returned an invalid response: {self.infer_url}: {exc}"
            ) from None

    def _decode_outputs(
        self, answer: Any, inputs: Tensors, output_names: list[str] | None
    ) -> Tensors:
        if not isinstance(answer, dict) or not isinstance(answer.get("outputs"), list):
            raise ValueError("expected an object with an 'outputs' list")
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
    return array.astype(want)


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


def _error_detail(response: httpx.Response) -> str:
    """``': <message>'`` from an OIP ``{"error": ...}`` body, else from the raw text."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        text = response.text.strip()
        return f": {_snippet(text)}" if text else ""
    if isinstance(body, dict) and "error" in body:
        return f": {_snippet(str(body['error']))}"
    return f": {_snippet(response.text)}"


def _snippet(text: str) -> str:
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _describe(exc: httpx.HTTPError) -> str:
    detail = str(exc)
    kind = type(exc).__name__
    return f"{kind}: {detail}" if detail else kind
