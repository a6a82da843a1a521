"""Medians over rounds, the issue's targets, the Markdown table and the throughput-vs-p99 plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.load import Workload
from bench.procs import SERVERS

METRICS = ("req_s", "images_s", "p50_ms", "p99_ms", "errors", "pss_mb", "cpu_ms_per_req", "cpu_cores",
           "client_cpu_ms_per_req",  # bench/grpcload.py's own CPU (gRPC rows)
           "switches", "failed",  # version switches made and refused (the switching workload)
           "shadowed", "shadow_dropped")  # shadow comparisons made and shadow work dropped (the shadow workload)
SWITCHING = "predict-1img@64-switching"
SHADOWING = "predict-1img@64-shadow"
SINGLE_64 = "predict-1img@64"
BATCH_8 = "predict-32img@8"
V2_WORKLOADS = ("v2-fp32-1img@64", "v2-png-1img@64", "v2-fp32-32img@8", "v2-png-32img@8")


def _median(values: Iterable[float | None]) -> float | None:
    """Of the numbers there are (a stalled run has no latencies)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(rounds: list[dict], workloads: list[Workload]) -> dict[str, dict]:
    """``{server: {"cold_start_s": .., "rounds_ok": .., "workloads": {name: {metric: median}}}}`` over the
    rounds in which a number exists (a crashed server's later workloads are missing, not zero)."""
    out: dict[str, dict] = {}
    for server in SERVERS:
        runs = [r["servers"][server] for r in rounds if server in r["servers"]]
        per_workload = {}
        for w in workloads:
            measured = [run["workloads"][w.name] for run in runs if w.name in run.get("workloads", {})]
            if measured:
                per_workload[w.name] = {m: _median(x.get(m) for x in measured) for m in METRICS}
                per_workload[w.name].update(rounds=len(measured), errors_max=max(x["errors"] for x in measured),
                                            stalls=sum(x["stalled"] for x in measured))
            # V2 answers checked before timing that were wrong: that workload was not measured in those rounds
            checked = [run["verified"][w.name] for run in runs if w.name in run.get("verified", {})]
            if failed := [c for c in checked if not c["ok"]]:
                per_workload.setdefault(w.name, {})["wrong_answers_rounds"] = len(failed)
        out[server] = {"cold_start_s": _median(run.get("cold_start_s") for run in runs),
                       "stop_s": _median(run.get("stop_s") for run in runs),
                       "exit_codes": [run.get("exit_code") for run in runs],
                       "rounds_ok": sum("error" not in run for run in runs), "workloads": per_workload}
    return out


def _get(table: dict, workload: str, metric: str) -> float | None:
    return table.get(workload, {}).get(metric)


def _ratio(top: dict, bottom: dict, metric: str) -> float | None:
    """``top[metric] / bottom[metric]`` for two workload rows (``{metric: value}``), None if either is missing."""
    high, low = top.get(metric), bottom.get(metric)
    return high / low if high is not None and low else None


def _at_least(least: float) -> Callable[[float], bool]:
    def check(value: float) -> bool:
        return value >= least
    return check


def _vs_baseline(value: float) -> str:
    return "PASS" if value >= 5 else "MIN" if value >= 3 else "FAIL"


