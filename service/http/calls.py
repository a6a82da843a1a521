"""The call record: one inference call as every stage of an API server sees it, whatever its protocol.

The front end that received the call (HTTP's metrics middleware, the gRPC servicer) opens it when
the call arrives; the endpoint, the data plane and the error handling fill it in; the metrics and
the access log read it once the call is answered (``service.metrics.RequestBook``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.work import Pool

if TYPE_CHECKING:
    from opentelemetry.trace import Span

_SANE_ID = re.compile(r"[\w.:-]{1,128}", re.ASCII)  # else replaced: it is echoed and logged


@dataclass(slots=True)
class Call:
    endpoint: str  # the metrics' endpoint label: predict, explain, v1_predict, v2_infer, grpc_infer...
    arrived: float  # time.monotonic() at arrival: the queue's clock starts here (service.http.admission)
    request_id: str
    serving: int  # the version served when it arrived: its in-flight gauge's label
    pool: Pool = Pool.PREDICT
    deadline_s: float = 0.0  # how long it may take from arrival (the service's limit, or the client's)
    pinned: int | None = None  # the version the client asked for, if any
    authed: bool = False  # its API key was checked (or none is needed)
    version: int | None = None  # the version that computed it
    batch_size: int | None = None  # the size of the forward it was part of (0: answered without one)
    detail: str | None = None  # an error's detail, for the access log
    refusal: str | None = None  # why admission refused it, for digitserve_refusals_total
    status: int | None = None  # set where no answer could be sent (499: the client left)
    trace: Span | None = None  # its root span when traced (service.tracing): its stages' spans go under it


def request_id(given: str | None) -> str:
    """The client's request id when it sent a sane one (ASCII, at most 128 characters), else a random one."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given
    return os.urandom(16).hex()  # random like uuid4().hex, without building a UUID object


def opened(endpoint: str, given_id: str | None, serving: int) -> Call:
    return Call(endpoint, time.monotonic(), request_id(given_id), serving)
