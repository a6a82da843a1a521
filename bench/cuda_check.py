"""The CUDA path end to end, for a machine with a GPU (CI has none, so this is not a test):

1. the model's forward on the GPU (images/s at batch 1, 64 and 1024: the ceilings);
2. the real server with ``--accelerator cuda``: /info and the model_info metric say cuda, answers to
   single-image requests sent concurrently equal the in-process CPU model's, the workers formed
   batches, and /explain (every method) equals the CPU explainer;
3. wrk at 64 connections (single images, 32-image requests) against that server and against the same
   server on the CPU, on the same machine, so the two figures compare.

    python -m bench.cuda_check [--seconds 8] [--images 512] [--out FILE]   # exit 1 if a check fails
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.data import mnist_pngs, write_bodies
from bench.load import LoadSettings, Workload, measure
from harness.server import ROOT, b64, metric_samples, running
from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from service.model import store
from service.worker.explain import Explainer

METHODS = ("saliency", "gradient_x_input", "integrated_gradients")
TOLERANCE = 1e-4  # float32 on two devices: different kernels, same maths


def forward_ceilings(model: torch.nn.Module, device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """Images/s of the bare forward on ``device``; synchronised, so queued kernels are counted."""
    ceilings = {}
    for batch in (1, 64, 1024):
        x = torch.randn(batch, 784, device=device)
        with torch.inference_mode():
            model(x)
            torch.cuda.synchronize(device)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                model(x)
                count += batch
            torch.cuda.synchronize(device)
        ceilings[f"b{batch}_images_s"] = count / (time.perf_counter() - started)
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
    x, want = reference(loaded, pngs)
    bodies = write_bodies(work, pngs)
    settings = LoadSettings(warmup_s=2, duration_s=seconds, wrk_threads=4, wrk_timeout_s=10)
    workloads = [Workload("single_c64", "/predict", "single", 64), Workload("batch32_c64", "/predict", "batch", 64, 32)]
    with running(work, "--accelerator", accelerator, *args) as server, server.client() as client:
        result = {"args": list(args), "device": client.get("/info").json()["serving"]["device"]}
        result["answers"] = check_answers(client, pngs, want, labels)
        result["explain_max_abs_diff"] = check_explain(client, loaded, pngs[:16], x[:16])
        text = client.get("/metrics").text
        predict_v1 = (("endpoint", "predict"), ("version", "1"))
        batch_sum = metric_samples(text, "digitserve_batch_size_sum")[predict_v1]
        batch_count = metric_samples(text, "digitserve_batch_size_count")[predict_v1]
        result["mean_batch_images"] = batch_sum / batch_count
        result["model_info_devices"] = sorted(dict(k)["device"] for k in metric_samples(text, "digitserve_model_info"))
        for workload in workloads:
            measured = measure(server, accelerator, workload, bodies[workload.bodies], settings)
            kept = ("req_s", "images_s", "p50_ms", "p99_ms", "errors", "pss_mb")
            result[workload.name] = {k: measured[k] for k in kept}
    return result


def failures(run: dict, accelerator: str) -> list[str]:
    problems = []
    if run["device"] != accelerator or run["model_info_devices"] != [accelerator]:
        problems.append(f"device: /info {run['device']}, model_info {run['model_info_devices']}")
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
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    cuda = torch.device("cuda")
    loaded = store.load(ROOT / "model_store", store.DEFAULT_NAME)
    pngs, labels = mnist_pngs(args.images)
    report = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(cuda),
        "forward_cuda": forward_ceilings(store.load(ROOT / "model_store", store.DEFAULT_NAME, device=cuda).model, cuda),
    }
    runs = {"cuda": ("cuda", ()), "cuda_4_api_servers": ("cuda", ("--api-servers", "4")), "cpu": ("cpu", ())}
    problems = []
    for name, (accelerator, extra) in runs.items():
        with tempfile.TemporaryDirectory() as work:
            report[name] = serve_and_measure(accelerator, extra, loaded, pngs, labels, args.seconds, Path(work))
        problems += [f"{name}: {p}" for p in failures(report[name], accelerator)]
        print(name, json.dumps(report[name]), flush=True)
    report["problems"] = problems
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["forward_cuda"]), "\nproblems:", problems or "none", f"\nwrote {args.out}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