# Ratios within one run: (target, (server, workload), over (server, workload), metric, verdict)
RATIOS: list[tuple[str, tuple[str, str], tuple[str, str], str, Callable[[float], bool | str]]] = [
    ("single image @64: req/s vs baseline >= 5x (3x minimum)", ("digitserve", SINGLE_64), ("baseline", SINGLE_64),
     "req_s", _vs_baseline),
    ("V2 binary FP32, 1 image @64: req/s >= 2x /predict's (predict-1img@64)", ("digitserve", "v2-fp32-1img@64"),
     ("digitserve", SINGLE_64), "req_s", _at_least(2)),
    ("V2 binary FP32, 1 image @64: req/s >= 0.4x the ceiling's", ("digitserve", "v2-fp32-1img@64"),
     ("ceiling", SINGLE_64), "req_s", _at_least(0.4)),
    ("V2 binary FP32, 32 images @8: images/s >= 3x /predict's (predict-32img@8)", ("digitserve", "v2-fp32-32img@8"),
     ("digitserve", BATCH_8), "images_s", _at_least(3)),
    ("switching versions every 2 s, 1 image @64: p99 <= 1.5x without switches", ("digitserve", SWITCHING),
     ("digitserve", SINGLE_64), "p99_ms", lambda v: v <= 1.5),
    ("shadowing every request with another version, 1 image @64: p99 <= 1.2x without", ("digitserve", SHADOWING),
     ("digitserve", SINGLE_64), "p99_ms", lambda v: v <= 1.2),
    ("V2 BYTES PNG, 1 image @64: req/s >= /predict's (1x)", ("digitserve", "v2-png-1img@64"),
     ("digitserve", SINGLE_64), "req_s", _at_least(1)),
    ("V2 BYTES PNG, 32 images @8: images/s >= /predict's (1x)", ("digitserve", "v2-png-32img@8"),
     ("digitserve", BATCH_8), "images_s", _at_least(1)),
]


def ratios_by_round(rounds: list[dict], top: tuple[str, str], bottom: tuple[str, str], metric: str) -> list[float]:
    """One ratio per round in which both numbers exist (its two runs seconds apart, on fresh servers)."""
    out = []
    for r in rounds:
        rows = [r["servers"].get(server, {}).get("workloads", {}).get(w) for server, w in (top, bottom)]
        if rows[0] and rows[1] and (value := _ratio(rows[0], rows[1], metric)) is not None:
            out.append(value)
    return out


def targets(med: dict[str, dict], rounds: list[dict] | None = None) -> list[dict]:
    """The issue's targets: ``{"target", "value", "verdict"}`` (ratios also ``by_round``); a missing number
    is a FAIL. A ratio's value is of the medians over rounds."""
    ds = med["digitserve"]["workloads"]

    ratio_checks: list[tuple] = []
    by_round: dict[str, list[float]] = {}
    for name, top, bottom, metric, check in RATIOS:
        rows = [med.get(server, {}).get("workloads", {}).get(w, {}) for server, w in (top, bottom)]
        ratio_checks.append((name, _ratio(rows[0], rows[1], metric), "x", check))
        by_round[name] = ratios_by_round(rounds or [], top, bottom, metric)
    v2_bad = None
    if all(w in ds and "wrong_answers_rounds" not in ds[w] for w in V2_WORKLOADS):
        v2_bad = sum(ds[w]["errors_max"] + ds[w]["stalls"] for w in V2_WORKLOADS)
    pss = [w["pss_mb"] for w in ds.values() if w.get("pss_mb") is not None]
    checks = [
        ratio_checks[0],
        ("single image @64: p99 <= 60 ms", _get(ds, SINGLE_64, "p99_ms"), " ms", lambda v: v <= 60),
        ("single image @64: zero errors (every round; a stall counts)",
         None if SINGLE_64 not in ds else ds[SINGLE_64]["errors_max"] + ds[SINGLE_64]["stalls"], "", lambda v: v == 0),
        ("32-image requests: >= 12,000 images/s", _get(ds, BATCH_8, "images_s"), " img/s",
         lambda v: v >= 12_000),
        ("/explain IG 32 steps @1: p50 <= 15 ms", _get(ds, "explain-integrated_gradients@1", "p50_ms"), " ms",
         lambda v: v <= 15),
        ("cold start <= 10 s", med["digitserve"]["cold_start_s"], " s", lambda v: v <= 10),
        ("default config PSS under load <= 1.5 GB", max(pss) if pss else None, " MB", lambda v: v <= 1500),
        *ratio_checks[1:],
        ("V2: answers checked right, zero errors (every round, every V2 workload; a stall counts)", v2_bad, "",
         lambda v: v == 0),
        ("switching versions every 2 s: zero errors, every switch made (every round)",
         None if SWITCHING not in ds else ds[SWITCHING]["errors_max"] + ds[SWITCHING]["stalls"]
         + (ds[SWITCHING].get("failed") or 0), "", lambda v: v == 0),
    ]
    out = []
    for target, value, unit, check in checks:
        verdict = "FAIL" if value is None else check(value)
        verdict = verdict if isinstance(verdict, str) else "PASS" if verdict else "FAIL"
        out.append({"target": target, "value": value, "unit": unit.strip(), "verdict": verdict})
        if target in by_round:
            out[-1]["by_round"] = by_round[target]
    return out


