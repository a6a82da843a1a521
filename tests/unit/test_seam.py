"""The contract between digitserve and LitServe, FastAPI and uvicorn, checked in process: the version the
seam was checked against, the signature of every method it overrides and every private name it relies
on. An upgrade that changes one of them fails here with one sentence naming it, instead of slowing
worker-death handling, skipping a join or letting an unbounded header through where only the slow
suite might notice."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import litserve as ls
import litserve.server
import pytest
import uvicorn
from fastapi import FastAPI
from litserve.loops.base import LitLoop
from litserve.loops.loops import inference_worker
from litserve.transport.base import MessageTransport
from litserve.utils import WorkerSetupStatus
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from harness.server import ROOT
from service.config import Settings
from service.http.keepalive import ConnectionShares
from service.seam import litserve as seam
from service.seam import uvicorn as uvicorn_seam

# The parameters of each LitServe method the seam overrides, as checked on LITSERVE_VERSION.
OVERRIDDEN = {
    "_register_api_endpoints": ["self", "lit_api", "request_type", "response_type"],
    "_init_manager": ["self", "num_api_servers"],
    "_start_server": ["self", "port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type", "kwargs"],
    "_prepare_app_run": ["self", "app"],
    "launch_single_inference_worker": ["self", "lit_api", "worker_id"],
    "verify_worker_status": ["self"],
    "_perform_graceful_shutdown": ["self", "manager", "uvicorn_workers", "shutdown_reason"],
}
# What LitServe passes a worker (its loop's ``run`` gets the same, in this order).
WORKER_ARGS = ["lit_api", "device", "worker_id", "request_queue", "transport", "workers_setup_status",
               "callback_runner"]


def params(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_litserve_is_the_version_the_seam_was_checked_against():
    assert ls.__version__ == seam.LITSERVE_VERSION, (
        f"LitServe is {ls.__version__} but service/seam/litserve.py was checked against {seam.LITSERVE_VERSION}: "
        "re-check every hook in its table against the new LitServe, then update LITSERVE_VERSION")


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_every_overridden_method_keeps_its_signature(name):
    assert hasattr(ls.LitServer, name), f"LitServer.{name} is gone: the seam's override of it is never called"
    assert params(getattr(ls.LitServer, name)) == OVERRIDDEN[name], (
        f"LitServer.{name} now takes {params(getattr(ls.LitServer, name))}, not {OVERRIDDEN[name]}: "
        "adapt the override in service/seam/litserve.py")
    assert name in vars(seam.Server), f"service/seam/litserve.py no longer overrides {name}: update this test's table"


def test_the_worker_loop_gets_what_litserve_spawns_workers_with():
    assert params(inference_worker)[:len(WORKER_ARGS)] == WORKER_ARGS, (
        f"litserve.loops.loops.inference_worker now takes {params(inference_worker)}: check WorkerLoop.run")
    assert params(LitLoop.run)[1:] == WORKER_ARGS, f"LitLoop.run now takes {params(LitLoop.run)}: adapt WorkerLoop.run"
    assert issubclass(seam.WorkerLoop, LitLoop)


def test_the_transport_interface_is_what_the_adapter_implements():
    abstract = set(getattr(MessageTransport, "__abstractmethods__", set()))
    assert abstract <= {"send", "areceive", "close"}, f"MessageTransport now requires {sorted(abstract)}"
    reader = inspect.getsource(litserve.server.response_queue_to_buffer)
    assert "transport.areceive(consumer_id)" in reader, (
        "LitServe's lifespan no longer calls transport.areceive(consumer_id) once per API server: the API "
        "servers would never watch their answer pipes")


def test_private_names_the_seam_relies_on_still_exist():
    source = inspect.getsource(ls.LitServer)
    for name in ("self.litapi_request_queues", "self._transport", "self._shutdown_event", "self.monitor_internal",
                 "self.workers_setup_status", "self.inference_workers", "app.response_queue_id"):
        assert name in source, f"LitServer no longer uses {name}: service/seam/litserve.py relies on it"
    assert 'name="litserve-monitoring"' in source, (
        "LitServe's monitor thread is no longer named litserve-monitoring: the shutdown would not join it")
    assert "self.launch_single_inference_worker(" in source, (
        "LitServe's monitor no longer replaces a dead worker through launch_single_inference_worker: "
        "digitserve would not answer the dead worker's requests at once")
    assert WorkerSetupStatus.READY == "ready"


def test_fastapi_names_the_seam_relies_on_still_exist():
    app = FastAPI()
    assert callable(app.build_middleware_stack)
    assert {"tracing", "metrics", "logs"} <= set(app._telemetry), "FastAPI's telemetry switches moved"
    assert hasattr(app, "user_middleware")


def test_litserve_callbacks_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="callbacks are not supported"):
        seam.Server([], parts=None, callbacks=[ls.Callback()])  # type: ignore[arg-type]


def test_only_the_seam_and_the_litapi_stages_import_litserve():
    importing = sorted(str(path.relative_to(ROOT)) for path in Path(ROOT, "service").rglob("*.py")
                       if re.search(r"^\s*(from|import) litserve", path.read_text(), re.MULTILINE))
    assert importing == ["service/seam/litserve.py", "service/worker/stages.py"], importing


# The parameters of each uvicorn HttpToolsProtocol method service/seam/uvicorn.py overrides.
UVICORN_OVERRIDDEN = {
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "on_message_begin": ["self"],
    "on_url": ["self", "url"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
}
# HttpToolsProtocol's methods it calls, with their parameters, and the attributes it reads.
UVICORN_CALLED = {
    "_unset_keepalive_if_required": ["self"],
    "send_400_response": ["self", "msg"],
    "_should_upgrade": ["self"],
    "handle_websocket_upgrade": ["self"],
    "_unsupported_upgrade_warning": ["self"],
}
UVICORN_ATTRIBUTES = ("self.parser", "self.cycle", "self.loop", "self.logger", "self.transport")
CYCLE_ATTRIBUTES = ("self.scope", "self.keep_alive", "self.response_started", "self.response_complete")


def test_uvicorn_is_the_version_the_protocol_was_checked_against():
    assert uvicorn.__version__ == uvicorn_seam.UVICORN_VERSION, (
        f"uvicorn is {uvicorn.__version__} but service/seam/uvicorn.py was checked against "
        f"{uvicorn_seam.UVICORN_VERSION}: re-check every override and private name, then update UVICORN_VERSION")


@pytest.mark.parametrize("name", [*UVICORN_OVERRIDDEN, *UVICORN_CALLED])
def test_uvicorn_methods_the_protocol_overrides_or_calls_keep_their_signature(name):
    expected = {**UVICORN_OVERRIDDEN, **UVICORN_CALLED}[name]
    assert hasattr(HttpToolsProtocol, name), f"HttpToolsProtocol.{name} is gone: adapt service/seam/uvicorn.py"
    assert params(getattr(HttpToolsProtocol, name)) == expected, (
        f"HttpToolsProtocol.{name} now takes {params(getattr(HttpToolsProtocol, name))}, not {expected}: "
        "adapt service/seam/uvicorn.py")


def test_the_protocol_overrides_exactly_the_table():
    protocol = uvicorn_seam.balanced_protocol(ConnectionShares(1), Settings(_cli_parse_args=[]),  # type: ignore[call-arg]
                                              lambda reason: None)
    overridden = {name for name in vars(protocol) if name in vars(HttpToolsProtocol) and not name.startswith("__")}
    assert overridden == set(UVICORN_OVERRIDDEN), f"update this test's table: it overrides {sorted(overridden)}"


def test_uvicorn_private_attributes_the_protocol_reads_still_exist():
    protocol, cycle = inspect.getsource(HttpToolsProtocol), inspect.getsource(RequestResponseCycle)
    for name in UVICORN_ATTRIBUTES:
        assert f"{name} =" in protocol, f"HttpToolsProtocol no longer sets {name}: service/seam/uvicorn.py reads it"
    for name in CYCLE_ATTRIBUTES:
        assert f"{name} =" in cycle, f"RequestResponseCycle no longer sets {name}: service/seam/uvicorn.py uses it"
    assert "self.parser.feed_data(data)" in inspect.getsource(HttpToolsProtocol.data_received), (
        "uvicorn's data_received no longer just feeds the parser: re-check the override that replaces it")


def test_only_the_uvicorn_seam_touches_uvicorn_internals():
    importing = sorted(str(path.relative_to(ROOT)) for path in Path(ROOT, "service").rglob("*.py")
                       if re.search(r"^\s*(from|import) (uvicorn|httptools)", path.read_text(), re.MULTILINE))
    assert importing == ["service/seam/uvicorn.py"], importing
