"""The font partitions (``service.model.printed``): training's, the reference's (calibration) and evaluation's
(held out) groups never overlap, the excluded fonts are in none, each synthesized kind draws from its own
partition, the typicality reference's printed digits from the calibration groups only, and a cached picture
set is not reused once its fonts change. Most tests stand fonts in from DejaVu (which the unit tier has), so
they hold on any machine; one checks the fonts this machine has."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from service.model import dress, printed, reference, synth
from tests.crops import FONT_DIR

DEJAVU = str(FONT_DIR / "DejaVuSans.ttf")
# one family of each partition (Cabin: calibration, Lato: training, Hack: held out), all drawn with DejaVu
STAND_INS = (printed.Font("Cabin", "Regular", DEJAVU), printed.Font("Lato", "Regular", DEJAVU),
             printed.Font("Hack", "Regular", DEJAVU))
FAMILY_OF = {"calibration": "Cabin", "train": "Lato", "heldout": "Hack"}


@pytest.fixture
def fresh():
    """Nothing cached from other tests' fonts, before or after."""
    printed.fonts.cache_clear()
    synth._sources.cache_clear()
    yield
    printed.fonts.cache_clear()
    synth._sources.cache_clear()


@pytest.fixture
def drawn(fresh, monkeypatch, tmp_path) -> list[str]:
    """The stand-in fonts instead of this machine's, a cache of its own; the families ``render`` drew with."""
    families: list[str] = []
    render = printed.render

    def recording(text, font, rng, size=None):
        families.append(font.family)
        return render(text, font, rng, size)

    monkeypatch.setattr(printed, "fonts", lambda: STAND_INS)
    monkeypatch.setattr(printed, "render", recording)
    monkeypatch.setattr(synth, "CACHE", tmp_path)
    return families


def test_the_named_groups_are_apart_and_none_is_excluded():
    assert not printed.CALIBRATION_GROUPS & printed.HELD_OUT_GROUPS
    for name in printed.CALIBRATION_GROUPS | printed.HELD_OUT_GROUPS:
        assert not printed.EXCLUDED.search(name), name
    assert {part: printed.partition(family) for part, family in FAMILY_OF.items()} == {p: p for p in FAMILY_OF}
    assert printed.partition("Go Mono") == printed.partition("Go") == "calibration", "a group goes whole"
    assert printed.partition("Cousine") == printed.partition("Liberation Mono") == "train", "one design, one group"


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="no fontconfig on this machine")
def test_the_partitions_split_every_font_of_this_machine(fresh):
    found = set(printed.fonts())
    parts = {part: set(printed.fonts_in(part)) for part in printed.PARTITIONS}
    assert set().union(*parts.values()) == found, "every usable font is in a partition"
    assert sum(len(fonts) for fonts in parts.values()) == len(found), "and in one only"
    for part, fonts in parts.items():
        assert all(printed.partition(f.family) == part for f in fonts), part
        assert not [f for f in fonts if printed.EXCLUDED.search(f"{f.family} {f.path}")], part
    summary = printed.summary()
    assert sum(int(str(s["fonts"])) for s in summary.values()) == len(found)
    assert set(summary["calibration"]["groups"]) <= printed.CALIBRATION_GROUPS  # type: ignore[arg-type]


def test_excluded_fonts_are_never_found(fresh, monkeypatch, tmp_path):
    """fc-list lists GNU FreeFont, URW base35 and TeX Gyre faces (here DejaVu under their names): none is used."""
    excluded = {"FreeSans": "freefont/FreeSans.ttf", "Nimbus Roman": "urw-base35/NimbusRoman-Regular.otf",
                "TeX Gyre Heros": "texgyre/texgyreheros-regular.otf", "P052": "urw-base35/P052-Roman.otf",
                "Sans": "urw-base35/URWGothic-Book.otf", "Standard Symbols PS": "urw/StandardSymbolsPS.otf"}
    lines = [f"DejaVu Sans\tBook\t{DEJAVU}"]
    for family, name in excluded.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(DEJAVU)
        lines.append(f"{family}\tRegular\t{tmp_path / name}")
    listing = subprocess.CompletedProcess([], 0, stdout="\n".join(lines) + "\n", stderr="")
    monkeypatch.setattr(printed.subprocess, "run", lambda *args, **kwargs: listing)
    assert [f.family for f in printed.fonts()] == ["DejaVu Sans"]
    assert [f.family for part in printed.PARTITIONS for f in printed.fonts_in(part)] == ["DejaVu Sans"]


