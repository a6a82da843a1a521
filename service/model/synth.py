"""The synthetic picture sets, framed by the service's preprocessing, made once per seed and cached.

``build(kind, count, seed)`` gives uint8 (N, 28, 28) frames (white ink on black, as MNIST) and labels
(the digit, or -1 for a non-digit). Sets are made in seeded chunks on worker processes, so a set is
the same on any number of cores, and cached under ``~/.cache/digitserve/synth`` keyed by what made it
(the arguments, ``RECIPE``, and the MNIST digits given or the fonts and photographs drawn from); nothing
is committed.

Kinds: ``printed`` (digits from the training font groups), ``segments`` (seven-segment digits,
drawn by ``segments``), ``dressed`` (MNIST digits given as ``source``, pictured), ``canvas`` (the same on clean
paper, as a scan), and the non-digit kinds of ``negatives.KINDS``; with the suffix ``-heldout``
(``printed-heldout``, ``letters-heldout``, ...) drawn from the held-out font groups and photographs, for
evaluation only; ``printed-calibration``: digits from the calibration font groups, for the typicality
reference only (``printed.partition``). A digit that dressing lost (its frame unlike that of its clean
picture) is left out, as is a non-digit a person would read as a 1.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.model import dress, negatives, printed, segments

CACHE = Path(os.environ.get("DIGITSERVE_CACHE", Path.home() / ".cache" / "digitserve")) / "synth"
CHUNK = 256
RECIPE = 13  # raise with any change to how pictures are drawn, dressed or framed: the cache is keyed by it
HELD_OUT = "-heldout"  # a kind's suffix: drawn from the held-out fonts and photographs (evaluation only)
CALIBRATION = "-calibration"  # printed digits from the calibration font groups (the typicality reference only)
_SUFFIXES: dict[str, printed.Partition] = {HELD_OUT: "heldout", CALIBRATION: "calibration"}


def split_kind(kind: str) -> tuple[str, printed.Partition]:
    """A kind's base and the partition it is drawn from: ``printed-calibration`` -> ("printed", "calibration")."""
    for suffix, part in _SUFFIXES.items():
        if kind.endswith(suffix):
            base = kind.removesuffix(suffix)
            if part == "calibration" and base != "printed":
                raise ValueError(f"the calibration fonts make printed digits only, not {kind!r}")
            return base, part
    return kind, "train"


@cache
def _sources(part: printed.Partition) -> negatives.Sources:
    return negatives.Sources.of(part)


def _by_family(fonts: tuple[printed.Font, ...], rng: np.random.Generator) -> printed.Font:
    """A random font, each family equally likely (a family with twenty styles is not twenty times as common)."""
    families = sorted({f.family for f in fonts})
    family = families[int(rng.integers(len(families)))]
    styles = [f for f in fonts if f.family == family]
    return styles[int(rng.integers(len(styles)))]


Source = tuple[np.ndarray, np.ndarray]  # MNIST images (N, 28, 28) uint8 and their labels


def _digit_ink(kind: str, index: int, rng: np.random.Generator, source: Source | None) -> tuple[np.ndarray, int]:
    if kind in ("dressed", "canvas"):
        assert source is not None
        digit = Image.fromarray(source[0][index])
        side = int(rng.integers(28, 200))
        scaled = np.asarray(digit.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        return np.clip(scaled, 0, 1), int(source[1][index])
    if kind == "segments":
        label = int(rng.integers(10))
        return segments.draw(label, rng), label
    part = split_kind(kind)[1]
    fonts = _sources(part).fonts
    if not fonts:
        raise RuntimeError(f"no font of the {part} groups on this machine (make system-deps; service/model/printed.py)")
    label = int(rng.integers(10))
    ink = None
    while ink is None:  # a font that lacks the digit renders nothing: another family
        ink = printed.render(printed.DIGITS[label], _by_family(fonts, rng), rng)
    return ink, label


def _chunk(kind: str, seed: int, chunk: int, count: int, source: Source | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, chunk, zlib.crc32(kind.encode())])
    frames, labels = [], []
    base, part = split_kind(kind)
    sources = _sources(part)
    maker = negatives.MAKERS.get(base)
    for i in range(count):
        if maker is not None:
            ink, label = maker(sources, rng), -1
            if ink is None:
                continue
        else:
            ink, label = _digit_ink(kind, chunk * CHUNK + i, rng, source)
        if not kind.startswith(("photos", "faces")) or rng.random() < 0.3:
            ink = on_page(ink, rng)
        framed = dress.frame(dress.dress(ink, rng, plain=1.0 if kind == "canvas" else 0.15))
        if framed is None or (label < 0 and _narrow(framed)) or (label >= 0 and lost(framed, ink)):
            continue
        frames.append(np.round(framed * 255).astype(np.uint8))
        labels.append(label)
    if not frames:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
    return np.stack(frames), np.array(labels, dtype=np.int64)


def on_page(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink placed on a page as pictures come: mostly with a margin, now and then cropped close."""
    return dress.canvas(ink, rng, margin=(0.02, 0.3) if rng.random() < 0.3 else (0.15, 1.2))


def lost(framed: np.ndarray, ink: np.ndarray) -> bool:
    """Whether dressing lost the digit: its frame is unlike the frame of the same ink on clean paper (the
    framing took a shadow's edge or a stain for it). Such a picture is no digit to learn from."""
    clean = dress.frame(dress.scan(ink))
    if clean is None:
        return True
    return float(np.corrcoef(framed.ravel(), clean.ravel())[0, 1]) < 0.5


def _narrow(frame: np.ndarray) -> bool:
    """A frame whose ink is a narrow upright bar: a person would read it as a 1, so it is no negative."""
    columns = np.flatnonzero(frame.max(0) > 0.3)
    return not len(columns) or columns[-1] - columns[0] < 8


def _key(kind: str, count: int, seed: int, source: Source | None) -> str:
    """The cache key: the arguments, ``RECIPE``, and what the pictures are drawn from: the MNIST digits given,
    or the kind's fonts, photographs and faces, so that a set is made anew when its partition changes (a
    group moved between training and calibration) or other fonts are installed."""
    digest = hashlib.sha256(f"{kind}|{count}|{seed}|{CHUNK}|{RECIPE}".encode())
    if source is not None:
        digest.update(source[0].tobytes())
        digest.update(source[1].tobytes())
    else:
        sources = _sources(split_kind(kind)[1])
        for font in sources.fonts:
            digest.update(font.path.encode())
        digest.update(f"{sources.photos}|{sources.faces}".encode())
    return digest.hexdigest()[:16]


def build(kind: str, count: int, seed: int, source: Source | None = None,
          workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``count`` framed pictures of ``kind`` (those the preprocessing finds blank are left out):
    uint8 (N, 28, 28) and int64 labels. ``dressed`` pictures the first ``count`` of ``source``'s digits."""
    if count <= 0:  # none asked for: nothing to render, so no font or photograph is needed either
        return torch.empty((0, 28, 28), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    path = CACHE / f"{kind}-{_key(kind, count, seed, source)}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["frames"], cached["labels"]
    chunks = [(kind, seed, c, min(CHUNK, count - c * CHUNK), source) for c in range(-(-count // CHUNK))]
    workers = workers or min(len(chunks), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, *zip(*chunks)))
    else:
        parts = [_chunk(*args) for args in chunks]
    frames = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"frames": frames, "labels": labels}, tmp)
    os.replace(tmp, path)  # not os.rename: the training tests kill the process at its first os.rename
    return frames, labels
