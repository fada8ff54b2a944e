"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (KServe's
grpc_predict_v2 with Triton's statistics, model configuration and repository extensions), on
the same data plane, API keys and limits as the REST routes, in the same process and event loop.

Health (``ServerLive``, ``ServerReady``) answers without a key, as ``/v2/health`` does, and so
does the standard ``grpc.health.v1.Health`` service (``Check`` and ``Watch``, for Kubernetes'
gRPC probes and grpc-health-probe): ``SERVING`` for the server (service ``""``) and for
``inference.GRPCInferenceService`` while the gateway is ready, ``NOT_SERVING`` while it is not
(a model still loading, a verified model whose enclave cannot verify) and from the moment it
starts shutting down; any other service name is ``NOT_FOUND``. Every other call needs a user
key in ``authorization: Bearer <key>`` or ``x-api-key`` metadata, and repository load / unload
an admin key. A gateway error becomes the gRPC status its HTTP status maps to, with the same
message; a 503's ``Retry-After`` travels as ``retry-after`` trailing metadata.

A caller must not be able to hold the server without a key or without sending: gRPC counts a
call from its headers, before its message arrives, so every method of the service is a
stream-unary handler (the same bytes on the wire as unary: unary clients call it unchanged)
that checks the key as the call starts, then takes one of :data:`MAX_CONCURRENT_CALLS` slots
(``RESOURCE_EXHAUSTED`` beyond; health and ``ServerLive`` / ``ServerReady`` take none), then
reads the one request message within ``body_timeout_s`` (``DEADLINE_EXCEEDED`` after it, as the
HTTP routes answer 408). gRPC itself has no cap on calls (its cap would count the keyless and
the stalled too, and refuse health with them); the channel arguments bound each connection
instead (:func:`channel_options`). A message larger than ``max_body_bytes`` (after
decompression) is refused by gRPC itself with ``RESOURCE_EXHAUSTED``. A client that cancels
mid-call cancels its inference (counted as ``CANCELLED``, or ``DEADLINE_EXCEEDED`` when its
deadline passed), and an inference never outlives the call's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gateway.api.oip_grpc import oip_pb2 as pb
from gateway.api.oip_grpc.protocol import encode_infer_response, parse_infer_request
from gateway.auth import KeyChecker
from gateway.dataplane import DEADLINE_SLACK_S, DataPlane
from gateway.errors import BadRequest, GatewayError, NotFound, PayloadTooLarge
from gateway.integrity.alarm import client_id
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings

__all__ = ["SERVICE", "GrpcServer"]

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
MAX_CONCURRENT_CALLS = 2048  # keyed calls at once (health, ServerLive and ServerReady apart)

# Per-connection bounds (channel arguments). Streams: Go's HTTP/2 server and nginx default to
# 250 and 128; a client past it queues its calls, it is not refused. A connection with no call
# for 5 minutes is closed (clients reconnect on their next call); every connection is closed
# after 30 minutes (+-10% jitter, gRPC's), its calls given 60 s to finish (longer than the
# default inference timeout) before they are cancelled, health Watch streams included (their
# clients watch again): a health call that never sends its message, the one kind no timeout
# of the gateway's own ends, lives about 34 minutes at most.
MAX_STREAMS_PER_CONNECTION = 256
CONNECTION_IDLE_MS = 5 * 60 * 1000
CONNECTION_AGE_MS = 30 * 60 * 1000
CONNECTION_AGE_GRACE_MS = 60 * 1000

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
HEALTH_REFRESH_S = 1.0  # how often Watch streams see a change of readiness


class ReadinessHealth(health_aio.HealthServicer):  # type: ignore[misc]  # untyped upstream
    """``grpc.health.v1.Health`` answering from the gateway's readiness: recomputed at every
    ``Check``, and every :data:`HEALTH_REFRESH_S` for ``Watch`` streams (:meth:`run`)."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready

    async def refresh(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.set(service, status)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self.refresh()
        return await super().Check(request, context)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(HEALTH_REFRESH_S)


class MessageTimeout(GatewayError):
    """A keyed call's request message did not arrive within ``body_timeout_s``."""

    status, reason = 408, "body_timeout"


class TooManyCalls(GatewayError):
    """Every one of the server's slots for keyed calls is taken."""

    status, reason = 429, "too_many_calls"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: the message size limit and the connection bounds."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        # a second gateway on the same port must fail to start, not share the traffic
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
        ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS),
    ]


