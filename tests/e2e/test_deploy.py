"""Deployment files: Dockerfile, compose stack, Prometheus rules and the Grafana dashboard.

There is no container engine here, so the checks are what runs without one: the real linters
and validators (hadolint, docker-compose config, promtool), structural checks of what they do
not cover, and the image's own command, health check and the compose `train` command run as
local processes. The tools come from .ci/system-deps.sh (hadolint from the venv); a missing
tool fails the test rather than skipping it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
import yaml

from harness.server import ROOT, Server, free_port
from service.model import store

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "digitserve.json"

# What the service exposes (service/metrics.py): name -> (type, labels besides `version`).
METRICS = {
    "digitserve_requests_total": ("counter", {"endpoint", "status"}),
    "digitserve_request_duration_seconds": ("histogram", {"endpoint"}),
    "digitserve_queue_wait_seconds": ("histogram", {"endpoint"}),
    "digitserve_in_flight_requests": ("gauge", {"endpoint"}),
    "digitserve_batch_size": ("histogram", {"endpoint"}),
    "digitserve_inference_duration_seconds": ("histogram", {"endpoint"}),
    "digitserve_predictions_total": ("counter", {"label"}),
    "digitserve_prediction_confidence": ("histogram", set()),
    "digitserve_typicality": ("histogram", set()),
    "digitserve_flags_total": ("counter", {"flag"}),
    "digitserve_model_info": ("gauge", {"name", "device", "pool", "runtime"}),
}
# ... and what carries no `version` label of its own making: the version state itself, admission, the workers and
# the process tree (service/metrics.py, service/http/routes.py): name -> (type, every label).
UNVERSIONED_METRICS = {
    "digitserve_serving_version": ("gauge", set()),
    "digitserve_canary_share": ("gauge", set()),
    "digitserve_shadow_share": ("gauge", set()),
    "digitserve_shadow_total": ("counter", {"served", "shadow", "agree"}),
    "digitserve_shadow_dropped_total": ("counter", set()),
    "digitserve_version_loads_total": ("counter", {"version", "result"}),
    "digitserve_refusals_total": ("counter", {"endpoint", "reason"}),
    "digitserve_worker_restarts_total": ("counter", {"pool", "reason"}),
    "digitserve_workers_ready": ("gauge", {"pool"}),
    "digitserve_queue_wait_estimate_seconds": ("gauge", {"pool"}),
    "digitserve_process_resident_memory_bytes": ("gauge", {"process", "pid"}),
    "digitserve_process_cpu_seconds_total": ("counter", {"process", "pid"}),
    "digitserve_process_open_fds": ("gauge", {"process", "pid"}),
}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def _series_labels() -> dict[str, set[str]]:
    """Every series name a query may use -> the labels it carries."""
    series = {"up": set(TARGET_LABELS)}
    every = {**{name: (kind, labels | {"version"}) for name, (kind, labels) in METRICS.items()}, **UNVERSIONED_METRICS}
    for name, (kind, labels) in every.items():
        labels = labels | TARGET_LABELS
        if kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


SERIES = _series_labels()


def tool(name: str) -> str:
    """Path of a required command; fails (never skips) when it is missing."""
    venv_bin = Path(sys.executable).parent
    path = shutil.which(name, path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"`{name}` is not installed: run .ci/system-deps.sh (as root) or `make test`")
    return path


# What an operator puts in the environment (or .env) before `docker compose up`: the stack refuses to start
# without them (no API without a key, no Grafana with its default admin password).
COMPOSE_SECRETS = {"DIGITSERVE_API_KEY": "test-" + os.urandom(8).hex(), "GRAFANA_ADMIN_PASSWORD": "pw-test"}


def run(*argv: str, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    environment = {**os.environ, **COMPOSE_SECRETS} if env is None else env
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def duration_s(text: str) -> float:
    """Compose / Docker durations such as ``45s`` or ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- Dockerfile parsing ------------------------------------------------------------------------

