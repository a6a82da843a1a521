"""``python -m service.export``: write an existing version's static graph (``service.model.static``).

    python -m service.export --store model_store [--version N] [--name mnist-fnn] [--data-dir D] [--device cpu]

The parity digits are the first real MNIST test digits, read from ``--data-dir`` (default
``DIGITSERVE_DATA_DIR``, else ../shared/datasets). Exits 2, with one line, when the version or the data is not there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from service.model import data, static, store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.export", description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--name", default=store.DEFAULT_NAME, help="model name in the store")
    p.add_argument("--version", type=int, default=None, help="the version to export (default: the highest)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DIGITSERVE_DATA_DIR") or "../shared/datasets"),
                   help="torchvision MNIST root (the parity digits)")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    p.add_argument("--device", default="cpu", help="the device the workers that serve it run on (cpu, cuda)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="store the exported program uncompiled (what happens anyway without a C++ compiler)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        version = args.version or int(store.resolve_version(args.store, args.name).name)
        images, _ = data.load_mnist(args.data_dir, train=False, download=args.download)
        started = time.monotonic()
        record = static.export(args.store, args.name, version, images, args.device, args.compile)
    except (data.DataError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"v{version}: {record.kind} static graph for {record.device} in {time.monotonic() - started:.1f} s, "
          f"{record.artifact.file} sha256 {record.artifact.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
