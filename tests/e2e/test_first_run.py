"""What a new user meets first, with real processes: the ready line, a busy port, a mistyped flag,
``--version``, a host name, and one log format for every line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from harness.server import ROOT, free_port, running


def service(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_one_ready_line_once_healthy_with_the_page_the_docs_and_how_to_stop(tmp_path):
    """``--host localhost`` is accepted, bound as 127.0.0.1 and named as given; the log is text."""
    with running(tmp_path, "--host", "localhost", "--log-format", "text") as server:
        port = server.port
        output = server.wait_for("ready:")
        ready = [line for line in output.splitlines() if "ready:" in line]
        assert len(ready) == 1, output
        assert f"http://localhost:{port}/ " in ready[0], ready[0]
        assert f"http://localhost:{port}/openapi.json" in ready[0], ready[0]
        assert "Ctrl+C" in ready[0]
        assert "Application startup complete" not in output and "Uvicorn running" not in output, output
        assert output.index("starting mnist-fnn") < output.index("ready:")
        with server.client() as client:
            assert client.post("/predict", files={"file": (ROOT / "examples/seven.png").read_bytes()}).json()[
                "predictions"][0]["label"] == 7
        time.sleep(0.5)  # the access line
        lines = [line for line in server.output().splitlines() if line.strip()]
        assert not [line for line in lines if line.lstrip().startswith("{")], "a JSON line in a text log"
        assert any("digitserve.access: " in line and "endpoint=predict status=200" in line for line in lines)


def test_a_json_log_is_json_on_every_line_uvicorns_included(served):
    with served.client() as client:
        client.post("/predict", files={"file": (ROOT / "examples/seven.png").read_bytes()})
        client.get("/nope")
    time.sleep(0.5)
    lines = [line for line in served.output().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # fails on any plain line
    assert any("ready:" in entry.get("message", "") for entry in parsed)
    assert any(entry.get("log", {}).get("endpoint") == "predict" for entry in parsed)


def test_a_busy_port_is_one_line_naming_the_setting_and_exit_code_2():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = service("--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: port {port} is already in use on 127.0.0.1 (another digitserve?); "
                                   "choose another with --port (DIGITSERVE_PORT)")
    assert "starting" not in done.stdout + done.stderr


def test_a_mistyped_flag_suggests_the_right_one():
    done = service("--max-batchsize", "8")
    assert done.returncode == 2
    assert done.stderr == ("error: unrecognized argument --max-batchsize; did you mean --max-batch-size? "
                           "(see --help)\n")


def test_version_is_the_programs_and_the_model_pin_is_model_version():
    done = service("--version")
    assert done.returncode == 0 and done.stdout.startswith("digitserve 0."), done
    helped = service("--help")
    assert helped.returncode == 0 and "--model-version N" in helped.stdout
    pinned = service("--model-version", "99", "--port", str(free_port()))
    assert pinned.returncode == 2 and "99" in pinned.stderr, pinned.stderr
