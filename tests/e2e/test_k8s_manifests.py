"""deploy/k8s, validated as far as a machine without a cluster can: rendered by kustomize, every core resource
against Kubernetes' own schemas, the CRD kinds against the fields their projects document, checkov and yamllint
clean, and tied to the code (settings, probe paths, metric names, alert rules, grace periods) through the real
server. What only a cluster can show is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings

try:
    from harness.server import running
except ImportError:  # before the move of tests/server.py
    from tests.server import running  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "model-store-volume"
ADAPTER_VALUES = K8S / "base" / "prometheus-adapter-values.yaml"
# The oldest and the newest of the three Kubernetes minors supported upstream when this was written.
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
CRD_GROUPS = ("monitoring.coreos.com/", "serving.kserve.io/")
WORKLOADS = ("base", "cpu", "gpu", "cpu+model-store-volume")
YAMLLINT = {"extends": "default", "rules": {"line-length": {"max": 120}, "document-start": "disable"}}

Doc = dict[str, Any]


TOOLS = ROOT / ".venv-tools" / "bin"


@pytest.fixture(scope="session")
def tools() -> Path:
    """checkov, and kubectl where the machine has none, in a venv of their own (.ci/tools-venv.sh says why)."""
    subprocess.run(["bash", str(ROOT / ".ci" / "tools-venv.sh")], check=True, timeout=900)
    return TOOLS


def kustomize(path: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl") or str(TOOLS / "kubectl")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Every target: the base, each overlay, and the cpu overlay with the volume component (how a user adds it)."""
    targets = {"base": kustomize(K8S / "base")}
    for overlay in ("cpu", "gpu", "kserve"):
        targets[overlay] = kustomize(K8S / "overlays" / overlay)
    # The cpu overlay with the component added, as its header tells a user to do.
    with_volume = tmp_path_factory.mktemp("with-volume")
    overlay = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    overlay["resources"] = [os.path.relpath(K8S / "overlays" / "cpu" / r, with_volume) for r in overlay["resources"]]
    overlay["components"] = [os.path.relpath(COMPONENT, with_volume)]
    (with_volume / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    targets["cpu+model-store-volume"] = kustomize(with_volume)
    return targets


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def digitserve_container(doc: Doc) -> Doc:
    containers = doc["spec"]["containers"] if doc["kind"] == "ServingRuntime" else \
        doc["spec"]["template"]["spec"]["containers"]
    return containers[0]


def serving_containers(rendered: dict[str, list[Doc]]) -> Iterator[tuple[str, Doc, Doc]]:
    """(target, the object holding the pod, the digitserve container) for every way the server is run."""
    for target in (*WORKLOADS, "kserve"):
        holder = only(rendered[target], "ServingRuntime" if target == "kserve" else "Deployment")
        yield target, holder, digitserve_container(holder)


def environment(rendered: dict[str, list[Doc]], target: str, container: Doc) -> dict[str, str]:
    """The plain values a container gets: its ConfigMap's data, then its own env (the later wins, as in Kubernetes)."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(only(rendered[target], "ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


def setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


def test_every_target_renders_what_it_should(rendered: dict[str, list[Doc]]) -> None:
    want = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
            "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    for target in WORKLOADS:
        kinds = {d["kind"] for d in rendered[target]}
        assert want <= kinds, f"{target} lacks {want - kinds}"
        assert {d["metadata"].get("namespace") for d in rendered[target] if d["kind"] != "Namespace"} == \
            {"digitserve"}, f"{target}: every object belongs in the digitserve namespace"
    assert "PersistentVolumeClaim" in {d["kind"] for d in rendered["cpu+model-store-volume"]}
    assert {d["kind"] for d in rendered["kserve"]} == {"ServingRuntime", "InferenceService"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_resources_pass_kubernetes_validate_strict(rendered: dict[str, list[Doc]], version: str) -> None:
    failures, checked = [], 0
    for target, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
                failures.append(f"{target} {doc['kind']}/{doc['metadata']['name']}: {getattr(e, 'message', e)}")
    assert not failures, "\n".join(failures)
    assert checked >= 4 * 8  # 8 core kinds in each of the four plain targets


def test_kubernetes_validate_refuses_an_unknown_field(tools: Path) -> None:
    """The strict check above can fail: a field Kubernetes does not have is an error, not ignored."""
    deployment = only(kustomize(K8S / "base"), "Deployment")
    digitserve_container(deployment)["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# --- the CRD kinds, against the fields their projects document --------------------------------------------------
# prometheus-operator, monitoring.coreos.com/v1: pkg/apis/monitoring/v1/servicemonitor_types.go (ServiceMonitorSpec),
# types.go (Endpoint), prometheusrule_types.go (PrometheusRuleSpec, RuleGroup, Rule); the API reference at
# prometheus-operator.dev/docs/api-reference/api/. KServe: pkg/apis/serving/v1alpha1/servingruntime_types.go
# (ServingRuntimeSpec, ServingRuntimePodSpec, SupportedModelFormat), pkg/apis/serving/v1beta1/predictor.go
# (PredictorSpec, PredictorExtensionSpec), predictor_model.go (ModelSpec, ModelFormat), component.go
# (ComponentExtensionSpec, ScaleMetric), pkg/constants (protocols, the container name kserve-container); the
# KServe docs' "Serving Runtime" and "Prometheus Metrics" pages. Core types embedded in them (Container, PodSpec)
# are checked with Kubernetes' own schemas.

def schema_properties(definition: str) -> set[str]:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSIONS[-1]}-local"
    return set(json.loads((folder / f"{definition}.json").read_text())["properties"])


DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")  # prometheus-operator's Duration
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}
SERVICE_MONITOR_SPEC = {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "selectorMechanism",
                        "namespaceSelector", "sampleLimit", "scrapeProtocols", "fallbackScrapeProtocol", "targetLimit",
                        "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "scrapeClassicHistograms",
                        "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
                        "convertClassicHistogramsToNHCB", "keepDroppedTargets", "attachMetadata", "scrapeClass",
                        "bodySizeLimit", "serviceDiscoveryRole"}
ENDPOINT = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
            "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
            "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings", "proxyUrl",
            "noProxy", "proxyFromEnvironment", "proxyConnectHeader", "followRedirects", "enableHttp2",
            "filterRunning"}
RULE_GROUP = {"name", "labels", "interval", "query_offset", "limit", "partial_response_strategy", "rules"}
RULE = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SERVING_RUNTIME_SPEC = {"supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec",
                        "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations",
                        "imagePullSecrets", "hostIPC", "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint",
                        "replicas", "storageHelper", "builtInAdapter"}
MODEL_FORMAT = {"name", "version", "autoSelect", "priority"}
COMPONENT_EXTENSION = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                       "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
                       "autoScaling"}
PREDICTORS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
              "paddle", "model", "storageUris", "workerSpec"}
MODEL_SPEC = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage"}


def unknown(obj: Doc, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> list[str]:
    problems = [f"{where}: unknown field {k!r}" for k in obj if k not in allowed]
    return problems + [f"{where}: missing required {k!r}" for k in required if k not in obj]


def as_pod(containers: list[Doc], volumes: list[Doc] | None = None) -> Doc:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
            "spec": {"containers": containers, **({"volumes": volumes} if volumes else {})}}


def core_problems(pod: Doc, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {e.message}"]
    return []


def service_monitor_problems(monitor: Doc, docs: list[Doc]) -> list[str]:
    where = f"ServiceMonitor/{monitor['metadata']['name']}"
    spec = monitor["spec"]
    problems = [] if monitor["apiVersion"] == "monitoring.coreos.com/v1" else [f"{where}: apiVersion"]
    problems += unknown(spec, SERVICE_MONITOR_SPEC, f"{where}.spec", required=("selector", "endpoints"))
    selected = [s for s in docs if s["kind"] == "Service" and
                spec["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    if not selected:
        problems.append(f"{where}: its selector matches no Service")
    for endpoint in spec.get("endpoints", []):
        problems += unknown(endpoint, ENDPOINT, f"{where}.spec.endpoints[]")
        problems += [f"{where}: {k} {endpoint[k]!r} is not a Duration" for k in ("interval", "scrapeTimeout")
                     if k in endpoint and not DURATION.match(endpoint[k])]
        for service in selected:
            if endpoint.get("port") not in {p.get("name") for p in service["spec"]["ports"]}:
                problems.append(f"{where}: port {endpoint.get('port')!r} is not a named port of the Service")
    return problems


def prometheus_rule_problems(rule: Doc) -> list[str]:
    where = f"PrometheusRule/{rule['metadata']['name']}"
    problems = unknown(rule["spec"], {"groups"}, f"{where}.spec", required=("groups",))
    for group in rule["spec"]["groups"]:
        problems += unknown(group, RULE_GROUP, f"{where} group", required=("name",))
        for r in group.get("rules", []):
            problems += unknown(r, RULE, f"{where} rule", required=("expr",))
            if ("alert" in r) == ("record" in r):
                problems.append(f"{where}: a rule is either an alert or a record: {r}")
            problems += [f"{where}: for {r['for']!r}" for k in ("for",) if k in r and not DURATION.match(r[k])]
    return problems


def kserve_problems(docs: list[Doc]) -> list[str]:
    runtime, service = only(docs, "ServingRuntime"), only(docs, "InferenceService")
    problems = [] if runtime["apiVersion"] == "serving.kserve.io/v1alpha1" else ["ServingRuntime: apiVersion"]
    problems += [] if service["apiVersion"] == "serving.kserve.io/v1beta1" else ["InferenceService: apiVersion"]
    spec = runtime["spec"]
    problems += unknown(spec, SERVING_RUNTIME_SPEC, "ServingRuntime.spec", required=("containers",))
    for fmt in spec.get("supportedModelFormats", []):
        problems += unknown(fmt, MODEL_FORMAT, "ServingRuntime supportedModelFormats[]", required=("name",))
    problems += [f"ServingRuntime: protocol {p!r}" for p in spec.get("protocolVersions", []) if p not in PROTOCOLS]
    if spec["containers"][0]["name"] != "kserve-container":
        problems.append("ServingRuntime: KServe looks for the server container by the name kserve-container")
    problems += core_problems(as_pod(spec["containers"], spec.get("volumes")), "ServingRuntime containers/volumes")

    problems += unknown(service["spec"], {"predictor", "explainer", "transformer"}, "InferenceService.spec",
                        required=("predictor",))
    predictor = service["spec"]["predictor"]
    problems += unknown(predictor, COMPONENT_EXTENSION | PREDICTORS | schema_properties("podspec-v1"),
                        "InferenceService.spec.predictor")
    if predictor.get("scaleMetric") not in SCALE_METRICS | {None}:
        problems.append(f"InferenceService: scaleMetric {predictor['scaleMetric']!r}")
    model = predictor["model"]
    problems += unknown(model, MODEL_SPEC | schema_properties("container-v1"), "InferenceService predictor.model",
                        required=("modelFormat",))
    container_part = {k: v for k, v in model.items() if k not in MODEL_SPEC}
    problems += core_problems(as_pod([{"name": "kserve-container", **container_part}]), "predictor.model container")
    # KServe's runtime selection (predictor_model.go): the named runtime must list the format and the protocol,
    # and a model without protocolVersion is v1.
    if model.get("runtime") != runtime["metadata"]["name"]:
        problems.append("InferenceService: model.runtime does not name the ServingRuntime")
    formats = {(f["name"], f.get("version")) for f in spec.get("supportedModelFormats", [])}
    wanted = (model["modelFormat"]["name"], model["modelFormat"].get("version"))
    if wanted not in formats and (wanted[0], None) not in formats:
        problems.append(f"InferenceService: model format {wanted} is not among the runtime's {formats}")
    if model.get("protocolVersion", "v1") not in spec.get("protocolVersions", PROTOCOLS):
        problems.append(f"InferenceService: protocol {model.get('protocolVersion', 'v1')} is not the runtime's")
    if service["metadata"].get("annotations", {}).get("serving.kserve.io/enable-prometheus-scraping") != "true":
        problems.append("InferenceService: serving.kserve.io/enable-prometheus-scraping is not \"true\"")
    return problems


def test_crd_kinds_have_only_documented_fields(rendered: dict[str, list[Doc]]) -> None:
    problems = []
    for target in WORKLOADS:
        docs = rendered[target]
        problems += [f"{target}: {p}" for p in service_monitor_problems(only(docs, "ServiceMonitor"), docs)]
        problems += [f"{target}: {p}" for p in prometheus_rule_problems(only(docs, "PrometheusRule"))]
    problems += [f"kserve: {p}" for p in kserve_problems(rendered["kserve"])]
    assert not problems, "\n".join(problems)


def test_the_crd_checks_can_fail(rendered: dict[str, list[Doc]]) -> None:
    docs = json.loads(json.dumps(rendered["kserve"]))
    only(docs, "InferenceService")["spec"]["predictor"]["model"]["protocolVersion"] = "v1"
    only(docs, "ServingRuntime")["spec"]["annotation"] = {}
    problems = kserve_problems(docs)
    assert any("unknown field 'annotation'" in p for p in problems) and any("protocol v1" in p for p in problems)


# --- linters ----------------------------------------------------------------------------------------------------

def test_checkov_finds_no_failed_check(rendered: dict[str, list[Doc]], tools: Path, tmp_path: Path) -> None:
    for target, docs in rendered.items():
        (tmp_path / f"{target}.yaml").write_text(yaml.safe_dump_all(docs))
    # --skip-download: no fetching of Prisma Cloud's guidelines (no network here; the checks ship with checkov)
    command = [str(tools / "checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
               "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LOG_LEVEL": "ERROR"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = reports[0]["summary"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']}, {Path(c['file_path']).name})"
              for r in reports for c in r["results"].get("failed_checks", [])]
    assert not failed and summary["parsing_errors"] == 0, "checkov failed:\n" + "\n".join(failed)
    assert summary["passed"] > 100 and summary["resource_count"] >= 30
    for skip in (c for r in reports for c in r["results"].get("skipped_checks", [])):
        reason = skip["check_result"].get("suppress_comment", "")
        assert len(reason) > 20, f"{skip['check_id']} is skipped without a reason"


def test_yamllint_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-d",
                             json.dumps(YAMLLINT), str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- tied to the code -------------------------------------------------------------------------------------------

def test_every_digitserve_variable_is_a_real_setting(rendered: dict[str, list[Doc]]) -> None:
    """A misspelt DIGITSERVE_* is silently ignored by the server (extra="ignore"): every one must name a setting."""
    names = set()
    for target, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                names |= {(target, k) for k in doc["data"] if k.startswith("DIGITSERVE_")}
        for _, _, container in (t for t in serving_containers(rendered) if t[0] == target):
            names |= {(target, e["name"]) for e in container.get("env", []) if e["name"].startswith("DIGITSERVE_")}
    missing = sorted(f"{target}: {name}" for target, name in names
                     if name.removeprefix("DIGITSERVE_").lower() not in Settings.model_fields)
    assert not missing, "not settings of service.config.Settings:\n" + "\n".join(missing)
    assert len({n for _, n in names}) >= 14


def test_configured_values_are_valid_settings(rendered: dict[str, list[Doc]]) -> None:
    """What the manifests set passes the server's own validation (as DIGITSERVE_* environment)."""
    for target, _, container in serving_containers(rendered):
        values = {k: v for k, v in environment(rendered, target, container).items() if k.startswith("DIGITSERVE_")}
        settings = Settings.model_validate({k.removeprefix("DIGITSERVE_").lower(): v for k, v in values.items()
                                            if k.removeprefix("DIGITSERVE_").lower() in Settings.model_fields})
        assert settings.host == "0.0.0.0", f"{target}: a pod must listen beyond its loopback"


def test_keys_come_from_a_secret_and_never_inline(rendered: dict[str, list[Doc]]) -> None:
    for target, docs in rendered.items():
        assert "Secret" not in {d["kind"] for d in docs}, f"{target}: a Secret in the manifests"
        text = yaml.safe_dump_all(docs)
        assert not re.search(r"(?i)(api|admin)[-_]?key[\"']?:\s*[\"']?[0-9a-f]{16,}", text), target
    for target, _, container in serving_containers(rendered):
        env = {e["name"]: e for e in container["env"]}
        for name in ("DIGITSERVE_API_KEY", "DIGITSERVE_ADMIN_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "digitserve-keys", \
                f"{target}: {name}"
        config = environment(rendered, target, container)
        assert not [k for k in config if k.endswith("_KEY")], f"{target}: a key in plain configuration"


def test_pod_security(rendered: dict[str, list[Doc]]) -> None:
    """What the issue asks of every pod, stated directly (checkov checks much of it too)."""
    for target, holder, container in serving_containers(rendered):
        pod = holder["spec"] if target == "kserve" else holder["spec"]["template"]["spec"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
        assert security.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot"), target
        seccomp = security.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, target
        if target != "kserve":  # KServe's own service account settings apply there
            assert pod["automountServiceAccountToken"] is False, target
        # Writable places are emptyDirs; the metrics folder lies inside one, not on its mount point (the server
        # deletes and re-creates the folder at start, which a mount point refuses).
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in empty, f"{target}: /tmp is not an emptyDir"
        metrics_dir = environment(rendered, target, container)["PROMETHEUS_MULTIPROC_DIR"]
        holders = [path for path, name in mounts.items() if name in empty and metrics_dir.startswith(path + "/")]
        assert holders, f"{target}: PROMETHEUS_MULTIPROC_DIR {metrics_dir} is not strictly inside an emptyDir"


def test_prometheus_rule_holds_exactly_the_alerts_of_alerts_yml(rendered: dict[str, list[Doc]]) -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    for target in WORKLOADS:
        groups = only(rendered[target], "PrometheusRule")["spec"]["groups"]
        exprs = {r["alert"]: r["expr"] for g in groups for r in g["rules"]}
        assert exprs == {r["alert"]: r["expr"] for g in alerts for r in g["rules"]}, f"{target}: expressions differ"
        assert groups == alerts, f"{target}: names, durations, labels or annotations differ from alerts.yml"


def test_grace_period_covers_the_drain(rendered: dict[str, list[Doc]]) -> None:
    """SIGKILL must not come before preStop + lame duck + in-flight grace (+ a margin to stop the processes)."""
    for target in WORKLOADS:
        deployment = only(rendered[target], "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        container = digitserve_container(deployment)
        config = environment(rendered, target, container)
        pre_stop = container["lifecycle"]["preStop"].get("sleep", {}).get("seconds", 0)
        drain = float(config.get("DIGITSERVE_DRAIN_DELAY_S", setting_default("drain_delay_s")
                                 if "drain_delay_s" in Settings.model_fields else 0))
        grace = float(config.get("DIGITSERVE_SHUTDOWN_GRACE_S", setting_default("shutdown_grace_s")))
        timeout = float(config.get("DIGITSERVE_REQUEST_TIMEOUT_S", setting_default("request_timeout_s")))
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + grace + 5, \
            f"{target}: {pod['terminationGracePeriodSeconds']} s < {pre_stop} + {drain} + {grace} + 5"
        assert timeout <= grace, f"{target}: a request may run {timeout} s, longer than the {grace} s grace"
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_network_policy_admits_only_ingress_and_prometheus(rendered: dict[str, list[Doc]]) -> None:
    for target in WORKLOADS:
        policy = only(rendered[target], "NetworkPolicy")
        pods = only(rendered[target], "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
        peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert len(peers) == 2 and all("namespaceSelector" in p for p in peers)
        # kustomize's label transformer must not have turned the Prometheus peer into a selector of our own pods
        assert [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p] == \
            [{"app.kubernetes.io/name": "prometheus"}], target
        ports = {p["name"] for p in digitserve_container(only(rendered[target], "Deployment"))["ports"]}
        assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} <= ports


# --- against the real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The real server after one /predict, one /explain and a GET of each probe path; its /metrics text."""
    digit = [[255 if 10 <= c <= 16 and 4 <= r <= 23 else 0 for c in range(28)] for r in range(28)]
    args = ("--api-servers", "1", "--workers", "1", "--explain-workers", "1")
    with running(tmp_path_factory.mktemp("k8s-server"), *args) as server, server.client() as client:
        for endpoint in ("predict", "explain"):
            assert client.post(f"/{endpoint}", json={"instances": [{"pixels": digit}]}).status_code == 200
        for path in ("/health", "/v2/health/live", "/v2/health/ready", "/v2", "/info"):
            client.get(path)  # so that their series exist too, and the adapter's query can be seen to drop them
        yield server, client.get("/metrics").text


def probes(rendered: dict[str, list[Doc]]) -> Iterator[tuple[str, str, int, str, int]]:
    """(target, probe, its port, its path, the port the server listens on) for every way the server is run."""
    for target, _, container in serving_containers(rendered):
        listening = int(environment(rendered, target, container)["DIGITSERVE_PORT"])
        named = {p.get("name"): p["containerPort"] for p in container["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind not in container:
                continue
            port = container[kind]["httpGet"]["port"]
            yield (target, kind, named[port] if isinstance(port, str) else port, container[kind]["httpGet"]["path"],
                   listening)
        assert listening in named.values(), f"{target}: the server's port {listening} is not a container port"


def test_probes_hit_real_endpoints(rendered: dict[str, list[Doc]], served_metrics: tuple[Any, str]) -> None:
    """Each probe's port is the one the server listens on, and its path answers 200 on the real, ready server."""
    server, _ = served_metrics
    kinds = {kind: path for _, kind, _, path, _ in probes(rendered)}
    assert kinds == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                     "livenessProbe": "/v2/health/live"}, "liveness and readiness need their own endpoints"
    failures = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for target, kind, port, path, listening in probes(rendered):
            if port != listening:
                failures.append(f"{target} {kind}: port {port}, but the server listens on {listening}")
            status = client.get(path).status_code
            if status != 200:
                failures.append(f"{target} {kind}: GET {path} answered {status}")
    assert not failures, "\n".join(sorted(set(failures)))


def test_hpa_metric_exists_as_the_adapter_maps_it(rendered: dict[str, list[Doc]],
                                                  served_metrics: tuple[Any, str]) -> None:
    """The HPA's pods metric is what the adapter rule exposes, and the series behind it is on the real /metrics
    with the labels the rule's query filters on (and a sample the query keeps)."""
    _, text = served_metrics
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {}
    for rule in rules:
        series = rule["seriesQuery"].strip("'\"").split("{")[0]
        name = re.sub(rule["name"]["matches"], rule["name"]["as"], series)
        exposed[name] = (series, rule)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for target in WORKLOADS:
        hpa = only(rendered[target], "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == only(rendered[target], "Deployment")["metadata"]["name"]
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert set(metrics) == {"Pods", "Resource"} and metrics["Resource"]["resource"]["name"] == "cpu"
        pods = metrics["Pods"]["pods"]
        assert pods["target"]["type"] == "AverageValue"
        assert pods["metric"]["name"] in exposed, f"{target}: no adapter rule exposes {pods['metric']['name']}"
    hpa_metric = next(m for m in only(rendered["base"], "HorizontalPodAutoscaler")["spec"]["metrics"] if "pods" in m)
    series, rule = exposed[hpa_metric["pods"]["metric"]["name"]]
    assert series in families, f"{series} is not on the server's /metrics"
    samples = families[series].samples
    matchers = re.findall(r'(\w+)(=~|!~|!=|=)"([^"]*)"', rule["metricsQuery"].split("<<.LabelMatchers>>")[1])
    assert matchers, "the query is expected to filter on a label the server exports"
    kept = {s.labels["endpoint"] for s in samples if all(
        (re.fullmatch(v, s.labels.get(k, "")) is not None) == (op in ("=~", "=")) for k, op, v in matchers)}
    assert {k for k, _, _ in matchers} <= set().union(*(s.labels for s in samples))
    # The endpoints it keeps are those the alert rules count as client traffic, and nothing else the server has.
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    found = re.search(r'HighServerErrorRatio[\s\S]*?endpoint=~"([^"]+)"', alerts)
    assert found, "alerts.yml's HighServerErrorRatio no longer names the client endpoints"
    traffic = set(found.group(1).split("|"))
    assert kept == traffic & {s.labels["endpoint"] for s in samples} and {"predict", "explain"} <= kept, kept
    assert {s.labels["endpoint"] for s in samples} - kept, "the server exported no series the query drops"
    assert {"namespace", "pod"}.isdisjoint(set().union(*(s.labels for s in samples))), \
        "namespace and pod must come from Prometheus' target labels, not from the server"


def test_alert_expressions_use_metrics_the_server_exports(rendered: dict[str, list[Doc]],
                                                          served_metrics: tuple[Any, str]) -> None:
    _, text = served_metrics
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used = {m for g in only(rendered["base"], "PrometheusRule")["spec"]["groups"] for r in g["rules"]
            for m in re.findall(r"digitserve_\w+", r["expr"])}
    assert used and not used - names, f"not on /metrics: {sorted(used - names)}"
