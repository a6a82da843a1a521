"""The one path every protocol's inference takes, protocol-neutral: key, admission, preprocessing, a worker.

Native /predict and /explain, KServe V1, the Open Inference Protocol's REST routes and its gRPC
service are thin endpoints over this (``service.http.endpoints``, ``service.grpc.front``): each reads
its request its own way into ``Inputs`` and encodes the ``Answer`` its own way; everything between
is here, so they share the key, the limits, admission, the batcher, the worker pools, the versions
and the metrics. A call flows one way: ``authorize`` -> ``precheck`` (before its body is read) ->
the protocol's parsing (``parse``: in a thread when big) -> ``infer``: admission, then ``Preparer``
(imaging, into a ``Work``), then ``Dispatcher.submit`` and the worker's numbers (``Computed``),
then the ``Answer``. Admission comes once the body is read and parsed, so a slow client never
holds a place in the queue and the request's cost is known.

Nothing here knows HTTP or gRPC: what a call is (arrival, deadline, pool, pinned version, request
id, root span when traced) is its ``Call`` record (``service.http.calls``). Each stage above is a span
of the call's trace (``service.tracing``; nothing at all when it is not traced).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service import imaging, metrics, tracing
from service.capture import Capture
from service.config import Settings
from service.errors import HttpError, retry_later, shown
from service.http.admission import Admission, Admitted
from service.http.auth import ApiKey
from service.http.calls import Call
from service.http.dispatch import Dispatcher
from service.http.prepare import Preparer
from service.http.shadow import Shadow
from service.http.versioning import VersionControl
from service.imaging import NO_DIGIT, Note
from service.model.fnn import IMAGE_SIDE, INPUT_SIZE
from service.pipes import Pending, WorkerDied
from service.work import ROW, Computed, Pool, Work, work_units

_MILLISECONDS = re.compile(r"[0-9]{1,9}")
# Bodies bigger than this are parsed and prepared in a thread: JSON of 16 pixel instances (64 KiB) takes
# milliseconds to parse, and the event loop would answer nobody meanwhile.
OFFLOAD_BYTES = 32 * 1024
NOT_A_DIGIT = "not_a_digit"
T = TypeVar("T")


@dataclass(slots=True)
class Inputs:
    """A request's instances, as any protocol hands them over: ``pictures`` (encoded pictures or
    ``/predict`` pixel arrays, framed by ``service.imaging``) or ``frames`` (already in MNIST's frame,
    float32 (n, 28, 28) in 0..1: V2's ``pixels``); the options a worker needs; the body's size (a big
    one is prepared in a thread)."""

    count: int
    pictures: list[imaging.Raw] | None = None
    frames: np.ndarray | None = None
    options: dict[str, Any] | None = None
    body_bytes: int = 0


@dataclass(slots=True)
class Answer:
    """A request's answer, for any protocol's codec: a ``ROW`` per instance (zeros where no digit was
    found: ``no_digit``), each instance's flags (the framing's, then ``not_a_digit`` or ``no_digit``),
    its framing note (``box``; None for frames), the explain worker's reports (one per instance with a
    digit), the version that computed it and the size of the forward."""

    rows: np.ndarray
    no_digit: np.ndarray
    flags: list[list[str]]
    notes: list[Note] | None
    version: int
    batch_size: int
    reports: list[dict[str, Any]] | None = None


class DataPlane:
    def __init__(self, settings: Settings, api_key: ApiKey, admission: Admission, preparer: Preparer,
                 dispatcher: Dispatcher, versions: VersionControl, shadow: Shadow, capture: Capture | None = None):
        self.settings, self.api_key, self.admission = settings, api_key, admission
        self.preparer, self.dispatcher, self.versions = preparer, dispatcher, versions
        self.shadow, self.capture = shadow, capture

    def authorize(self, call: Call, headers: Mapping[str, str]) -> None:
        """The client's API key (``x-api-key``, or ``authorization: Bearer``), first, before anything else is read."""
        self.api_key.check(headers)
        call.authed = True

    def limit(self, call: Call, asked_s: float | None = None) -> None:
        """The call's deadline: ``--request-timeout-s``, or less if the client asks (``asked_s``)."""
        timeout = self.settings.request_timeout_s
        call.deadline_s = timeout if asked_s is None else min(timeout, asked_s)

    def precheck(self, call: Call) -> None:
        """A refusal at once if the pool's queue already stands too long (before the body is read)."""
        self.admission.precheck(call.pool)

    @staticmethod
    async def parse(call: Call, size: int, heavy: bool, parse: Callable[..., T], *args: Any) -> T:
        """A protocol's parsing of a body of ``size`` bytes: in a thread when it is big (or ``heavy``), to
        keep the event loop answering."""
        with tracing.span(call.trace, "parse"):
            if size > OFFLOAD_BYTES or heavy:
                return await asyncio.to_thread(parse, *args)
            return parse(*args)

    async def infer(self, call: Call, inputs: Inputs) -> Answer:
        """Admission, preprocessing and a worker of ``call.pool``: the request's ``Answer``. A request whose
        pictures all have no digit is answered without a worker (batch size 0)."""
        options = inputs.options or {}
        admitting = time.monotonic()
        with self.admission.admit(call.pool, inputs.count, work_units(inputs.count, options), call.deadline_s,
                                  call.arrived) as admitted:
            tracing.record(call.trace, "admission", admitting)  # a refusal shows on the call's root span
            with tracing.span(call.trace, "imaging"):
                work, notes = await self._prepare(inputs, options, call.arrived)
            version = self.versions.route(call.pinned)
            if len(work.images):
                computed = await self._compute(call, work, version, admitted)
                self.shadow.after(call, work, computed)
            else:  # no picture has a digit: nothing to compute
                reports: list[dict[str, Any]] | None = [] if call.pool is Pool.EXPLAIN else None
                computed = Computed(np.empty((0, ROW), np.float32), version, 0, reports)
        answer = answer_of(inputs.count, computed, notes, self.settings.not_a_digit_below)
        call.version, call.batch_size = answer.version, answer.batch_size
        if any(answer.flags):
            metrics.count_flags(str(answer.version), answer.flags)
        if self.capture is not None and len(work.images):
            found = [flags for flags, none in zip(answer.flags, answer.no_digit.tolist(), strict=True) if not none]
            self.capture.record(work.images, computed.rows, found, answer.version, call.request_id, time.time())
        return answer

    async def _prepare(self, inputs: Inputs, options: dict[str, Any], arrived: float) -> tuple[Work, list[Note] | None]:
        """The request's ``Work`` (its frames with a digit) and every instance's note, or an ``InputError``
        naming the bad instance."""
        if inputs.frames is not None:  # already in MNIST's frame: only the checks /predict's pixels get
            frames = inputs.frames.reshape(inputs.count, IMAGE_SIDE, IMAGE_SIDE)
            imaging.check_frames(frames)
            return Work(frames.reshape(inputs.count, INPUT_SIZE), options, arrived), None
        assert inputs.pictures is not None
        return await self.preparer.prepare(inputs.pictures, options, arrived, inputs.body_bytes > OFFLOAD_BYTES)

    async def _compute(self, call: Call, work: Work, version: int, admitted: Admitted) -> Computed:
        """A worker computes ``work`` with ``version``. Past the deadline the client gets 504, the worker
        drops the work if it has not begun it, and the request keeps its place in the admission counts
        until the worker says so."""
        work.version = version
        work.units = work_units(len(work.images), work.options)
        work.deadline = call.arrived + call.deadline_s  # the client's clock started when its request arrived
        remaining = work.deadline - time.monotonic()
        if remaining <= 0:  # reading and preparing it took all its time: nothing to compute
            raise HttpError(504, f"no answer within the request timeout of {call.deadline_s:g} s")
        with tracing.span(call.trace, "worker") as waiting:
            work.trace = tracing.traceparent(waiting)  # the worker's spans go under this one
            _, pending = self.dispatcher.submit(call.pool, work)
            # a timer, not asyncio.wait_for: that wraps every wait in a task of its own
            timer = asyncio.get_running_loop().call_later(remaining, pending.event.set)
            try:
                await pending.event.wait()
            finally:
                timer.cancel()
                if not pending.answered:  # timed out or cancelled: counted until the worker answers or drops it
                    admitted.keep_until(pending)
            if not pending.answered:
                raise HttpError(504, f"no answer within the request timeout of {call.deadline_s:g} s")
            computed: Computed = result(pending)
        return computed