def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """Instructions ``(KEYWORD, arguments)`` per build stage, continuation lines joined."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        instructions.append(current + stripped)
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for text in instructions:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails on the shell form."""
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {args}")
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), args
    return argv


def image_env() -> dict[str, str]:
    env = {}
    for args in instruction(final_stage(), "ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"use ENV KEY=value: {args}"
            env[key] = value
    return env


def healthcheck_argv() -> list[str]:
    (args,) = instruction(final_stage(), "HEALTHCHECK")
    _, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    return exec_form(command)


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, with a leading init (``tini --``) removed."""
    stage = final_stage()
    entrypoint = exec_form(instruction(stage, "ENTRYPOINT")[-1]) if instruction(stage, "ENTRYPOINT") else []
    command = exec_form(instruction(stage, "CMD")[-1])
    if entrypoint[:1] == ["tini"]:
        entrypoint = entrypoint[entrypoint.index("--") + 1:]
    return entrypoint + command


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps)


# ---- compose -----------------------------------------------------------------------------------

COMPOSE_VARIANTS = {
    "base": ["-f", str(COMPOSE)],
    "gpu": ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)],
    "train": ["-f", str(COMPOSE), "--profile", "train"],
    "gpu+train": ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "--profile", "train"],
}


def compose_config(*args: str) -> dict:
    """The merged, resolved compose model as `docker-compose config` prints it."""
    result = run(tool("docker-compose"), *args, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict) -> dict[str, str]:
    """source -> target of a service's volumes, in either the short or the long syntax."""
    pairs = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            pairs[str(v["source"])] = v["target"]
        else:
            source, target = v.split(":")[:2]
            pairs[source] = target
    return pairs


def published_on(service: dict) -> set[tuple[str, int, int]]:
    """(host address, published port, container port) of each port a service publishes ("" = every address)."""
    triples = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            triples.add((p.get("host_ip", ""), int(p["published"]), int(p["target"])))
        else:
            *host, published, target = str(p).split("/")[0].split(":")
            triples.add((host[0] if host else "", int(published), int(target)))
    return triples


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config(*COMPOSE_VARIANTS["train"])


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return compose_config(*COMPOSE_VARIANTS["gpu+train"])


# ---- Dockerfile ----------------------------------------------------------------------------------

class TestDockerfile:
    def test_hadolint_finds_nothing(self):
        result = run(tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_hadolint_does_fail_a_bad_dockerfile(self, tmp_path):
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nCMD python -m service\n")
        result = run(tool("hadolint"), "--failure-threshold", "info", str(bad))
        assert result.returncode != 0
        for rule in ("DL3006", "DL3008", "DL3025"):  # untagged image, unpinned apt, shell-form CMD
            assert rule in result.stdout

    def test_every_ignored_rule_is_justified(self):
        lines = DOCKERFILE.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore" in line:
                assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], \
                    f"line {i + 1}: an ignored hadolint rule needs a comment above it saying why"

    def test_multi_stage_on_python_311_slim(self):
        stages = dockerfile_stages()
        assert len(stages) >= 2
        for stage in stages:
            assert re.match(r"python:3\.11(\.\d+)?-slim", stage[0][1]), stage[0][1]
        assert any(a.startswith("--from=") and "/opt/venv" in a for a in instruction(final_stage(), "COPY"))

    def test_final_stage_runs_as_numeric_non_root_user(self):
        users = instruction(final_stage(), "USER")
        assert users, "the final stage must set USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID, got {users[-1]}"

    def test_final_stage_has_exec_form_command_healthcheck_and_port(self):
        stage = final_stage()
        assert image_command()[:3] == ["python", "-m", "service"]
        for kw in ("ENTRYPOINT", "CMD"):
            for args in instruction(stage, kw):
                exec_form(args)
        assert healthcheck_argv()[0] == "python", "the health check must need nothing but Python"
        assert "/health" in " ".join(healthcheck_argv())
        assert instruction(stage, "EXPOSE") == ["8000 8001"], "HTTP and gRPC ports"
        assert image_env()["DIGITSERVE_HOST"] == "0.0.0.0"

    def test_final_stage_installs_no_build_tools(self):
        text = " ".join(a for kw, a in final_stage() if kw == "RUN")
        for tool_name in ("build-essential", "gcc", "g++", "make", "cmake", "git", "curl", "wget"):
            assert not re.search(rf"(?<![\w.-]){re.escape(tool_name)}(?![\w.+-])", text), tool_name

    def test_torch_pins_and_cpu_default_match_pyproject(self):
        text = DOCKERFILE.read_text()
        pins = pyproject_pins()
        for package in ("torch", "torchvision"):
            assert f"{package}=={pins[package]}" in text, f"{package} pin differs from pyproject.toml"
        arg = re.search(r"^ARG TORCH_INDEX=(\S+)", text, re.M)
        assert arg and arg.group(1) == "https://download.pytorch.org/whl/cpu"

    def test_dockerignore_keeps_the_context_to_what_copy_needs(self):
        lines = [entry.strip() for entry in (ROOT / ".dockerignore").read_text().splitlines()
                 if entry.strip() and not entry.startswith("#")]
        assert lines[0] == "*", "allow-list: ignore everything, then re-include"
        allowed = {entry[1:].rstrip("/") for entry in lines if entry.startswith("!")}
        for stage in dockerfile_stages():
            for args in instruction(stage, "COPY"):
                parts = [p for p in args.split() if not p.startswith("--")]
                if any(p.startswith("--from") for p in args.split()):
                    continue
                for source in parts[:-1]:
                    assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
        for never in (".venv", ".git", "tests", "bench"):
            assert never not in allowed


# ---- docker-compose ------------------------------------------------------------------------------

class TestCompose:
    @pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
    def test_config_is_valid(self, variant):
        result = run(tool("docker-compose"), *COMPOSE_VARIANTS[variant], "config", "-q")
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize("secret", sorted(COMPOSE_SECRETS))
    def test_the_stack_refuses_to_start_without_its_secrets(self, secret):
        env = {k: v for k, v in {**os.environ, **COMPOSE_SECRETS}.items() if k != secret}
        result = run(tool("docker-compose"), "config", "-q", env=env)
        assert result.returncode != 0 and secret in result.stderr, result.stderr

    def test_the_api_requires_its_key(self, compose):
        assert compose["services"]["api"]["environment"]["DIGITSERVE_API_KEY"] == COMPOSE_SECRETS["DIGITSERVE_API_KEY"]

    @pytest.mark.parametrize("breakage", ["unknown key", "bad indent"])
    def test_config_rejects_a_broken_copy(self, tmp_path, breakage):
        text = COMPOSE.read_text()
        (tmp_path / "ok.yml").write_text(text)
        assert run(tool("docker-compose"), "-f", "ok.yml", "config", "-q", cwd=tmp_path).returncode == 0
        if breakage == "unknown key":
            broken = text.replace("    restart: unless-stopped", "    restartt: unless-stopped", 1)
        else:
            broken = text.replace("    stop_grace_period:", "      stop_grace_period:", 1)
        assert broken != text
        (tmp_path / "broken.yml").write_text(broken)
        result = run(tool("docker-compose"), "-f", "broken.yml", "config", "-q", cwd=tmp_path)
        assert result.returncode != 0, "docker-compose accepted a broken file: the check could not fail"

    def test_api_service(self, compose):
        api = compose["services"]["api"]
        store_path = image_env()["DIGITSERVE_STORE"]
        assert api["build"]["context"] == str(ROOT)
        assert published_on(api) == {("127.0.0.1", 8000, 8000), ("127.0.0.1", 8001, 8001)}, (
            "HTTP and gRPC are published on this host only"
        )
        assert api["read_only"] is True and "/tmp" in str(api["tmpfs"])
        assert api["cap_drop"] == ["ALL"] and api["security_opt"] == ["no-new-privileges:true"]
        assert mounts(api)["model_store"] == store_path
        assert api["restart"] == "unless-stopped"
        assert duration_s(api["stop_grace_period"]) > float(api["environment"]["DIGITSERVE_REQUEST_TIMEOUT_S"])
        limits = api["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"]
        assert api["healthcheck"]["test"] == ["CMD", *healthcheck_argv()], "compose and Dockerfile health checks differ"
        for key in api["environment"]:
            assert key.startswith("DIGITSERVE_"), key

    def test_train_service_writes_into_the_served_store(self, compose):
        train, api = compose["services"]["train"], compose["services"]["api"]
        assert train["profiles"] == ["train"]
        assert train["image"] == api["image"]
        argv = train["command"]
        assert argv[:3] == ["python", "-m", "service.train"]
        store_path = argv[argv.index("--store") + 1]
        assert store_path == image_env()["DIGITSERVE_STORE"]
        assert mounts(train)["model_store"] == store_path
        assert mounts(train)["mnist"] == argv[argv.index("--data-dir") + 1]
        assert {"model_store", "mnist"} <= set(compose["volumes"])

    def test_gpu_override_reserves_a_gpu_and_builds_cuda_torch(self, compose_gpu):
        api = compose_gpu["services"]["api"]
        (device,) = api["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert api["environment"]["DIGITSERVE_ACCELERATOR"] == "cuda"
        args = api["build"]["args"]
        declared = set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(), re.M))
        assert set(args) <= declared, f"build args the Dockerfile does not declare: {set(args) - declared}"
        assert "cpu" not in args["TORCH_INDEX"]
        assert api["image"] != compose_config(*COMPOSE_VARIANTS["base"])["services"]["api"]["image"]

    def test_bind_mounts_exist(self, compose):
        for name, service in compose["services"].items():
            for source in mounts(service):
                if source.startswith("/"):
                    assert Path(source).exists(), f"{name} mounts missing {source}"

    def test_monitoring_services(self, compose):
        services = compose["services"]
        for name, image in (("prometheus", "prom/prometheus:"), ("grafana", "grafana/grafana:")):
            assert services[name]["image"].startswith(image)
            assert not services[name]["image"].endswith(":latest")
        grafana = services["grafana"]
        env = grafana["environment"]
        assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
        assert env["GF_SECURITY_ADMIN_PASSWORD"] == COMPOSE_SECRETS["GRAFANA_ADMIN_PASSWORD"]
        assert published_on(grafana) == {("127.0.0.1", 3000, 3000)}  # dashboards not open to the world
        assert published_on(services["prometheus"]) == {("127.0.0.1", 9090, 9090)}
        provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/dashboards.yml").read_text())
        assert mounts(grafana)[str(GRAFANA_DIR / "dashboards")] == provider["providers"][0]["options"]["path"]
        assert mounts(grafana)[str(GRAFANA_DIR / "provisioning")] == "/etc/grafana/provisioning"
        home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{provider['providers'][0]['options']['path']}/{DASHBOARD.name}"
        prom_mounts = mounts(services["prometheus"])
        assert prom_mounts[str(PROM_DIR / "prometheus.yml")] == "/etc/prometheus/prometheus.yml"
        assert prom_mounts[str(PROM_DIR / "alerts.yml")] == "/etc/prometheus/alerts.yml"


