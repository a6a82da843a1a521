"""Replay captured frames with a stored version: would it answer what was served? (docs/capture.md)

    python -m service.replay DIR --store model_store --version 4 [--labels labels.csv] [--json]

Reads every complete capture file in DIR (``--capture-dir``, ``service.capture``), oldest first,
recomputes each frame with version N of the store exactly as a worker does (verified load, on the CPU,
eager; the version's own normalisation and calibration; ``not_a_digit`` below ``--not-a-digit-below``),
and reports how often its label agrees with the label served: overall, by served label, by served flag,
by served version, and the mean |confidence difference|.

``--labels FILE``: the true digit of some records, a CSV file with a header naming ``file,row,label``
(other columns are ignored): ``file`` is a capture file's name, ``row`` the record's 0-based index in
it, ``label`` 0..9. The report then adds the accuracy of the served answers and of version N on them.
A record is named by its file and row because both are fixed once a file is written, whatever files
are deleted by the cap or added later (request ids may repeat: a client may send its own).

Exit code 2, with one line, for a DIR that is missing or holds no capture file, a version that cannot
be loaded, or a labels file that cannot be read.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service import capture
from service.imaging import normalize
from service.model import store
from service.model.calibration import calibrated

NOT_A_DIGIT = "not_a_digit"  # the flag the service gives below --not-a-digit-below (service.worker.stages)


class ReplayError(Exception):
    """What stops a replay: one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.replay", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("directory", type=Path, metavar="DIR", help="a --capture-dir folder")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--model", default=store.DEFAULT_NAME, help="model name in the store")
    p.add_argument("--version", type=int, required=True, help="the version that recomputes the frames")
    p.add_argument("--labels", type=Path, default=None, metavar="FILE",
                   help="CSV of file,row,label: the true digit of captured records (accuracy)")
    p.add_argument("--not-a-digit-below", type=float, default=0.01, metavar="0..1",
                   help="flag not_a_digit below this typicality, as the service's setting (default: 0.01)")
    p.add_argument("--batch-size", type=int, default=1024, metavar="N", help="frames per forward (default: 1024)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if not 0 <= args.not_a_digit_below <= 1:
        p.error("--not-a-digit-below must be within 0..1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


@dataclass
class Outcomes:
    """One entry per replayed record, in replay order."""

    served_label: list[np.ndarray] = field(default_factory=list)
    replayed_label: list[np.ndarray] = field(default_factory=list)
    served_confidence: list[np.ndarray] = field(default_factory=list)
    replayed_confidence: list[np.ndarray] = field(default_factory=list)
    replayed_flagged: list[np.ndarray] = field(default_factory=list)
    served_flags: list[np.ndarray] = field(default_factory=list)
    served_version: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)  # -1 where no label is known

    def joined(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in vars(self).items()}


def read_capture(path: Path) -> dict[str, np.ndarray]:
    """A capture file's arrays, checked: every field, one row per record, frames uint8 (n, 28, 28)."""
    with np.load(path, allow_pickle=False) as f:
        missing = [name for name in capture.FIELDS if name not in f.files]
        if missing:
            raise ValueError(f"not a capture file: no {', '.join(missing)}")
        arrays = {name: f[name] for name in capture.FIELDS}
    n = len(arrays["label"])
    if arrays["frames"].dtype != np.uint8 or arrays["frames"].shape != (n, 28, 28):
        raise ValueError(f"frames are {arrays['frames'].dtype} {arrays['frames'].shape}, not uint8 ({n}, 28, 28)")
    uneven = [name for name, a in arrays.items() if len(a) != n]
    if uneven:
        raise ValueError(f"{', '.join(uneven)}: not one row per record ({n})")
    return arrays


def record_count(path: Path) -> int:
    with np.load(path, allow_pickle=False) as f:
        return len(f["label"])


_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def read_labels(path: Path, sizes: dict[str, int]) -> tuple[dict[tuple[str, int], int], int]:
    """The labels file's (file, row) -> label for the records in ``sizes`` (file name -> records), and how many
    of its lines name a file that is not there (deleted by the cap since it was labelled)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not {"file", "row", "label"} <= set(columns):
                raise ReplayError(f"labels file {path}: its first line must name the columns file,row,label "
                                  f"(found {','.join(columns) or 'nothing'})")
            reader.fieldnames = columns
            labels: dict[tuple[str, int], int] = {}
            absent = 0
            for entry in reader:
                line = reader.line_num
                try:
                    name, row, label = Path(entry["file"].strip()).name, int(entry["row"]), int(entry["label"])
                except (AttributeError, TypeError, ValueError):
                    raise ReplayError(f"labels file {path}, line {line}: expected file,row,label with row and "
                                      f"label integers, found {entry}") from None
                if not 0 <= label <= 9:
                    raise ReplayError(f"labels file {path}, line {line}: label {label} is not a digit 0..9")
                if (name, row) in labels:
                    raise ReplayError(f"labels file {path}, line {line}: {name} row {row} is labelled twice")
                if name not in sizes:
                    absent += 1
                elif not 0 <= row < sizes[name]:
                    raise ReplayError(f"labels file {path}, line {line}: {name} has rows 0..{sizes[name] - 1}, "
                                      f"not {row}")
                labels[name, row] = label
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReplayError(f"labels file {path} cannot be read: {e}") from None
    if not labels:
        raise ReplayError(f"labels file {path} holds no labels (a header file,row,label, then a line per record)")
    if absent == len(labels):
        raise ReplayError(f"labels file {path} names none of the capture files in the folder: is it this folder's?")
    return labels, absent


@torch.inference_mode()
def answer(loaded: store.LoadedModel, frames: np.ndarray, below: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What version ``loaded`` answers for uint8 frames, as a worker computes it: labels, confidences, and
    whether each is flagged not_a_digit."""
    norm = loaded.metadata.normalization
    x = torch.from_numpy(normalize(frames.astype(np.float32) / 255, norm.mean, norm.std).reshape(len(frames), -1))
    probabilities, typicality = calibrated(loaded.calibration, *loaded.model.features(x))
    confidence, label = probabilities.max(1)
    flagged = np.zeros(len(frames), bool) if typicality is None else (typicality < below).numpy()
    return label.numpy().astype(np.int64), confidence.numpy(), flagged


def replay(args: argparse.Namespace) -> dict[str, Any]:
    directory: Path = args.directory
    if not directory.is_dir():
        raise ReplayError(f"{directory} is not a folder: pass the --capture-dir folder")
    paths = capture.files(directory)
    if not paths:
        raise ReplayError(f"{directory} holds no capture file ({capture.PATTERN}): is it a --capture-dir folder?")
    skipped: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path in paths:
        try:
            sizes[path.name] = record_count(path)
        except _UNREADABLE as e:  # deleted by the cap since it was listed, or not a capture file
            skipped[path.name] = f"{type(e).__name__}: {e}"
    if not sizes:
        raise ReplayError(f"{directory} holds no readable capture file ({len(paths)} unreadable, e.g. "
                          f"{next(iter(skipped.items()))})")
    try:
        loaded = store.load(args.store, args.model, args.version, "cpu")
    except store.StoreError as e:
        raise ReplayError(str(e)) from None
    labels, absent = read_labels(args.labels, sizes) if args.labels is not None else ({}, 0)

    torch.set_num_threads(1)
    out = Outcomes()
    bar = tqdm(total=sum(sizes.values()), desc=f"replay with v{loaded.version}", unit="frame", file=sys.stderr,
               disable=args.no_progress)
    for name in sizes:
        try:
            arrays = read_capture(directory / name)
        except _UNREADABLE as e:
            skipped[name] = f"{type(e).__name__}: {e}"
            bar.update(sizes[name])
            continue
        for start in range(0, len(arrays["label"]), args.batch_size):
            frames = arrays["frames"][start:start + args.batch_size]
            label, confidence, flagged = answer(loaded, frames, args.not_a_digit_below)
            out.replayed_label.append(label)
            out.replayed_confidence.append(confidence)
            out.replayed_flagged.append(flagged)
            bar.update(len(frames))
        n = len(arrays["label"])
        out.served_label.append(arrays["label"].astype(np.int64))
        out.served_confidence.append(arrays["confidence"].astype(np.float32))
        out.served_flags.append(arrays["flags"])
        out.served_version.append(arrays["version"].astype(np.int64))
        out.truth.append(np.array([labels.get((name, row), -1) for row in range(n)], dtype=np.int64))
    bar.close()
    replayed = [name for name in sizes if name not in skipped]
    if not replayed:
        raise ReplayError(f"{directory}: no capture file could be read ({len(skipped)} unreadable)")
    report = summarize(out.joined(), labels)
    report.update(directory=str(directory), files=len(replayed), skipped=skipped,
                  replayed_with={"model": loaded.name, "version": loaded.version,
                                 "calibrated": loaded.calibration is not None,
                                 "not_a_digit_below": args.not_a_digit_below})
    if args.labels is not None:
        report["labels"].update(file=str(args.labels), naming_absent_files=absent)
    return report


def summarize(o: dict[str, np.ndarray], labels: dict[tuple[str, int], int]) -> dict[str, Any]:
    agree = o["served_label"] == o["replayed_label"]
    records = len(agree)

    def grouped(keys: list[list[str]] | np.ndarray, order: list[str] | None = None) -> dict[str, dict[str, Any]]:
        members: dict[str, list[int]] = collections.defaultdict(list)
        for index, key in enumerate(keys):
            for k in (key if isinstance(key, list) else [key]):
                members[str(k)].append(index)
        names = order if order is not None else sorted(members, key=lambda k: (k != "none", k))
        return {k: {"records": len(members[k]),
                    "agreement": float(agree[members[k]].mean()) if members[k] else None} for k in names}

    flags = [f.split(",") if f else ["none"] for f in o["served_flags"].tolist()]
    report: dict[str, Any] = {
        "records": records,
        "agreeing": int(agree.sum()),
        "agreement": float(agree.mean()),
        "mean_abs_confidence_difference": float(np.abs(o["served_confidence"] - o["replayed_confidence"]).mean()),
        "not_a_digit": {"served": sum(NOT_A_DIGIT in f for f in flags), "replayed": int(o["replayed_flagged"].sum())},
        "by_served_label": grouped(o["served_label"], [str(d) for d in range(10)]),
        "by_served_flag": grouped(flags),
        "by_served_version": grouped(o["served_version"], sorted({str(v) for v in o["served_version"].tolist()},
                                                                 key=int)),
    }
    if labels:
        known = o["truth"] >= 0
        report["labels"] = {
            "labelled": int(known.sum()),
            "served_accuracy": float((o["served_label"][known] == o["truth"][known]).mean()) if known.any() else None,
            "replayed_accuracy": float((o["replayed_label"][known] == o["truth"][known]).mean()) if known.any()
            else None,
        }
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def text(report: dict[str, Any]) -> str:
    used = report["replayed_with"]
    lines = [
        f"replayed {report['records']:,} records from {report['files']} capture file{'s' * (report['files'] != 1)} in "
        f"{report['directory']} with "
        f"{used['model']} v{used['version']} ({'calibrated' if used['calibrated'] else 'no calibration'}; "
        f"not_a_digit below {used['not_a_digit_below']})",
        f"label agreement with what was served: {_percent(report['agreement'])} "
        f"({report['agreeing']:,} of {report['records']:,})",
        f"mean |confidence difference|: {report['mean_abs_confidence_difference']:.4f}",
        f"not_a_digit: {report['not_a_digit']['served']:,} served, {report['not_a_digit']['replayed']:,} replayed",
    ]
    for title, key in (("served label", "by_served_label"), ("served flag", "by_served_flag"),
                       ("served version", "by_served_version")):
        lines += ["", f"{'by ' + title:<20} {'records':>9} {'agreement':>10}"]
        lines += [f"  {k:<18} {v['records']:>9,} {_percent(v['agreement']):>10}" for k, v in report[key].items()]
    if "labels" in report:
        given = report["labels"]
        lines += ["", f"with labels ({given['file']}): {given['labelled']:,} labelled records"
                      + (f" ({given['naming_absent_files']:,} labels name files no longer there)"
                         if given["naming_absent_files"] else ""),
                  f"  accuracy: served {_percent(given['served_accuracy'])}, "
                  f"v{used['version']} {_percent(given['replayed_accuracy'])}"]
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = replay(args)
    except ReplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
