"""The CUDA path end to end, for every runtime, for a machine with a GPU (CI has none, so this is not a test):

1. the forward the predict worker calls (hidden layer and logits) on each device, for each runtime: eager, the
   version's static graph AOTInductor-compiled for that device (``service.export --device``), and on CUDA
   ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; AOTInductor packages have none); each proven equal
   to the eager module on real digits (``static.check_parity``), then timed (images/s at batch 1, 64, 1024);
2. the real server with ``--accelerator cuda`` and each ``--runtime``: /info and the model_info metric say
   cuda and the runtime, answers to single-image requests sent concurrently equal the in-process CPU
   model's, the workers formed batches, and /explain (every method) equals the CPU explainer;
3. wrk at 64 connections (single images, 32-image requests) against each of those servers and against the
   same on the CPU, on the same machine, so the figures compare.

Without a GPU it says so and runs the CPU half (a check of the script itself; exit 0 if that half passes).

    python -m bench.cuda_check [--seconds 8] [--images 512] [--out FILE]   # exit 1 if a check fails
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.data import data_dir, mnist_pngs, write_bodies
from bench.load import LoadSettings, Workload, measure
from harness.server import ROOT, b64, metric_samples, running
from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from service.model import data, static, store
from service.work import METHODS
from service.worker.explain import Explainer

TOLERANCE = 1e-4  # float32 on two devices: different kernels, same maths


def forward_ceilings(model: static.Features, device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """Images/s of the bare forward on ``device``; synchronised, so queued kernels are counted."""
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    ceilings = {}
    for batch in (1, 64, 1024):
        x = torch.randn(batch, 784, device=device)
        with torch.inference_mode():
            model(x)
            sync()
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                model(x)
                count += batch
            sync()
        ceilings[f"b{batch}_images_s"] = count / (time.perf_counter() - started)
    return ceilings


@contextmanager
def exported_store(device: torch.device) -> Iterator[Path]:
    """A copy of the committed store whose version 1 has its static graph compiled for ``device``."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "model_store" / store.DEFAULT_NAME / "1", Path(tmp) / store.DEFAULT_NAME / "1")
        images, _ = data.load_mnist(data_dir(), train=False)
        static.export(Path(tmp), store.DEFAULT_NAME, 1, images, device.type)
        yield Path(tmp)


def runtime_ceilings(root: Path, device: torch.device) -> dict[str, dict[str, float]]:
    """Each runtime's forward on ``device``, proven equal to the eager module first, then timed."""
    loaded = store.load(root, store.DEFAULT_NAME, 1, device)
    eager = static.FeatureNet(loaded.model).eval()
    runtimes: dict[str, static.Features] = {"eager": eager, "export": static.load(loaded, device)}
    if device.type == "cuda":
        runtimes["compile_cudagraphs"] = torch.compile(eager, mode="reduce-overhead")
    ceilings = {}
    for name, model in runtimes.items():
        static.check_parity(loaded, eager, model, device)  # raises static.Refused, naming the difference
        ceilings[name] = forward_ceilings(model, device)
    return ceilings


def reference(loaded: store.LoadedModel, pngs: list[bytes]) -> tuple[torch.Tensor, np.ndarray]:
    """The service's preprocessing and the model, in-process on the CPU: normalised inputs and probabilities."""
    norm = loaded.metadata.normalization
    images = to_mnist([decode_image(png, Limits()) for png in pngs])
    x = torch.from_numpy(normalize(images, norm.mean, norm.std)).reshape(len(pngs), -1)
    with torch.inference_mode():
        return x, torch.softmax(loaded.model(x), dim=1).numpy()


def check_answers(client: httpx.Client, pngs: list[bytes], want: np.ndarray, labels: list[int]) -> dict:
    """Single-image requests from 32 threads (so batches form); every answer against the CPU reference."""
    def post(png: bytes) -> list[float]:
        response = client.post("/predict", json={"instances": [{"image_b64": b64(png)}]})
        response.raise_for_status()
        return response.json()["predictions"][0]["probabilities"]

    with ThreadPoolExecutor(32) as pool:
        got = np.array(list(pool.map(post, pngs)))
    return {"requests": len(pngs), "max_abs_diff": float(np.abs(got - want).max()),
            "accuracy": float((got.argmax(1) == np.array(labels)).mean())}


def check_explain(client: httpx.Client, loaded: store.LoadedModel, pngs: list[bytes], x: torch.Tensor) -> dict:
    norm = loaded.metadata.normalization
    explainer = Explainer(loaded.model, norm.mean, norm.std)
    diffs = {}
    for method in METHODS:
        response = client.post("/explain", json={"instances": [{"image_b64": b64(p)} for p in pngs], "method": method})
        response.raise_for_status()
        got = np.array([r["attributions"] for r in response.json()["predictions"]])
        want = np.array([r["attributions"] for r in explainer.explain(x, method, [None] * len(x), 32, 10, False)])
        diffs[method] = float(np.abs(got - want).max())
    return diffs


