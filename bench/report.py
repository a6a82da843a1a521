"""Medians over rounds, the issue's targets, the Markdown table and the throughput-vs-p99 plot."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path

from bench.load import Workload

METRICS = ("req_s", "images_s", "p50_ms", "p99_ms", "errors", "pss_mb")
SINGLE_64 = "predict-1img@64"


def _median(values: Iterable[float | None]) -> float | None:
    """Of the numbers there are (a stalled run has no latencies)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(rounds: list[dict], workloads: list[Workload]) -> dict[str, dict]:
    """``{server: {"cold_start_s": .., "rounds_ok": .., "workloads": {name: {metric: median}}}}`` over the
    rounds in which a number exists (a crashed server's later workloads are missing, not zero)."""
    out: dict[str, dict] = {}
    for server in ("digitserve", "baseline"):
        runs = [r["servers"][server] for r in rounds if server in r["servers"]]
        per_workload = {}
        for w in workloads:
            measured = [run["workloads"][w.name] for run in runs if w.name in run.get("workloads", {})]
            if measured:
                per_workload[w.name] = {m: _median(x[m] for x in measured) for m in METRICS}
                per_workload[w.name].update(rounds=len(measured), errors_max=max(x["errors"] for x in measured),
                                            stalls=sum(x["stalled"] for x in measured))
        out[server] = {"cold_start_s": _median(run.get("cold_start_s") for run in runs),
                       "stop_s": _median(run.get("stop_s") for run in runs),
                       "exit_codes": [run.get("exit_code") for run in runs],
                       "rounds_ok": sum("error" not in run for run in runs), "workloads": per_workload}
    return out


def targets(med: dict[str, dict]) -> list[dict]:
    """The issue's targets: ``{"target", "value", "verdict"}``; a missing number is a FAIL."""
    ds, base = med["digitserve"]["workloads"], med["baseline"]["workloads"]

    def get(table: dict, workload: str, metric: str) -> float | None:
        return table.get(workload, {}).get(metric)

    ratio = None
    if get(ds, SINGLE_64, "req_s") is not None and get(base, SINGLE_64, "req_s"):
        ratio = ds[SINGLE_64]["req_s"] / base[SINGLE_64]["req_s"]
    pss = [w["pss_mb"] for w in ds.values()]
    checks = [
        ("single image @64: req/s vs baseline >= 5x (3x minimum)", ratio, "x",
         lambda v: "PASS" if v >= 5 else "MIN" if v >= 3 else "FAIL"),
        ("single image @64: p99 <= 60 ms", get(ds, SINGLE_64, "p99_ms"), " ms", lambda v: v <= 60),
        ("single image @64: zero errors (every round; a stall counts)",
         None if SINGLE_64 not in ds else ds[SINGLE_64]["errors_max"] + ds[SINGLE_64]["stalls"], "", lambda v: v == 0),
        ("32-image requests: >= 12,000 images/s", get(ds, "predict-32img@8", "images_s"), " img/s",
         lambda v: v >= 12_000),
        ("/explain IG 32 steps @1: p50 <= 15 ms", get(ds, "explain-integrated_gradients@1", "p50_ms"), " ms",
         lambda v: v <= 15),
        ("cold start <= 10 s", med["digitserve"]["cold_start_s"], " s", lambda v: v <= 10),
        ("default config PSS under load <= 1.5 GB", max(pss) if pss else None, " MB", lambda v: v <= 1500),
    ]
    out = []
    for target, value, unit, check in checks:
        verdict = "FAIL" if value is None else check(value)
        verdict = verdict if isinstance(verdict, str) else "PASS" if verdict else "FAIL"
        out.append({"target": target, "value": value, "unit": unit.strip(), "verdict": verdict})
    return out


def markdown(med: dict[str, dict], workloads: list[Workload], checks: list[dict], micro: dict, machine: dict) -> str:
    simd = ", ".join(machine["cpu_simd"]) or "no AVX2"
    lines = [f"machine: {machine['cpus_usable']} CPUs, {machine['cpu_model']} ({simd}), "
             f"commit {machine['git_commit'][:7]}{' (dirty)' if machine['git_dirty'] else ''}", "",
             "| workload | server | req/s | images/s | p50 ms | p99 ms | errors | PSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in workloads:
        for server in w.servers:
            m = med[server]["workloads"].get(w.name)
            if m is None:
                lines.append(f"| {w.name} | {server} | failed | | | | | |")
                continue
            p50, p99 = (f"{m[k]:.1f}" if m[k] is not None else "n/a" for k in ("p50_ms", "p99_ms"))
            errors = f"{m['errors']:g}" + (f" ({m['stalls']} stalled)" if m["stalls"] else "")
            lines.append(f"| {w.name} | {server} | {m['req_s']:,.0f} | {m['images_s']:,.0f} | {p50} | {p99} | "
                         f"{errors} | {m['pss_mb']:,.0f} |")
    lines.append("")
    for server in ("digitserve", "baseline"):
        m = med[server]
        cold = f"{m['cold_start_s']:.1f} s" if m["cold_start_s"] is not None else "failed"
        stop = f"{m['stop_s']:.1f} s" if m["stop_s"] is not None else "n/a"
        lines.append(f"{server}: cold start {cold}; stop after SIGTERM {stop} (exit codes {m['exit_codes']}); "
                     f"rounds without failure {m['rounds_ok']}/{len(m['exit_codes'])}")
    ratio = checks[0]["value"]
    lines.append("single image @64, digitserve/baseline req/s: " + (f"{ratio:.1f}x" if ratio else "n/a"))
    if micro:
        lines.append("ceilings on 1 core: " + ", ".join(f"{k.removesuffix('_images_s')} {v:,.0f} images/s"
                                                         for k, v in micro.items()))
    lines.append("")
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:,.1f}{c['unit'] and ' ' + c['unit']}"
        lines.append(f"{c['verdict']:4}  {c['target']}: {value}")
    return "\n".join(lines)


def plot(med: dict[str, dict], workloads: list[Workload], path: Path) -> None:
    """Throughput (x) against p99 (y): single-image /predict by connections, 32-image requests, /explain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # title, x metric, the workloads, whether the points form a curve (by connections), y scale
    single = [w for w in workloads if w.name.startswith("predict-1img")]
    batched = [w for w in workloads if w.name.startswith("predict-32img")]
    explain = [w for w in workloads if w.path == "/explain"]
    panels = [("single-image /predict", "req_s", single, "-", "log"),
              ("32-image /predict", "images_s", batched, "", "linear"),
              ("/explain (1 connection)", "req_s", explain, "", "linear")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, metric, group, line, yscale) in zip(axes, panels):
        for server, marker in (("digitserve", "o"), ("baseline", "s")):
            points = [(w, med[server]["workloads"].get(w.name)) for w in group if server in w.servers]
            points = [(w, m) for w, m in points if m and m["p99_ms"] is not None]
            if not points:
                continue
            xs, ys = [m[metric] for _, m in points], [m["p99_ms"] for _, m in points]
            ax.plot(xs, ys, marker + line, label=server)
            for (w, _), x, y in zip(points, xs, ys):
                label = w.name.split("-", 1)[1].split("@")[0] if w.path == "/explain" else f"{w.connections} conn"
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=title, xlabel=metric.replace("_s", "/s").replace("req", "requests"), ylabel="p99 latency (ms)",
               yscale=yscale)
        if yscale == "linear":
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