# ---- Prometheus ----------------------------------------------------------------------------------

def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def loopback_prometheus_config(directory: Path, target: str) -> Path:
    """prometheus.yml (with alerts.yml beside it) scraping ``target`` instead of the compose service."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "digitserve"]
    job["static_configs"] = [{"targets": [target]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    shutil.copy(PROM_DIR / "alerts.yml", directory / "alerts.yml")
    return path


class TestPrometheus:
    def test_config_is_valid_and_scrapes_the_api_service(self, compose):
        result = run(tool("promtool"), "check", "config", str(PROM_DIR / "prometheus.yml"))
        assert result.returncode == 0, result.stdout + result.stderr
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "digitserve"]
        assert job["static_configs"] == [{"targets": ["api:8000"]}]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert duration_s(job["scrape_interval"]) == 5
        assert config["rule_files"] == ["alerts.yml"]
        assert "api" in compose["services"]

    def test_loopback_variant_is_valid(self, tmp_path):
        path = loopback_prometheus_config(tmp_path, "127.0.0.1:8000")
        result = run(tool("promtool"), "check", "config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rules_are_valid(self):
        result = run(tool("promtool"), "check", "rules", str(PROM_DIR / "alerts.yml"))
        assert result.returncode == 0, result.stdout + result.stderr
        names = {r["alert"] for r in alert_rules()}
        assert names == {"DigitserveDown", "HighServerErrorRatio", "HighClientErrorRatio", "HighLatencyP99",
                         "BatchingSaturated", "LowConfidenceShare", "LabelDistributionShift", "WorkerRestarts",
                         "Overloaded", "NotADigitShare"}
        for rule in alert_rules():
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]

    def test_rule_unit_tests_pass(self):
        result = run(tool("promtool"), "test", "rules", str(PROM_DIR / "alerts_test.yml"), cwd=PROM_DIR)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_has_a_firing_and_a_quiet_case(self):
        cases = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
        fires, quiet = set(), set()
        for case in cases:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
        alerts = {r["alert"] for r in alert_rules()}
        assert alerts - fires == set(), "alerts never shown to fire"
        assert alerts - quiet == set(), "alerts never shown to stay quiet"

    def test_rule_unit_tests_can_fail(self, tmp_path):
        rules = (PROM_DIR / "alerts.yml").read_text()
        assert "> 0.05" in rules
        (tmp_path / "alerts.yml").write_text(rules.replace("> 0.05", "> 0.5"))  # a server-error threshold typo
        shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
        result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=tmp_path)
        assert result.returncode != 0 and "HighServerErrorRatio" in result.stdout + result.stderr


# ---- PromQL names --------------------------------------------------------------------------------

GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def promql_problems(expr: str) -> list[str]:
    """Series and label names in ``expr`` that the service (or Prometheus' ``up``) does not have."""
    problems = []
    expr = re.sub(r"\$__\w+", "5m", expr)  # Grafana's interval variables
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
        if name in SERIES and labels - SERIES[name]:
            problems.append(f"{name} has no label {sorted(labels - SERIES[name])}")
    all_labels = set().union(*SERIES.values())
    for body in re.findall(GROUPING, expr):
        for label in re.findall(r"[a-zA-Z_]\w*", body):
            if label not in all_labels:
                problems.append(f"no series has label {label!r}")
    bare = re.sub(GROUPING, " ", re.sub(r"\{[^}]*\}", " ", expr))
    bare = re.sub(r'"[^"]*"|\[[^\]]*\]', " ", bare)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        name, call = match.group(1), match.group(2)
        if call or name in KEYWORDS:
            continue
        if name not in SERIES:
            problems.append(f"unknown series {name}")
    return problems


def dashboard_panels() -> list[dict]:
    """Every panel of the dashboard, rows and the panels a collapsed row holds included."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def dashboard_targets() -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in dashboard_panels() for t in p.get("targets", [])]


class TestMetricNames:
    def test_checker_catches_typos(self):
        assert promql_problems("rate(digitserve_request_total[5m])")
        assert promql_problems('sum(digitserve_predictions_total{lable="1"})')
        assert promql_problems("sum by (endpont) (rate(digitserve_requests_total[5m]))")
        assert promql_problems("digitserve_batch_size_bucket / digitserve_model_info_bucket")
        assert not promql_problems('histogram_quantile(0.99, sum by (le) (rate('
                                   'digitserve_request_duration_seconds_bucket{endpoint="predict"}[5m]))) > 0.25')

    def test_alert_expressions_use_only_service_metrics(self):
        for rule in alert_rules():
            assert promql_problems(rule["expr"]) == [], rule["alert"]

    def test_dashboard_queries_use_only_service_metrics(self):
        for title, target in dashboard_targets():
            assert promql_problems(target["expr"]) == [], title


# ---- Grafana -------------------------------------------------------------------------------------

class TestGrafana:
    def test_datasource_is_provisioned_with_the_dashboards_uid(self):
        (source,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
        assert source["uid"] == "prometheus" and source["type"] == "prometheus"
        assert source["url"] == "http://prometheus:9090"

    def test_dashboard_panels_all_query_prometheus(self):
        dashboard = json.loads(DASHBOARD.read_text())
        assert dashboard["uid"] == "digitserve"
        panels = dashboard_panels()
        assert len({p["id"] for p in panels}) == len(panels)
        for panel in panels:
            if panel["type"] == "row":  # a row's header: no query of its own
                assert not panel.get("targets") and panel["gridPos"]["w"] == 24, panel["title"]
                continue
            assert panel.get("targets"), f"panel {panel['title']!r} has no target"
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target["datasource"]["uid"] == "prometheus", panel["title"]

    def test_dashboard_covers_the_serving_signals(self):
        used = " ".join(t["expr"] for _, t in dashboard_targets())
        for name in METRICS:
            assert name in used, f"no panel shows {name}"
        for quantile in ("0.5", "0.95", "0.99"):
            assert (f"histogram_quantile({quantile}, sum by (le, endpoint) "
                    "(rate(digitserve_request_duration_seconds") in used
        assert 'status=~"4.."' in used and 'status=~"5.."' in used
        for name in UNVERSIONED_METRICS:
            assert name in used, f"no panel shows {name}"
        # a row each for the versions, overload and workers, and the process tree, over what they need
        rows = {p["title"] for p in dashboard_panels() if p["type"] == "row"}
        assert {"Versions", "Overload and workers", "Processes"} <= rows, rows
        for shown in ("by (version) (rate(digitserve_requests_total",  # what each version computed
                      "by (version, result) (digitserve_version_loads_total",
                      "by (endpoint, reason) (rate(digitserve_refusals_total",
                      "by (pool) (digitserve_queue_wait_estimate_seconds", "by (pool) (digitserve_workers_ready",
                      "by (pool, reason) (increase(digitserve_worker_restarts_total",
                      "by (process, pid) (digitserve_process_resident_memory_bytes",
                      "by (process, pid) (rate(digitserve_process_cpu_seconds_total",  # a counter: its rate
                      "by (process, pid) (digitserve_process_open_fds"):
            assert shown in used, f"no panel shows {shown}"

    def test_dashboard_panels_do_not_overlap(self):
        """Grafana's grid is 24 columns wide; two panels on the same cells hide each other."""
        taken: dict[tuple[int, int], str] = {}
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
            for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                         for y in range(grid["y"], grid["y"] + grid["h"])):
                assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
                taken[cell] = panel["title"]