def markdown(med: dict[str, dict], workloads: list[Workload], checks: list[dict], micro: dict, machine: dict) -> str:
    simd = ", ".join(machine["cpu_simd"]) or "no AVX2"
    lines = [f"machine: {machine['cpus_usable']} CPUs, {machine['cpu_model']} ({simd}), "
             f"commit {machine['git_commit'][:7]}{' (dirty)' if machine['git_dirty'] else ''}", "",
             "| workload | server | req/s | images/s | p50 ms | p99 ms | errors | CPU ms/req | PSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in workloads:
        for server in w.servers:
            m = med.get(server, {}).get("workloads", {}).get(w.name)
            if m is None or m.get("req_s") is None:
                why = f"wrong answers ({m['wrong_answers_rounds']} rounds)" if m else "failed"
                lines.append(f"| {w.name} | {server} | {why} | | | | | | |")
                continue
            p50, p99, cpu = (f"{m[k]:.{d}f}" if m.get(k) is not None else "n/a"
                             for k, d in (("p50_ms", 1), ("p99_ms", 1), ("cpu_ms_per_req", 3)))
            errors = f"{m['errors']:g}" + (f" ({m['stalls']} stalled)" if m["stalls"] else "")
            if m.get("wrong_answers_rounds"):
                errors += f" (wrong answers in {m['wrong_answers_rounds']} rounds, not measured there)"
            lines.append(f"| {w.name} | {server} | {m['req_s']:,.0f} | {m['images_s']:,.0f} | {p50} | {p99} | "
                         f"{errors} | {cpu} | {m['pss_mb']:,.0f} |")
    lines.append("")
    for server in SERVERS:
        if server not in med:
            continue
        m = med[server]
        cold = f"{m['cold_start_s']:.1f} s" if m["cold_start_s"] is not None else "failed"
        stop = f"{m['stop_s']:.1f} s" if m["stop_s"] is not None else "n/a"
        lines.append(f"{server}: cold start {cold}; stop after SIGTERM {stop} (exit codes {m['exit_codes']}); "
                     f"rounds without failure {m['rounds_ok']}/{len(m['exit_codes'])}")
    ratio = checks[0]["value"]
    lines.append("single image @64, digitserve/baseline req/s: " + (f"{ratio:.1f}x" if ratio else "n/a"))
    grpc = [(w.name, server, m["client_cpu_ms_per_req"]) for w in workloads if w.grpc for server in w.servers
            if (m := med.get(server, {}).get("workloads", {}).get(w.name)) and m.get("client_cpu_ms_per_req")]
    if grpc:  # how much of the cores the load generator took: it shares them with the server
        lines.append("gRPC load generator's own CPU per request: " + ", ".join(
            f"{name} {server} {cpu:.3f} ms" for name, server, cpu in grpc))
        ours, ceiling = (med.get(server, {}).get("workloads", {}).get("grpc-fp32-1img@64", {})
                         for server in ("digitserve", "ceiling"))
        if (value := _ratio(ours, ceiling, "req_s")) is not None:
            lines.append(f"gRPC FP32 1 image @64, digitserve/ceiling req/s: {value:.2f}x")
    if "before" in med:  # BENCH_BEFORE: today's tree against an earlier commit's, workload by workload
        lines.append(_versus(med, workloads, "digitserve", "before", "req_s",
                             f"digitserve/before ({machine.get('before_commit', '')[:7]}) req/s"))
    for traced in (server for server in med if server.startswith("digitserve-traces-")):  # BENCH_TRACES
        share = traced.removeprefix("digitserve-traces-")
        for metric, unit in (("req_s", "req/s"), ("p99_ms", "p99"), ("cpu_ms_per_req", "CPU ms/req")):
            lines.append(_versus(med, workloads, traced, "digitserve", metric, f"traces on ({share})/off {unit}"))
    if micro:
        lines.append("ceilings on 1 core: " + ", ".join(f"{k.removesuffix('_images_s')} {v:,.0f} images/s"
                                                         for k, v in micro.items()))
    lines.append("")
    for c in checks:
        digits = 2 if c["unit"] == "x" and c["value"] is not None and c["value"] < 10 else 1
        value = "n/a" if c["value"] is None else f"{c['value']:,.{digits}f}{c['unit'] and ' ' + c['unit']}"
        if c.get("by_round") and len(c["by_round"]) > 1:
            value += f" ({min(c['by_round']):.2f}-{max(c['by_round']):.2f} by round)"
        lines.append(f"{c['verdict']:4}  {c['target']}: {value}")
    return "\n".join(lines)


def _versus(med: dict[str, dict], workloads: list[Workload], top: str, bottom: str, metric: str, title: str) -> str:
    """``title: workload ratio, ...``: ``top``'s ``metric`` over ``bottom``'s, for each workload ``bottom``
    ran too."""
    against = [(w.name, _ratio(med[top]["workloads"].get(w.name, {}), med[bottom]["workloads"].get(w.name, {}),
                               metric)) for w in workloads if top in w.servers and bottom in w.servers]
    return f"{title}: " + ", ".join(f"{name} {value:.2f}x" if value else f"{name} n/a" for name, value in against)


def plot(med: dict[str, dict], workloads: list[Workload], path: Path) -> None:
    """Throughput (x) against p99 (y): single images by connections (with the V2 and ceiling points at 64),
    32-image requests (/predict and V2), /explain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def named(prefix: str) -> list[Workload]:
        return [w for w in workloads if w.name.startswith(prefix)]

    # per panel: title, x metric, y scale, and its series: legend label, server, workloads, marker and line
    panels = [
        ("single image", "req_s", "log", [("digitserve /predict", "digitserve", named("predict-1img"), "o-"),
                                          ("baseline /predict", "baseline", named("predict-1img"), "s-"),
                                          ("ceiling (no model)", "ceiling", named("predict-1img"), "^"),
                                          ("digitserve V2 FP32", "digitserve", named("v2-fp32-1img"), "D"),
                                          ("digitserve V2 PNG", "digitserve", named("v2-png-1img"), "v"),
                                          ("digitserve gRPC FP32", "digitserve", named("grpc-fp32-1img"), "P"),
                                          ("ceiling gRPC", "ceiling", named("grpc-fp32-1img"), "x")]),
        ("32 images per request", "images_s", "linear",
         [("digitserve /predict", "digitserve", named("predict-32img"), "o"),
          ("baseline /predict", "baseline", named("predict-32img"), "s"),
          ("digitserve V2 FP32", "digitserve", named("v2-fp32-32img"), "D"),
          ("digitserve V2 PNG", "digitserve", named("v2-png-32img"), "v"),
          ("digitserve gRPC FP32", "digitserve", named("grpc-fp32-32img"), "P")]),
        ("/explain (1 connection)", "req_s", "linear",
         [("digitserve", "digitserve", [w for w in workloads if w.path == "/explain"], "o")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, metric, yscale, series) in zip(axes, panels):
        for label, server, group, style in series:
            points = [(w, med.get(server, {}).get("workloads", {}).get(w.name)) for w in group if server in w.servers]
            points = [(w, m) for w, m in points if m and m.get("p99_ms") is not None]
            if not points:
                continue
            xs, ys = [m[metric] for _, m in points], [m["p99_ms"] for _, m in points]
            ax.plot(xs, ys, style, label=label)
            for (w, _), x, y in zip(points, xs, ys):
                note = w.name.split("-", 1)[1].split("@")[0] if w.path == "/explain" else f"{w.connections} conn"
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=title, xlabel=metric.replace("_s", "/s").replace("req", "requests"), ylabel="p99 latency (ms)",
               yscale=yscale)
        if yscale == "linear":
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