def serve_and_measure(accelerator: str, args: tuple[str, ...], loaded: store.LoadedModel, pngs: list[bytes],
                      labels: list[int], seconds: float, work: Path) -> dict:
    """The server with ``args`` (a store, a runtime) on ``accelerator``: its answers checked, then measured."""
    x, want = reference(loaded, pngs)
    bodies = write_bodies(work, pngs)
    settings = LoadSettings(warmup_s=2, duration_s=seconds, wrk_threads=4, wrk_timeout_s=10)
    workloads = [Workload("single_c64", "/predict", "single", 64), Workload("batch32_c64", "/predict", "batch", 64, 32)]
    with running(work, "--accelerator", accelerator, *args) as server, server.client() as client:
        serving = client.get("/info").json()["serving"]
        result = {"args": list(args), "device": serving["device"], "runtime": serving["runtimes"]["/predict"]["1"]}
        result["answers"] = check_answers(client, pngs, want, labels)
        result["explain_max_abs_diff"] = check_explain(client, loaded, pngs[:16], x[:16])
        text = client.get("/metrics").text
        predict_v1 = (("endpoint", "predict"), ("version", "1"))
        batch_sum = metric_samples(text, "digitserve_batch_size_sum")[predict_v1]
        batch_count = metric_samples(text, "digitserve_batch_size_count")[predict_v1]
        result["mean_batch_images"] = batch_sum / batch_count
        info = [dict(k) for k in metric_samples(text, "digitserve_model_info")]
        result["model_info_devices"] = sorted({k["device"] for k in info})
        result["model_info_runtimes"] = {k["pool"]: k["runtime"] for k in info}
        for workload in workloads:
            measured = measure(server, accelerator, workload, bodies[workload.bodies], settings)
            kept = ("req_s", "images_s", "p50_ms", "p99_ms", "errors", "pss_mb")
            result[workload.name] = {k: measured[k] for k in kept}
    return result


def failures(run: dict, accelerator: str, runtime: str) -> list[str]:
    problems = []
    if run["device"] != accelerator or run["model_info_devices"] != [accelerator]:
        problems.append(f"device: /info {run['device']}, model_info {run['model_info_devices']}")
    if run["runtime"]["runtime"] != runtime or run["model_info_runtimes"] != {"predict": runtime, "explain": "eager"}:
        problems.append(f"runtime: /info {run['runtime']}, model_info {run['model_info_runtimes']}")
    if run["answers"]["max_abs_diff"] > TOLERANCE:
        problems.append(f"predict differs from the CPU by {run['answers']['max_abs_diff']:.2g}")
    problems += [f"{m} differs from the CPU by {d:.2g}"
                 for m, d in run["explain_max_abs_diff"].items() if d > TOLERANCE]
    if run["mean_batch_images"] <= 1:
        problems.append("no batch of more than one image formed")
    problems += [f"{w}: {run[w]['errors']} errors" for w in ("single_c64", "batch32_c64") if run[w]["errors"]]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"cuda-{time.strftime('%Y%m%d')}.json")
    args = parser.parse_args()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    if not devices:
        print("no CUDA device: the CUDA half is skipped; running the CPU half (this script's own check)", flush=True)
    devices.append(torch.device("cpu"))
    loaded = store.load(ROOT / "model_store", store.DEFAULT_NAME)
    pngs, labels = mnist_pngs(args.images)
    gpu = torch.cuda.get_device_name(0) if devices[0].type == "cuda" else None
    report: dict = {"torch": torch.__version__, "gpu": gpu}
    problems = []
    for device in devices:
        with exported_store(device) as root:
            try:
                report[f"forward_{device.type}"] = runtime_ceilings(root, device)
            except static.Refused as e:
                problems.append(f"{device.type} forward: {e}")
            print(f"forward_{device.type}", json.dumps(report.get(f"forward_{device.type}")), flush=True)
            runs = {f"{device.type}_{runtime}": (runtime, ("--store", str(root), "--runtime", runtime))
                    for runtime in ("eager", "export")}
            if device.type == "cuda":
                runs["cuda_4_api_servers"] = ("eager", ("--store", str(root), "--api-servers", "4"))
            for name, (runtime, extra) in runs.items():
                with tempfile.TemporaryDirectory() as work:
                    report[name] = serve_and_measure(device.type, extra, loaded, pngs, labels, args.seconds, Path(work))
                problems += [f"{name}: {p}" for p in failures(report[name], device.type, runtime)]
                print(name, json.dumps(report[name]), flush=True)
    report["problems"] = problems
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("problems:", problems or "none", f"\nwrote {args.out}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