@pytest.mark.parametrize("kind", ["printed", "printed-calibration", "printed-heldout"])
def test_each_printed_kind_draws_from_its_own_partition(drawn, kind):
    frames, _ = synth.build(kind, 12, seed=3, workers=1)
    assert len(frames) > 0 and set(drawn) == {FAMILY_OF[synth.split_kind(kind)[1]]}


def test_the_references_printed_digits_are_in_the_calibration_groups_only(drawn):
    digits, labels = torch.full((16, 28, 28), 200, dtype=torch.uint8), torch.arange(16) % 10
    mix = reference.build(digits, labels, seed=1, kinds=("mnist", "printed"), workers=1)
    assert drawn and set(drawn) == {"Cabin"}, "never a font the model was trained on (Lato) or evaluated on (Hack)"
    assert mix.composition["printed_groups"] == sorted(printed.CALIBRATION_GROUPS)


def test_only_printed_digits_come_from_the_calibration_groups():
    assert synth.split_kind("printed-calibration") == ("printed", "calibration")
    assert synth.split_kind("letters-heldout") == ("letters", "heldout")
    assert synth.split_kind("shapes") == ("shapes", "train")
    with pytest.raises(ValueError, match="printed digits only"):
        synth.split_kind("letters-calibration")


def test_a_cached_set_is_made_anew_when_its_fonts_change(drawn, monkeypatch):
    kinds = ("printed", "printed-calibration", "printed-heldout", "letters")
    before = {kind: synth._key(kind, 100, 1, None) for kind in kinds}
    assert len(set(before.values())) == len(kinds)
    monkeypatch.setattr(printed, "CALIBRATION_GROUPS", printed.CALIBRATION_GROUPS | {"lato"})
    synth._sources.cache_clear()
    after = {kind: synth._key(kind, 100, 1, None) for kind in kinds}
    assert after["printed-heldout"] == before["printed-heldout"], "its fonts did not change"
    assert all(after[kind] != before[kind] for kind in ("printed", "printed-calibration", "letters")), "theirs did"


def test_pictured_mnist_digits_are_keyed_by_their_digits_not_the_fonts(fresh, monkeypatch):
    def no_fonts():
        raise RuntimeError("fc-list not found")

    monkeypatch.setattr(printed, "fonts", no_fonts)
    source = (torch.zeros(4, 28, 28, dtype=torch.uint8).numpy(), torch.arange(4).numpy())
    assert synth._key("dressed", 4, 1, source) != synth._key("dressed", 4, 1, (source[0] + 1, source[1]))


def test_bench_fonts_reports_each_family_of_a_partition(fresh, monkeypatch):
    """``python -m bench.fonts``: every family of the partition, each with its own digits, read by the model."""
    from bench import fonts as bench_fonts

    mono = str(FONT_DIR / "DejaVuSansMono.ttf")
    stand_ins = (*STAND_INS, printed.Font("Inconsolata", "Regular", mono), printed.Font("Lato", "Bold", mono))
    monkeypatch.setattr(printed, "fonts", lambda: stand_ins)
    rows, confusions = bench_fonts.measure(bench_fonts.parse_args(["--per-family", "20", "--style", "clean"]))
    assert sorted(family for family, *_ in rows) == ["Hack", "Inconsolata"]
    for family, digits, read, flagged in rows:
        assert 15 <= digits <= 20 and read >= 0.8 and 0 <= flagged <= 1, (family, digits, read, flagged)
    assert sum(confusions.values()) == round(sum(n * (1 - r) for _, n, r, _ in rows))


def test_a_picture_framed_blank_is_no_digit_to_learn():
    ink = printed.render("7", STAND_INS[1], np.random.default_rng(0))
    assert ink is not None
    assert dress.frame(dress.scan(np.zeros_like(ink))) is None, "answered no_digit: no frame to learn from"
    assert not synth.lost(dress.frame(dress.scan(ink)), ink), "the clean scan's own frame is the digit"
