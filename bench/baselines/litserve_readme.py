"""The baseline: the committed model served the way LitServe's README serves a model.

A plain ``ls.LitAPI`` on ``ls.LitServer(api, accelerator="cpu")`` with every default: no
batching, one worker, one HTTP process. Requests use digitserve's JSON shape and its exact
preprocessing, so the benchmark compares serving, not models or image pipelines.

    python -m bench.baselines.litserve_readme --port 8001
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import litserve as ls
import torch

from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from service.model import store

STORE = Path(__file__).resolve().parents[2] / "model_store"


class ReadmeAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        loaded = store.load(STORE, store.DEFAULT_NAME, device=device)
        self.model = loaded.model
        self.mean, self.std = loaded.metadata.normalization.mean, loaded.metadata.normalization.std
        self.limits = Limits()

    def decode_request(self, request: dict) -> torch.Tensor:
        """``{"instances": [{"image_b64": ...}, ...]}`` -> (N, 784) normalised images."""
        images = to_mnist([decode_image(base64.b64decode(i["image_b64"]), self.limits) for i in request["instances"]])
        return torch.from_numpy(normalize(images, self.mean, self.std)).reshape(len(images), -1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x).softmax(1)

    def encode_response(self, probs: torch.Tensor) -> dict:
        confidence, label = probs.max(1)
        return {"predictions": [{"label": int(lab), "confidence": float(c), "probabilities": p}
                                for lab, c, p in zip(label, confidence, probs.tolist())]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    server = ls.LitServer(ReadmeAPI(), accelerator="cpu")
    server.run(port=parser.parse_args().port, generate_client_file=False)