# ---- the image's command, run as a local process ------------------------------------------------

def container_env(compose: dict, port: int) -> dict[str, str]:
    """The api container's environment, pointed at loopback, a free port and the repo's store."""
    env = {k: v for k, v in image_env().items() if k != "PATH"}  # PATH names the image's /opt/venv
    env.update({k: str(v) for k, v in compose["services"]["api"]["environment"].items()})
    env.update(DIGITSERVE_HOST="127.0.0.1", DIGITSERVE_PORT=str(port), DIGITSERVE_STORE=str(ROOT / "model_store"))
    return {**os.environ, **env}


def local_argv(argv: list[str]) -> list[str]:
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def kill_group(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def image_server(compose, tmp_path_factory):
    """``python -m service`` as the image runs it (Dockerfile CMD, ENV and the compose api environment)."""
    port = free_port()
    env = container_env(compose, port)
    log = tmp_path_factory.mktemp("image-server") / "server.log"
    argv = compose["services"]["api"].get("command") or image_command()
    process = subprocess.Popen(local_argv(argv), cwd=ROOT, env=env, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        Server(process, port, log).wait_ready(timeout=180)
        yield {"process": process, "port": port, "env": env, "log": log}
    finally:
        kill_group(process)


@pytest.mark.slow
class TestImageCommand:
    def test_dockerfile_healthcheck_passes_against_the_server(self, image_server):
        result = subprocess.run(local_argv(healthcheck_argv()), env=image_server["env"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    def test_dockerfile_healthcheck_fails_without_a_server(self, compose):
        env = container_env(compose, free_port())
        result = subprocess.run(local_argv(healthcheck_argv()), env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1

    def test_live_metrics_cover_the_alerts_and_dashboard(self, image_server):
        url = f"http://127.0.0.1:{image_server['port']}"
        one = [[255 if 4 <= row <= 23 and 13 <= col <= 15 else 0 for col in range(28)] for row in range(28)]
        response = httpx.post(f"{url}/predict", json={"instances": [{"pixels": one}, {"pixels": one}]}, timeout=60,
                              headers={"X-API-Key": COMPOSE_SECRETS["DIGITSERVE_API_KEY"]})
        assert response.status_code == 200, response.text
        exposed = set()
        for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                exposed.add(re.match(r"[\w:]+", line).group(0))
        used = set()
        for expr in [r["expr"] for r in alert_rules()] + [t["expr"] for _, t in dashboard_targets()]:
            used |= set(re.findall(r"\bdigitserve_\w+", expr))
        assert used - exposed == set(), "queried but not exposed by the running service"

    def test_prometheus_scrapes_it_and_evaluates_the_rules(self, image_server, tmp_path):
        config = loopback_prometheus_config(tmp_path, f"127.0.0.1:{image_server['port']}")
        assert run(tool("promtool"), "check", "config", str(config)).returncode == 0
        port = free_port()
        log = tmp_path / "prometheus.log"
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        api = f"http://127.0.0.1:{port}/api/v1"
        try:
            deadline, targets, rules = time.monotonic() + 90, [], []
            while time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-4000:]
                try:
                    targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
                    rules = [r for g in httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
                             for r in g["rules"]]
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                if targets and targets[0]["health"] == "up" and rules and all(r["health"] == "ok" for r in rules):
                    break
                time.sleep(1)
            assert targets and targets[0]["health"] == "up", targets
            assert len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules), rules
            info = httpx.get(f"{api}/query", params={"query": "digitserve_model_info"}, timeout=5).json()
            assert info["data"]["result"] and "version" in info["data"]["result"][0]["metric"]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(process)

    # Last in the class: it stops the module's server.
    def test_sigterm_stops_the_server_within_the_grace_period(self, image_server, compose):
        process = image_server["process"]
        grace = duration_s(compose["services"]["api"]["stop_grace_period"])
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {grace} s after SIGTERM (compose would SIGKILL it):\n"
                        f"{image_server['log'].read_text()[-4000:]}")
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its workers follow it out
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("worker processes outlived the server after SIGTERM")
        assert took < grace


@pytest.mark.slow
def test_compose_train_command_adds_a_version(compose, data_dir, tmp_path):
    """The compose `train` service's command, against real MNIST, on a copy of the store."""
    argv = list(compose["services"]["train"]["command"])
    target = tmp_path / "model_store"
    shutil.copytree(ROOT / "model_store", target)
    before = store.load(target, store.DEFAULT_NAME).version
    argv[argv.index("--data-dir") + 1] = str(data_dir)
    argv[argv.index("--store") + 1] = str(target)
    argv.remove("--download")  # the data is local; no network here
    result = subprocess.run([*local_argv(argv), "--limit", "500", "--epochs", "1", "--no-progress"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    loaded = store.load(target, store.DEFAULT_NAME)
    assert loaded.version == before + 1
    assert (target / store.DEFAULT_NAME / str(loaded.version) / "metadata.json").is_file()
