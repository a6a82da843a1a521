"""A small digitserve client: send one picture to /predict twice, as multipart and as JSON base64.

    .venv/bin/python examples/client.py examples/seven.png [--url http://127.0.0.1:8000] [--api-key KEY]

Needs httpx, which `make serve` and `make test` install into .venv (a test dependency of the project).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import httpx


def predict_multipart(client: httpx.Client, picture: Path) -> dict:
    """The way `curl -F file=@picture` sends it: one `file` part per image."""
    files = {"file": (picture.name, picture.read_bytes(), "application/octet-stream")}
    return answer(client.post("/predict", files=files))


def predict_json(client: httpx.Client, picture: Path) -> dict:
    """`{"instances": [{"image_b64": ...}]}`: one request may hold many images."""
    b64 = base64.b64encode(picture.read_bytes()).decode("ascii")
    return answer(client.post("/predict", json={"instances": [{"image_b64": b64}]}))


def answer(response: httpx.Response) -> dict:
    """The JSON answer, or the service's own error message (`{"detail": ...}`) and the status."""
    if response.status_code != 200:
        sys.exit(f"HTTP {response.status_code}: {response.json().get('detail', response.text)}")
    return response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description="classify a digit picture with a running digitserve")
    parser.add_argument("picture", type=Path, help="a PNG, JPEG, ... of one digit, any size or colours")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where digitserve listens")
    parser.add_argument("--api-key", default=os.environ.get("DIGITSERVE_API_KEY"),
                        help="only if the server requires one (default: $DIGITSERVE_API_KEY)")
    args = parser.parse_args()
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        for how, send in (("multipart", predict_multipart), ("json", predict_json)):
            result = send(client, args.picture)
            model, first = result["model"], result["predictions"][0]
            print(f"{how:9}  label {first['label']}  confidence {first['confidence']:.6f}  "
                  f"({model['name']} v{model['version']})")


if __name__ == "__main__":
    main()
