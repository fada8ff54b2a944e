"""The text-generation data plane: causal-LM models of the repository, admission (bounded
concurrency and queue), worker threads, streaming, cancellation and metrics.

Models are the repository's directories whose ``config.yaml`` says ``platform: causal_lm``,
loaded by the model repository (:func:`load_text_model`, served as
:class:`gateway.servables.TextServable`); their latest version directory holds the Hugging Face
target (and, by default, the draft in a sub-directory named by ``generation.draft``). Routes
(:mod:`gateway.api.openai`) translate HTTP to :meth:`GenerationService.submit` and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fides_core.layout import versions_on_disk
from gateway.errors import (
    BadRequest,
    GatewayError,
    ModelLoadError,
    QueueFull,
    RequestTimeout,
    Unavailable,
)
from gateway.generation.batch import unbatchable_layers
from gateway.generation.config import GenerationConfig
from gateway.generation.metrics import GenerationMetrics
from gateway.generation.scheduler import Scheduler
from gateway.generation.text import Detokenizer, chat_prompt
from gateway.model_config import ModelConfig

log = logging.getLogger(__name__)


class TextModels(Protocol):
    """Where the text models come from (the model repository)."""

    def text_models(self) -> list[TextModel]: ...

    def text_model(self, name: str) -> TextModel: ...


class InvalidGeneration(BadRequest):
    """A bad generation request; ``param`` names the offending field (OpenAI error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelRetired(Unavailable):
    """The model version is being unloaded (or replaced by a reload) and admits no request;
    the routes send a request that waited for it to the version that replaced it, if any."""


class GenerationCancelled(GatewayError):
    """What a generation's queue ends with when its client went away (nobody reads it)."""

    status, reason = 499, "cancelled"


# The ``finish_reason`` label of ``fides_generation_requests_total`` for a request its model's
# unload (or reload, or the gateway's shutdown) ended: stopped after the drain, or refused
# while it waited for a slot with no new version to take it. An operator's action, not an
# error; vLLM's name for a request ended from outside. The request itself answers 503 (a
# stream: an error event): OpenAI's ``finish_reason`` field has no such value.
ABORT = "abort"


# How long past its deadline a request waits for its worker's next item before it gives up:
# the worker stops a sequence at the first step boundary after the deadline and says so, so
# this only bounds a worker that is stuck (a forward that never returns).
ANSWER_GRACE_S = 30.0

# Prompts of more characters than this are tokenised (or templated) in a worker thread, so
# the event loop serves other requests meanwhile; shorter ones take well under a millisecond.
INLINE_PROMPT_CHARS = 8192


@dataclass
class Delta:
    """A piece of the completion: new text, tokens so far, and the finish reason at the end."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class TextModel:
    """A served causal LM: tokenizer, engine and limits."""

    name: str
    version: int
    config: GenerationConfig
    engine: Any  # SpeculativeEngine (torch is imported lazily)
    tokenizer: Any
    max_context: int
    eos_token_ids: frozenset[int]
    created: int
    scheduler: Scheduler
    slots: asyncio.Semaphore
    # the most characters of text one token stands for (None: unbounded or not known;
    # :func:`max_chars_per_token`): what refuses an over-long prompt before tokenising it
    chars_per_token: int | None = None
    waiting: int = 0
    active: set[GenerationHandle] = field(default_factory=set)
    retiring: asyncio.Event = field(default_factory=asyncio.Event)  # set: admits nothing more

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat: the messages through the model's chat template."""
        return chat_prompt(self.tokenizer, messages, self.config.chat_template)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.chat_text(messages))


