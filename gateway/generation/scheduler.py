"""Continuous batching: one thread per text model runs the engine's steps over every admitted
sequence together.

Requests are admitted on the event loop (:meth:`gateway.generation.service.GenerationService.
submit`: a bounded number of running sequences, a bounded queue, 503 beyond it) and handed
to the model's :class:`Scheduler` as a :class:`Job`. The scheduler's thread loops:

1. new jobs join (they are prefilled by the engine within its per-step token budget);
2. a job whose client went away or whose time limit passed is finished and leaves, so its
   batch row is freed at this step boundary;
3. one :meth:`~gateway.generation.engine.SpeculativeEngine.step_batch` for all of them; each
   job gets its round (new tokens) and hands deltas to its request on the event loop.

An exception inside a batched forward cannot be pinned on one sequence (they share it): every
job of that step fails with it, the engine's batch is cleared, and the thread goes on serving
new requests. A prompt's prefill runs in its own caches, so its failure (out of memory on a
long prompt) fails that job alone, and so does a failure of its own sampling or verification
(probabilities that are not finite). A job that ends after its round without the engine
knowing (a stop string, its request failed) is told to the engine then, which frees its cache
rows; when the last jobs leave (cancelled, timed out), the batch's cache rows are freed at
once too, not when the next request comes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

__all__ = ["Job", "Scheduler"]


class Job(Protocol):
    """One admitted sequence, as the scheduler drives it (all calls on its thread)."""

    seq: Any  # gateway.generation.engine.Sequence

    def check(self) -> bool:
        """Before a step: True when the job must stop (cancelled, timed out); it finished."""
        ...

    def on_round(self, rnd: Any) -> bool:
        """A round of new tokens; True when the sequence is done."""
        ...

    def fail(self, exc: BaseException) -> None:
        """The job ends with ``exc`` (handed to its request)."""
        ...


class Scheduler:
    """The stepping thread of one text model's engine (module docstring)."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        self.name = name
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._closed = False
        # called after every step with the engine (its batch and policy): metrics
        self.on_step: Callable[[Any], None] | None = None
        self._thread = threading.Thread(target=self._loop, name=f"generate-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError(f"model '{self.name}' is unloading")
            self._inbox.append(job)
            self._cv.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after its current step; jobs still running fail."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        jobs: list[Job] = []
        while True:
            with self._cv:
                while not self._inbox and not jobs and not self._closed:
                    self._cv.wait()
                jobs.extend(self._inbox)
                self._inbox.clear()
                if self._closed:
                    break
            jobs = [job for job in jobs if not self._stopped(job)]
            if not jobs:
                if self.engine.batch:  # the last ones left (cancelled, timed out): free their
                    self._reset()  # cache rows now, not when the next request comes
                continue
            try:
                rounds = self.engine.step_batch([job.seq for job in jobs])
            except BaseException as exc:  # noqa: BLE001 - handed to every request of the step
                log.exception(
                    "generation step failed on model %s (%d sequences)", self.name, len(jobs)
                )
                self._reset()
                for job in jobs:
                    self._fail(job, exc)
                jobs = []
                continue
            if self.on_step is not None:
                try:
                    self.on_step(self.engine)
                except Exception:  # noqa: BLE001 - metrics never stop generation
                    log.exception("generation metrics failed on model %s", self.name)
            still: list[Job] = []
            ended: dict[str, list[Any]] = {"stop": [], "error": []}  # the engine does not know
            for job in jobs:
                if job.seq.error is not None:  # its own prefill or sampling failed; the
                    log.error(  # others go on
                        "a sequence failed on model %s: %s",
                        self.name,
                        job.seq.error,
                        exc_info=job.seq.error,
                    )
                    self._fail(job, job.seq.error)
                    continue
                rnd = rounds.get(job.seq)
                try:
                    done = rnd is not None and job.on_round(rnd)
                except BaseException as exc:  # noqa: BLE001 - one job's fault stays its own
                    log.exception("generation on model %s failed", self.name)
                    self._fail(job, exc)
                    ended["error"].append(job.seq)
                    continue
                if not done:
                    still.append(job)
                elif job.seq.finished is None:  # a stop string ended it
                    ended["stop"].append(job.seq)
            jobs = still
            self._finish(ended)
        for job in jobs:
            self._fail(job, RuntimeError(f"model '{self.name}' was unloaded"))
        self._reset()

    def _reset(self) -> None:
        """Drop the engine's batch; a failure here must not end the stepping thread (every
        later step would then hang its requests)."""
        try:
            self.engine.reset()
        except Exception:  # noqa: BLE001 - logged; the next step starts from what is left
            log.exception("resetting the generation batch of model %s failed", self.name)

    def _finish(self, ended: dict[str, list[Any]]) -> None:
        """Tell the engine of sequences that ended outside it (``reason -> sequences``), so
        their cache rows go now: the next step would drop them, but an idle model runs none."""
        try:
            for reason, seqs in ended.items():
                if seqs:
                    self.engine.finish(seqs, reason)
        except Exception:  # noqa: BLE001 - marked finished, they leave at the next step
            log.exception("freeing finished sequences of model %s failed", self.name)

    def _stopped(self, job: Job) -> bool:
        try:
            return job.check()
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, exc)
            return True

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        try:
            job.fail(exc)
        except BaseException:  # noqa: BLE001 - nothing more to tell that request
            log.exception("could not hand a generation error to its request")