def status_code(exc: GatewayError) -> grpc.StatusCode:
    """The gRPC status of a gateway error (by its HTTP status; INTERNAL for anything else)."""
    return _CODES.get(exc.status, grpc.StatusCode.INTERNAL)


class GrpcServer:
    """One ``grpc.aio`` server bound to ``settings.host:settings.grpc_port``."""

    def __init__(
        self,
        dataplane: DataPlane,
        keys: KeyChecker,
        metrics: GatewayMetrics,
        settings: Settings,
        *,
        max_calls: int | None = None,
    ) -> None:
        """``max_calls``: keyed calls at once (:data:`MAX_CONCURRENT_CALLS` unless given)."""
        self.dp = dataplane
        self.keys = keys
        self.metrics = metrics
        self.settings = settings
        self.max_calls = MAX_CONCURRENT_CALLS if max_calls is None else max_calls
        self.calls = 0  # keyed calls holding a slot now
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self.health = ReadinessHealth(lambda: self.dp.ready()[0])
        self._health_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (``grpc_port`` 0 picks one)."""
        # no maximum_concurrent_rpcs: gRPC would count calls before their key and message
        server = grpc.aio.server(options=channel_options(self.settings.max_body_bytes))
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = self.settings.host
        address = f"[{host}]" if ":" in host else host
        try:
            port: int = server.add_insecure_port(f"{address}:{self.settings.grpc_port}")
        except RuntimeError as exc:
            port, reason = 0, str(exc)
        else:
            reason = "address already in use, or not a local address"
        if port == 0:
            raise RuntimeError(
                f"cannot serve gRPC on {address}:{self.settings.grpc_port} ({reason}); set "
                "FIDES_GRPC_PORT to a free port, or FIDES_GRPC_ENABLED=false to serve HTTP only"
            )
        await server.start()
        self._server, self.port = server, port
        self._health_task = asyncio.create_task(self.health.run(), name="grpc-health")
        log.info("gRPC Open Inference Protocol serving", extra={"grpc_port": port})
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and let those in flight finish for up to ``grace_s``; health
        answers NOT_SERVING from the start (and Watch streams are told)."""
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    # -- dispatch -------------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        table: dict[str, tuple[Handler, Any, str]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, "none"),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, "none"),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, "user"),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, "user"),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, "user"),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, "user"),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest, "user"),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, "user"),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, "user"),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest, "admin"),
            "RepositoryModelUnload": (
                self.repository_unload,
                pb.RepositoryModelUnloadRequest,
                "admin",
            ),
        }
        methods = {
            name: grpc.stream_unary_rpc_method_handler(
                self._guarded(name, handler, auth),
                request_deserializer=_deserializer(request_type),
                # ModelInfer answers arrive serialised (protocol.encode_infer_response)
                response_serializer=_serialized if name == "ModelInfer" else _serialize,
            )
            for name, (handler, request_type, auth) in table.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _guarded(self, method: str, handler: Handler, auth: str) -> Handler:
        """``handler`` behind the key check and a call slot, fed the call's one message, with
        its outcome counted and timed and a gateway error turned into its gRPC status."""
        requests = self.metrics.grpc_requests
        duration = self.metrics.grpc_duration.labels(method)

        async def call(messages: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            slot = False
            try:
                if auth != "none":
                    key = _presented(context)
                    if auth == "admin":
                        self.keys.check_admin_key(key)
                    else:
                        self.keys.check_user_key(key)
                    if self.calls >= self.max_calls:
                        raise TooManyCalls(
                            f"the gateway runs at most {self.max_calls} gRPC calls at once; "
                            "retry later",
                            headers={"Retry-After": "1"},
                        )
                    self.calls += 1
                    slot = True
                request = await self._message(context)
                if isinstance(request, Undecodable):
                    raise BadRequest(request.message)
                return await handler(request, context)
            except GatewayError as exc:
                code = status_code(exc)
                trailers = tuple((k.lower(), v) for k, v in exc.headers.items())
                await context.abort(code, exc.message, trailers)
            except asyncio.CancelledError:
                code = _ended_code(context)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("gRPC %s failed", method)
                await context.abort(code, "internal error (logged by the gateway)")
            finally:
                if slot:
                    self.calls -= 1
                requests.labels(method, code.name).inc()
                duration.observe(time.perf_counter() - t0)

        return call

    async def _message(self, context: grpc.aio.ServicerContext) -> Any:
        """The call's request message, within ``body_timeout_s`` of its start. Messages after
        the first are not read (a unary client sends one)."""
        limit_s = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(limit_s):
                request = await context.read()
        except TimeoutError:
            raise MessageTimeout(
                f"request message not received within {limit_s:g} s of the call's start"
            ) from None
        if request is grpc.aio.EOF:
            # What the call shows when gRPC refused a message over max_receive_message_length
            # (the client has that RESOURCE_EXHAUSTED already), when the client cancelled
            # before sending it, or for a stream without one. A cancellation is usually
            # delivered with the EOF: one turn of the loop lets it land (counted CANCELLED).
            await asyncio.sleep(0)
            raise PayloadTooLarge(
                "the call ended without a request message (gRPC refuses one over "
                f"{self.settings.max_body_bytes} bytes, FIDES_MAX_BODY_BYTES)"
            )
        return request

    # -- health and metadata --------------------------------------------------------------------

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ok, _ = self.dp.ready()
        return pb.ServerReadyResponse(ready=ok)

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _model_name(request.name)
        try:
            why = self.dp.not_ready(name, request.version or None)
        except NotFound:
            raise
        except GatewayError as exc:  # e.g. not serving yet: not ready, and no error
            why = exc.message
        return pb.ModelReadyResponse(ready=why is None)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(self.dp.server_metadata(), pb.ServerMetadataResponse())

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.dp.model_metadata(_model_name(request.name), request.version or None)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    # -- inference ------------------------------------------------------------------------------

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _model_name(request.model_name)
        version = request.model_version or None
        # unknown model or full queue: refused before decoding
        servable = self.dp.admit(name, version)
        req = parse_infer_request(
            request,
            max_elements=self.settings.max_tensor_elements,
            max_inputs=len(servable.inputs),
            max_outputs=len(servable.outputs),
        )
        remaining = context.time_remaining()  # None: the client set no deadline
        deadline = None if remaining is None else time.monotonic() + remaining
        resp = await self.dp.infer(
            name, version, req, client_id(_presented(context)), deadline=deadline
        )
        return encode_infer_response(resp)

    # -- extensions -----------------------------------------------------------------------------

    async def model_statistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.version and not request.name:
            raise BadRequest("a version needs a model name")
        stats = self.dp.model_statistics(request.name or None, request.version or None)
        return json_format.ParseDict(
            stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
        )

    async def model_config(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        config = self.dp.model_config(_model_name(request.name), request.version or None)
        msg = json_format.ParseDict(config, pb.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=msg)

    async def repository_index(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _one_repository(request.repository_name)
        rows = self.dp.repository.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows]
        )

    async def repository_load(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _one_repository(request.repository_name)
        _no_load_parameters(request)
        await self.dp.repository.load(_model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _one_repository(request.repository_name)
        _no_load_parameters(request, allowed={"unload_dependents"})  # no ensembles: no dependents
        await self.dp.repository.unload(_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()


class Undecodable:
    """A request whose bytes are not its message: answered INVALID_ARGUMENT by name (gRPC's
    own answer to a deserializer that raises is UNKNOWN, with Python's exception text)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _deserializer(request_type: Any) -> Callable[[bytes], Any]:
    def parse(payload: bytes) -> Any:
        try:
            return request_type.FromString(payload)
        except DecodeError as exc:
            return Undecodable(
                f"the request is not a valid {request_type.DESCRIPTOR.name} message ({exc})"
            )

    return parse


def _serialize(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())


def _serialized(payload: bytes) -> bytes:
    return payload


def _ended_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """How a call that gRPC cancelled under its handler ended: its deadline passed, or the
    client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _presented(context: grpc.aio.ServicerContext) -> str | None:
    metadata = dict(context.invocation_metadata() or ())
    value = KeyChecker.presented_in(lambda k: _text(metadata.get(k)))
    return value


def _text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _model_name(name: str) -> str:
    if not name:
        raise BadRequest("the model name is empty")
    return name


def _one_repository(name: str) -> None:
    if name:
        raise NotFound(
            f"unknown repository {name!r}: the gateway serves one model repository; leave "
            "repository_name empty"
        )


def _no_load_parameters(request: Any, allowed: frozenset[str] | set[str] = frozenset()) -> None:
    unsupported = sorted(set(request.parameters) - allowed)
    if unsupported:
        raise BadRequest(
            f"load and unload parameters {unsupported} are not supported: the model is "
            "(un)loaded as its directory in the repository holds it"
        )