def answer_of(count: int, computed: Computed, notes: list[Note] | None, below: float) -> Answer:
    """The worker's rows put back among the request's instances, and each instance's flags. (Plain Python
    over the typicality column: a request is mostly one or a few instances, where numpy's per-call cost
    would outweigh the work.)"""
    flags = [list(note["flags"]) for note in notes] if notes is not None else [[] for _ in range(count)]
    if notes is None or len(computed.rows) == count:
        rows, no_digit = computed.rows, np.zeros(count, bool)
    else:
        no_digit = np.fromiter((NO_DIGIT in note["flags"] for note in notes), bool, count)
        rows = np.zeros((count, ROW), np.float32)
        rows[~no_digit] = computed.rows
    for i, (typicality, none) in enumerate(zip(rows[:, -1].tolist(), no_digit.tolist(), strict=True)):
        if typicality < below and not none:  # NaN (no calibration) is never below
            flags[i].append(NOT_A_DIGIT)
    return Answer(rows, no_digit, flags, notes, computed.version, computed.batch_size, computed.reports)


def asked_timeout(text: str | None) -> float | None:
    """``X-Request-Timeout-Ms`` (HTTP) in seconds, or None when absent; 400 when it is not a positive count."""
    if text is None:
        return None
    if not _MILLISECONDS.fullmatch(text):
        raise HttpError(400, f"X-Request-Timeout-Ms must be a number of milliseconds (ASCII digits, e.g. 250), "
                             f"got {shown(text)}")
    if int(text) == 0:
        raise HttpError(400, f"X-Request-Timeout-Ms must be positive, got {shown(text)}")
    return int(text) / 1000


def result(pending: Pending) -> Any:
    """A worker's answer, or the error its failure means: an ``HttpError`` the worker raised (e.g. 504)
    passes through, a worker that died holding the request is a retryable 503, anything else a 500."""
    if pending.ok:
        return pending.response
    failure = pending.response
    if isinstance(failure, HttpError):
        raise failure
    if isinstance(failure, WorkerDied):
        raise retry_later(503, "the worker computing this request died and is being replaced; retry")
    raise HttpError(500, "internal error while running the model; retry")
