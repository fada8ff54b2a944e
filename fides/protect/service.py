"""The service to protect, opened with the gateway's own runtimes.

A repository model (onnx, torch, or an ``upstream`` entry) is loaded as the gateway loads it;
a remote endpoint goes through :class:`gateway.runtimes.upstream.UpstreamRuntime` (pooled
HTTP, retries with backoff on 5xx / 429 / timeouts, ``Retry-After``, a circuit breaker). The
kit therefore sees the service exactly as the fronting gateway will, with one difference for
a paid endpoint: a redirect (3xx) or a 204 / 205 (no content) is refused at once, by name
(:class:`NotAnswered`), neither followed, retried nor taken for an unusable answer.
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus
from pathlib import Path

import httpx
import numpy as np

from gateway.errors import GatewayError, UpstreamError
from gateway.model_config import ConfigError, ModelConfig, UpstreamOptions, load_model_config
from gateway.runtimes import Runtime, runtime_class
from gateway.runtimes.base import TensorSpec
from gateway.runtimes.upstream import UpstreamRuntime

__all__ = ["NotAnswered", "Service", "ServiceError", "open_service"]

log = logging.getLogger(__name__)

_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8}


class ServiceError(RuntimeError):
    """The service cannot be opened or queried; the message names what is wrong."""


class NotAnswered(UpstreamError):
    """The endpoint answered a request without an answer: a redirect (3xx) or no content
    (204 / 205). Not retried: a redirect is configuration (the endpoint moved, or the URL is
    not the inference endpoint), not a passing fault, and a 204 says the request succeeded
    with nothing to say, which asking again does not change (and may be billed again)."""


#: Statuses that say, by definition, that the response has no body.
NO_CONTENT = (204, 205)


def _phrase(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _shown(url: httpx.URL) -> str:
    """``url`` without what may be a secret: user info and the query (a signed URL's)."""
    shown = url.copy_with(username=None, password=None, query=None, fragment=None)
    return str(shown) + ("?..." if url.query else "")


def _location(url: httpx.URL, location: str | None) -> str:
    """A redirect's Location as the user would read it: absolute, without secrets."""
    if not location:
        return "no Location header"
    try:
        return f"Location {_shown(url.join(location))}"
    except (httpx.InvalidURL, ValueError, TypeError):
        return f"Location {location[:200]!r} (not a valid URL)"


def _refuse_unanswered(response: httpx.Response) -> None:
    """An httpx response hook: a redirect or a response without content is no answer."""
    status = response.status_code
    url = response.request.url
    if 300 <= status < 400:
        where = _location(url, response.headers.get("Location"))
        raise NotAnswered(
            f"upstream {_shown(url)} redirected the request ({_phrase(status)}, {where}); not "
            "followed: a paid query carries your credentials and is sent only to the endpoint "
            "the configuration names. Nothing was answered or counted as paid for. If the "
            "endpoint moved and you trust its new address, set service.upstream.url to it"
        )
    if status in NO_CONTENT:
        raise NotAnswered(
            f"upstream {_shown(url)} answered {_phrase(status)}: a response without a body, "
            "where an inference endpoint answers 200 with the outputs (is service.upstream "
            "the model's OIP endpoint?). Not counted as an answer nor as paid for (a provider "
            "that bills such requests counts them where the kit does not), and not retried"
        )


class _PaidEndpoint(UpstreamRuntime):
    """The gateway's upstream runtime, with redirects and empty answers refused by name
    (:class:`NotAnswered`) before its retry loop sees them (it would take them for an
    invalid answer, which the query client counts as paid for and unusable)."""

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        super().__init__(name, version, path, config)
        self._hook_lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        client = super().client  # made on first use, again after an unload
        hooks = client.event_hooks["response"]
        if _refuse_unanswered not in hooks:
            with self._hook_lock:
                if _refuse_unanswered not in hooks:
                    hooks.append(_refuse_unanswered)
        return client

    def ready(self) -> bool:
        try:
            return super().ready()
        except NotAnswered:
            return False


class Service:
    """One classifier: images (float32 NCHW in [0, 1]) in, one answer row per image out."""

    def __init__(self, runtime: Runtime, output: str | None, identity: str) -> None:
        self.runtime = runtime
        self.identity = identity  # what the answer store is keyed to
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


def _open(runtime: Runtime, output: str | None, identity: str) -> Service:
    """Load ``runtime`` and check it is a classifier (unloaded again when it is not)."""
    try:
        runtime.load()
    except GatewayError as exc:
        raise ServiceError(f"{identity}: {exc.message}") from None
    try:
        return Service(runtime, output, identity)
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
        identity = f"upstream {upstream.url.rstrip('/')}/v2/models/{remote}"
        if upstream.model_version:
            identity += f"/versions/{upstream.model_version}"
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
        return _open(runtime, output, identity)
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
