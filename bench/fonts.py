"""Printed digits read and flagged per font family: where ``bench.evaluate``'s printed figures come from.

    python -m bench.fonts [--store model_store] [--version N] [--part heldout] [--per-family 60] [--style S] [--size PX]

``bench.evaluate`` draws its printed digits family by family (each family equally likely) from the
held-out font groups and reports one share; one odd family moves it by points. This draws the same
number of digits from every family of a partition (``service.model.printed.partition``): as
``bench.evaluate`` does (``dressed``: on a page, as a photograph 85% of the time), as clean scans of
the page (``clean``), or as clean pictures cropped to the digit's ink (``tight``). It frames them with
the service's preprocessing and reports each family's accuracy and share flagged ``not_a_digit``,
worst first.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from service.imaging import normalize
from service.model import dress, printed, store, synth

STYLES = ("dressed", "clean", "tight")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fonts", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--name", default=store.DEFAULT_NAME)
    p.add_argument("--version", type=int, default=None, help="default: the highest")
    p.add_argument("--part", choices=printed.PARTITIONS, default="heldout", help="which font groups")
    p.add_argument("--per-family", type=int, default=60, help="digits per family (0-9 in turn)")
    p.add_argument("--style", choices=STYLES, default="dressed",
                   help="dressed as bench.evaluate does, clean scans of the page, or clean and cropped to the ink")
    p.add_argument("--size", type=int, default=None,
                   help="render at this font size in pixels (default: 22-120 at random); small tight digits: 16-34")
    p.add_argument("--below", type=float, default=0.01, help="the not_a_digit threshold")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.per_family < 1:
        p.error("--per-family must be at least 1")
    if args.size is not None and args.size < 8:
        p.error("--size must be at least 8")
    return args


def frames(fonts: tuple[printed.Font, ...], count: int, style: str,
           rng: np.random.Generator, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` framed digits (float32 (N, 28, 28) in 0..1) from these fonts, and their labels; as in
    ``service.model.synth``'s sets, a picture whose digit the dressing lost is left out."""
    out, labels = [], []
    for i in range(count):
        label = i % 10
        ink = printed.render(printed.DIGITS[label], fonts[int(rng.integers(len(fonts)))], rng, size)
        if ink is None:
            continue
        if style == "tight":
            picture = dress.scan(ink)
        else:
            page = synth.on_page(ink, rng)
            picture = dress.scan(page) if style == "clean" else dress.dress(page, rng, plain=0.15)
        framed = dress.frame(picture)
        if framed is None or synth.lost(framed, ink):  # as bench.evaluate's sets leave them out
            continue
        out.append(framed)
        labels.append(label)
    return np.stack(out), np.array(labels)


@torch.inference_mode()
def measure(args: argparse.Namespace) -> tuple[list[tuple[str, int, float, float]], Counter[tuple[int, int]]]:
    """(family, digits, accuracy, share flagged) per family, worst read first; and the confusions (true, read)."""
    torch.set_num_threads(1)
    loaded = store.load(args.store, args.name, args.version)
    if loaded.calibration is None:
        raise SystemExit(f"version {loaded.version} has no calibration: nothing is flagged")
    norm = loaded.metadata.normalization
    rng = np.random.default_rng(args.seed)
    fonts = printed.fonts_in(args.part)
    rows, confusions = [], Counter[tuple[int, int]]()
    for family in sorted({f.family for f in fonts}):
        x, y = frames(tuple(f for f in fonts if f.family == family), args.per_family, args.style, rng, args.size)
        hidden, logits = loaded.model.features(torch.from_numpy(normalize(x, norm.mean, norm.std)).reshape(len(x), -1))
        read = logits.argmax(1).numpy()
        flagged = (loaded.calibration.typicality(hidden, logits) < args.below).numpy()
        rows.append((family, len(y), float((read == y).mean()), float(flagged.mean())))
        confusions.update((int(t), int(r)) for t, r in zip(y, read) if t != r)
    return sorted(rows, key=lambda row: (row[2], -row[3])), confusions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, confusions = measure(args)
    digits = sum(n for _, n, _, _ in rows)
    print(f"{args.part} font families, {args.style} pictures, "
          f"not_a_digit below {args.below}\n\n| family | digits | read | flagged |\n| --- | --- | --- | --- |")
    for family, n, read, flagged in rows:
        print(f"| {family} | {n} | {read:.1%} | {flagged:.1%} |")
    read_all = sum(n * r for _, n, r, _ in rows) / digits
    flagged_all = sum(n * f for _, n, _, f in rows) / digits
    print(f"| **all {len(rows)}** | {digits} | {read_all:.2%} | {flagged_all:.2%} |")
    print("\nmost common confusions (true -> read): "
          + ", ".join(f"{t}->{r} {c}" for (t, r), c in confusions.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