@dataclass(eq=False)
class GenerationHandle:
    """One admitted request: iterate it for deltas; ``cancel`` stops the worker."""

    model: TextModel
    prompt_tokens: int
    deadline: float = math.inf  # time.perf_counter() past which the worker stops the sequence
    queue: asyncio.Queue[Delta | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    finish_reason: str | None = None
    slot_released: bool = False
    # why the server stopped it (its model is unloading): what the request answers with;
    # None while only its client can stop it
    error: GatewayError | None = None

    def cancel(self, error: GatewayError | None = None) -> None:
        """Stop the worker at its next step; either way it ends the handle's queue with a
        last item: ``error`` when the server stops it, else :class:`GenerationCancelled`
        (the client went away)."""
        if error is not None and self.error is None:
            self.error = error
        self.cancelled.set()

    def release_slot(self) -> None:
        """Give the model's slot back (once; on the event loop). The scheduler's thread
        schedules it before the request's last delta, so a client that has its answer can
        send the next request at once without being shed."""
        if not self.slot_released:
            self.slot_released = True
            self.model.active.discard(self)
            self.model.slots.release()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas until the one carrying ``finish_reason``; cancels the worker if abandoned.
        Never waits past the request's deadline + :data:`ANSWER_GRACE_S` (then a 504)."""
        try:
            while True:
                item = await self._next()
                if isinstance(item, BaseException):
                    raise item
                self.completion_tokens = item.completion_tokens
                if item.finish_reason is not None:
                    self.finish_reason = item.finish_reason
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def _next(self) -> Delta | BaseException:
        if not self.queue.empty():
            return self.queue.get_nowait()
        left = self.deadline + ANSWER_GRACE_S - time.perf_counter()
        if math.isinf(left):
            return await self.queue.get()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await self.queue.get()
        except TimeoutError:
            raise RequestTimeout(
                f"model '{self.model.name}' gave no answer within {ANSWER_GRACE_S:g} s past the "
                f"request's timeout ({self.completion_tokens} tokens generated)"
            ) from None

    async def result(self) -> str:
        parts = [d.text async for d in self.deltas()]
        return "".join(parts)


class GenerationService:
    """Admission, worker threads, streaming and metrics for the repository's text models."""

    def __init__(self, repository: TextModels, metrics: GenerationMetrics) -> None:
        self.repository = repository
        self.metrics = metrics

    def models(self) -> list[TextModel]:
        return self.repository.text_models()

    def get(self, name: str) -> TextModel:
        """The text model ``name``, or a 404 in OpenAI's terms naming what is available."""
        try:
            return self.repository.text_model(name)
        except GatewayError as exc:
            available = sorted(m.name for m in self.models())
            msg = (
                f"model '{name}' failed to load: {exc.message}"
                if isinstance(exc, Unavailable)
                else f"the model '{name}' does not exist; available: {available}"
            )
            raise InvalidGeneration(msg, param="model", code="model_not_found") from None

    def successor(self, retired: TextModel) -> TextModel:
        """The version that serves ``retired``'s name now (a reload swapped it in), or 503
        when none does (an unload): for a request the retired version did not start. The
        503 is the request's end, counted as :data:`ABORT`; one sent on is counted where it
        ends, on the new version."""
        with contextlib.suppress(GatewayError):
            model = self.repository.text_model(retired.name)
            if model is not retired and not model.retiring.is_set():
                return model
        self.metrics.requests.labels(retired.name, ABORT).inc()
        raise Unavailable(
            f"model '{retired.name}' was unloaded while the request waited for it; retry later"
        )

    # -- generation -----------------------------------------------------------------------------

    def check_prompt_chars(self, model: TextModel, text: str, param: str = "prompt") -> None:
        """A 400 before tokenising for a text too long to fit the context whatever its
        tokens (:func:`max_chars_per_token`); tokenising it could take a minute."""
        per_token = model.chars_per_token
        # c characters are at least c / per_token tokens: past this, no room for a completion
        if per_token is not None and len(text) > (model.max_context - 1) * per_token:
            raise InvalidGeneration(
                f"the prompt has {len(text)} characters, so at least "
                f"{-(-len(text) // per_token)} tokens (a token of this model stands for at most "
                f"{per_token} characters); this model's context is {model.max_context} tokens, "
                "which leaves no room for a completion",
                param=param,
                code="context_length_exceeded",
            )

    def check_lengths(
        self, model: TextModel, prompt: list[int], max_tokens: int | None, default: int | None
    ) -> int:
        """The max_tokens to use, or a 400 naming the parameter at fault."""
        if not prompt:
            raise InvalidGeneration("the prompt is empty", param="prompt")
        room = model.max_context - len(prompt)
        if room < 1:
            raise InvalidGeneration(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{model.max_context} tokens, which leaves no room for a completion",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room:
            raise InvalidGeneration(
                f"max_tokens ({max_tokens}) + the prompt's {len(prompt)} tokens exceed this "
                f"model's context of {model.max_context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    async def submit(
        self,
        model: TextModel,
        prompt: list[int],
        params: Any,
        stop: list[str],
        timeout_s: float | None = None,
    ) -> GenerationHandle:
        """Admit the request (wait for a slot, or 503 when the queue is full) and start it.
        ``timeout_s`` (default: the model's) counts from now, the wait for a slot included:
        504 when no slot frees in time; the worker stops the sequence when it passes.
        :class:`ModelRetired` when the model is being unloaded, at once or while waiting.
        Cancelled while waiting (its client went away), it leaves the queue, counted as
        cancelled, and nothing of it runs. Every way it ends is counted once in
        ``fides_generation_requests_total``: refused for a full queue as ``queue_full``; a
        :class:`ModelRetired` by the caller (:meth:`successor`), which alone knows whether a
        new version takes the request."""
        t_arrival = time.perf_counter()
        timeout_s = model.config.timeout_s if timeout_s is None else timeout_s
        gauge = self.metrics.waiting.labels(model.name)
        if model.retiring.is_set():
            raise _retired(model)
        if model.slots.locked() and model.waiting >= model.config.max_queue_size:
            self.metrics.requests.labels(model.name, "queue_full").inc()
            raise QueueFull(
                f"model '{model.name}' is busy: {model.config.max_concurrent_sequences} "
                f"sequences running and {model.waiting} waiting; retry later"
            )
        model.waiting += 1
        gauge.set(model.waiting)
        try:
            await _wait_for_slot(model, timeout_s)
        except TimeoutError:
            self.metrics.requests.labels(model.name, "timeout").inc()
            raise RequestTimeout(
                f"no sequence slot of model '{model.name}' came free within the request's "
                f"{timeout_s:g} s timeout ({model.config.max_concurrent_sequences} running); "
                "retry later"
            ) from None
        except asyncio.CancelledError:  # its client went away while it waited
            self.metrics.requests.labels(model.name, "cancelled").inc()
            raise
        finally:
            model.waiting -= 1
            gauge.set(model.waiting)
        handle = GenerationHandle(model, len(prompt), deadline=t_arrival + timeout_s)
        try:
            seq = model.engine.start(prompt, params)
            job = _Job(self, model, handle, seq, Detokenizer(model.tokenizer, stop))
        except BaseException:
            self.metrics.requests.labels(model.name, "error").inc()  # a 500: counted too
            handle.release_slot()
            raise
        if model.scheduler.on_step is None:
            model.scheduler.on_step = self._step_observer(model.name)
        job.begin(asyncio.get_running_loop(), t_arrival)
        model.active.add(handle)
        try:
            model.scheduler.submit(job)
        except RuntimeError as exc:  # the model is unloading
            job.finish(ABORT)
            handle.release_slot()
            raise Unavailable(str(exc)) from None
        return handle

    def _step_observer(self, name: str) -> Any:
        batch_size = self.metrics.batch_size.labels(name)
        cap = self.metrics.draft_cap.labels(name)
        alpha = self.metrics.acceptance_estimate.labels(name)

        def observe(engine: Any) -> None:  # on the scheduler's thread, after a step
            if engine.batch:
                batch_size.observe(len(engine.batch))
            if engine.last_cap is not None:
                cap.set(engine.last_cap)
                alpha.set(engine.policy.alpha)

        return observe

    def _count_round(self, name: str, rnd: Any) -> None:
        m = self.metrics
        m.emitted_tokens.labels(name).inc(len(rnd.tokens))
        if rnd.drafted:
            m.drafts.labels(name).inc()
            m.draft_tokens.labels(name).inc(rnd.drafted)
            if rnd.accepted:
                m.accepted_tokens.labels(name).inc(rnd.accepted)
                for pos in range(rnd.accepted):
                    m.per_position(name, pos).inc()


def _retired(model: TextModel) -> ModelRetired:
    return ModelRetired(f"model '{model.name}' version {model.version} is being unloaded")


async def _wait_for_slot(model: TextModel, timeout_s: float) -> None:
    """Take one of ``model``'s sequence slots: TimeoutError past ``timeout_s``,
    :class:`ModelRetired` once the model starts unloading (a version being retired starts
    nothing more); cancelled, it holds none."""
    if not model.slots.locked():
        await model.slots.acquire()  # free: returns at once
        return
    acquire = asyncio.ensure_future(model.slots.acquire())
    retired = asyncio.ensure_future(model.retiring.wait())
    got = False
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.wait((acquire, retired), return_when=asyncio.FIRST_COMPLETED)
        got = acquire.done() and not model.retiring.is_set()
    finally:
        retired.cancel()
        if not got:
            if not acquire.done():
                acquire.cancel()  # the semaphore hands a slot it gave meanwhile to the next
            elif not acquire.cancelled() and acquire.exception() is None:
                model.slots.release()
    if not got:
        raise _retired(model)


@dataclass(eq=False)
class _Job:
    """One admitted request as the model's scheduler drives it: rounds of the engine ->
    deltas on the handle's queue, metrics, the time limit and cancellation (all on the
    scheduler's thread, :mod:`gateway.generation.scheduler`)."""

    service: GenerationService
    model: TextModel
    handle: GenerationHandle
    seq: Any  # gateway.generation.engine.Sequence
    detok: Detokenizer
    loop: asyncio.AbstractEventLoop | None = None
    t_arrival: float = 0.0
    t_last: float = 0.0
    count: int = 0
    done: bool = False

    def begin(self, loop: asyncio.AbstractEventLoop, t_arrival: float) -> None:
        self.loop, self.t_arrival = loop, t_arrival
        m, name = self.service.metrics, self.model.name
        self.handle.stats = self.seq.stats
        m.running.labels(name).inc()
        m.prompt_tokens.labels(name).inc(self.seq.prompt_len)

    def put(self, item: Delta | BaseException) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us (shutdown)
            self.loop.call_soon_threadsafe(self.handle.queue.put_nowait, item)

    def finish(self, reason: str) -> None:
        """Count the request and give its slot back, before its last delta goes out: a
        client that saw it sees the metrics too, and can send its next request at once."""
        if self.done:
            return
        self.done = True
        m, name = self.service.metrics, self.model.name
        m.running.labels(name).dec()
        m.requests.labels(name, reason).inc()
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us (shutdown)
            self.loop.call_soon_threadsafe(self.handle.release_slot)

    def check(self) -> bool:
        handle = self.handle
        if handle.cancelled.is_set():
            # the queue always gets a last item: whoever still reads it must not wait forever
            if handle.error is not None:  # the server stopped it (its model is unloading)
                self.finish(ABORT)
                self.put(handle.error)
            else:
                self.finish("cancelled")
                self.put(GenerationCancelled("the client went away; generation cancelled"))
            return True
        if time.perf_counter() >= handle.deadline:
            self.finish("timeout")
            self.put(
                RequestTimeout(
                    f"generation timed out after {handle.deadline - self.t_arrival:g} s "
                    f"with {self.count} tokens generated (the request's timeout)"
                )
            )
            return True
        return False

    def on_round(self, rnd: Any) -> bool:
        m, name = self.service.metrics, self.model.name
        now = time.perf_counter()
        self.service._count_round(name, rnd)
        text, stopped = self.detok.add(rnd.tokens)
        # a stop string ends the completion at the token that completed it: the round's
        # tokens after it (accepted drafts) are not part of it, as plain decoding never made them
        n = self.detok.consumed
        if self.count == 0:
            m.ttft.labels(name).observe(now - self.t_arrival)
            itl_n = n - 1
            per_token = (now - self.t_arrival) / n
        else:
            itl_n = n
            per_token = (now - self.t_last) / n
        itl = m.itl.labels(name)
        for _ in range(itl_n):
            itl.observe(per_token)
        self.count += n
        self.t_last = now
        reason = "stop" if stopped else rnd.finished
        if reason is not None:
            if not stopped:
                text += self.detok.flush()
            m.tokens_per_second.labels(name).observe(self.count / max(now - self.t_arrival, 1e-9))
            self.finish(reason)
            self.put(Delta(text, self.count, reason))
            return True
        if text:
            self.put(Delta(text, self.count))
        return False

    def fail(self, exc: BaseException) -> None:
        # stopped by the server first: that is the answer, and how it is counted (the
        # scheduler's own "unloaded" RuntimeError, when its thread ends with the job still in
        # it, would be a 500)
        error = self.handle.error
        self.finish(ABORT if error is not None else "error")
        self.put(error if error is not None else exc)


def load_text_model(name: str, path: Path, cfg: ModelConfig) -> TextModel:
    """Load a causal LM model directory (its latest selected version): target, tokenizer and
    draft, the speculative engine and the admission limits (a thread; may be slow)."""
    from gateway.generation.engine import SpeculativeEngine
    from gateway.generation.runtime import (
        check_same_vocabulary,
        load_causal_lm,
        load_tokenizer,
    )
    from gateway.generation.schedule import Lookahead, SpeculationPolicy

    t0 = time.perf_counter()
    gen = cfg.generation or GenerationConfig()
    versions = versions_on_disk(path)
    if not versions:
        raise ModelLoadError(f"model '{name}': no version directories (1, 2, ...) in {path}")
    version = cfg.version_policy.select(versions)[-1]
    vdir = path / str(version)
    if gen.num_threads:
        import torch

        torch.set_num_threads(gen.num_threads)
    try:
        target = load_causal_lm(vdir / gen.target, gen.device, gen.dtype)
        tokenizer = load_tokenizer(vdir / gen.target)
        draft = None
        if gen.draft is not None and gen.num_speculative_tokens > 0:
            dpath = vdir / gen.draft
            draft = load_causal_lm(dpath, gen.device, gen.dtype)
            has_tok = any((dpath / f).is_file() for f in ("tokenizer.json", "vocab.json"))
            check_same_vocabulary(
                target, draft, tokenizer, load_tokenizer(dpath) if has_tok else None
            )
    except ModelLoadError as exc:
        raise ModelLoadError(f"model '{name}': {exc.message}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken model directory must not crash us
        raise ModelLoadError(f"model '{name}': {type(exc).__name__}: {exc}") from exc
    limit = target.max_positions or 2048
    if gen.max_context is not None and gen.max_context > limit:
        raise ModelLoadError(
            f"model '{name}': max_context {gen.max_context} exceeds the target's "
            f"max_position_embeddings {limit}"
        )
    max_context = gen.max_context or limit
    if draft is not None and draft.max_positions and draft.max_positions < max_context:
        raise ModelLoadError(
            f"model '{name}': the draft's max_position_embeddings {draft.max_positions} is below "
            f"the context of {max_context} tokens; set generation.max_context <= "
            f"{draft.max_positions} or use a draft with the target's context"
        )
    for role, lm in (("target", target), ("draft", draft)):
        kinds = unbatchable_layers(lm) if lm is not None else []
        if kinds:
            raise ModelLoadError(
                f"model '{name}': the {role}'s cache has {', '.join(kinds)} layers (sliding-window "
                "or other non-full attention); continuous batching serves full-attention models "
                "only"
            )
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(target.model.generation_config, "eos_token_id", None)
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos} if gen_eos else set()
    lookahead = Lookahead.from_config(gen, draft is not None)
    policy = None
    if draft is not None and gen.speculation == "auto" and lookahead.gamma:
        # the cap never needs to exceed what a sequence's own schedule may draft
        most = lookahead.gamma if lookahead.kind == "constant" else lookahead.maximum
        policy = SpeculationPolicy(most)
    engine = SpeculativeEngine(
        target, draft, lookahead, max_context, policy=policy, prefill_chunk=gen.prefill_chunk
    )
    calibration_s = engine.calibrate(gen.max_concurrent_sequences)
    log.info(
        "text model %s v%d loaded in %.2fs (draft: %s, k=%d, schedule %s, speculation %s; "
        "%.2fs of it measuring forward times), up to %d sequences per batch",
        name,
        version,
        time.perf_counter() - t0,
        gen.draft if draft is not None else "none",
        engine.lookahead.gamma,
        gen.schedule,
        gen.speculation if policy is not None else "fixed",
        calibration_s,
        gen.max_concurrent_sequences,
    )
    return TextModel(
        name=name,
        version=version,
        config=gen,
        engine=engine,
        tokenizer=tokenizer,
        max_context=max_context,
        eos_token_ids=frozenset(int(e) for e in eos),
        created=int(time.time()),
        scheduler=Scheduler(engine, name),
        slots=asyncio.Semaphore(gen.max_concurrent_sequences),
        chars_per_token=max_chars_per_token(tokenizer),
    )


# How much a normalizer can shorten a text (characters in / characters out), by kind: one
# that only rewrites, decomposes or prepends never does; NFC and NFKC compose at most four
# code points into one (U+1F82 is U+03B1 U+0313 U+0300 U+0345). Kinds not named here (Strip,
# StripAccents, BertNormalizer, Precompiled, regex replacements) may drop any amount.
_NORMALIZER_SHRINK = {"Prepend": 1, "Lowercase": 1, "NFD": 1, "NFKD": 1, "NFC": 4, "NFKC": 4}
# Pre-tokenizers that keep every character (Whitespace, BertPreTokenizer and a Split that
# removes its matches drop some).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}


def max_chars_per_token(tokenizer: Any) -> int | None:
    """A bound K on the characters of prompt text one token stands for, so that a text of c
    characters has at least c / K tokens; None when the tokenizer gives none.

    Sound for a fast tokenizer whose model is BPE: a BPE token stands for the text of its
    vocabulary entry, whose length in characters is at least the characters it covers (a
    byte-level entry has one character per byte; a continuing-subword prefix or a byte
    fallback like ``<0x41>`` only lengthen the entry), and an unknown character is one token
    unless ``fuse_unk`` merges a run of them (then None). The normalizer and pre-tokenizer must
    not drop text, or drop at most a known share (``_NORMALIZER_SHRINK``), which multiplies
    K. Added tokens match their own text, counted with the vocabulary. WordPiece, Unigram and
    WordLevel map a whole unknown word to one token: None.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or (model.get("fuse_unk") and model.get("unk_token")):
            return None
        shrink = _shrink(spec.get("normalizer"))
        if shrink is None or not _keeps_text(spec.get("pre_tokenizer")):
            return None
        entries = [*model["vocab"], *(t["content"] for t in spec.get("added_tokens") or [])]
        return max(len(e) for e in entries) * shrink
    except (KeyError, TypeError, ValueError):  # a format this does not know: no bound
        return None


def _shrink(normalizer: dict[str, Any] | None) -> int | None:
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        total = 1
        for part in normalizer.get("normalizers", []):
            factor = _shrink(part)
            if factor is None:
                return None
            total *= factor
        return total
    if kind == "Replace":  # a fixed string by another: shortens by at most their ratio
        pattern, content = normalizer.get("pattern", {}).get("String"), normalizer["content"]
        if not pattern or not content:
            return None
        return -(-len(pattern) // len(content))
    return _NORMALIZER_SHRINK.get(str(kind))


def _keeps_text(pre: dict[str, Any] | None) -> bool:
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_keeps_text(p) for p in pre.get("pretokenizers", []))
    if kind in ("Split", "Punctuation"):
        return pre.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS
