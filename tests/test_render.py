"""Timeline pictures: SVG by hand (always), PNG through matplotlib (when installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pp_ext.schedules import REGISTRY, build, simulate
from pp_ext.schedules.actions import Kind
from pp_ext.schedules.costs import Costs
from pp_ext.schedules.render import (
    chunk_color,
    format_number,
    save_png,
    save_svg,
    text_color,
    to_svg,
)
from pp_ext.tools.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def boxes(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return [r for r in root.iter(f"{SVG}rect") if "action" in (r.get("class") or "").split()]


def compute_actions(sim) -> int:
    return sum(len(row) for row in sim.timeline)


def texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


@pytest.mark.parametrize(
    "name,p,m,v",
    [
        ("gpipe", 4, 8, 1),
        ("1f1b", 4, 8, 1),
        ("interleaved-1f1b", 4, 8, 2),
        ("interleaved-1f1b", 3, 7, 3),
        ("looped-bfs", 4, 8, 2),
    ],
)
def test_svg_parses_with_one_box_per_compute_action(name, p, m, v):
    sim = simulate(build(name, p, m, v))
    svg = to_svg(sim)
    rects = boxes(svg)
    assert len(rects) == compute_actions(sim) == sum(len(prog) for prog in sim.schedule.programs)
    # every box names its action in a tooltip and carries kind and chunk classes
    for rect in rects:
        assert rect.find(f"{SVG}title") is not None
        classes = rect.get("class").split()
        assert any(c.startswith("kind-") for c in classes) and any(
            c.startswith("chunk-") for c in classes
        )
    chunks = {
        int(c[len("chunk-") :])
        for r in rects
        for c in r.get("class").split()
        if c.startswith("chunk-")
    }
    assert chunks == set(range(v))


def test_every_registered_schedule_draws():
    """Generic over the registry: every registered schedule accepts p=4, m=8 with its
    default chunks (none refuses these sizes) and draws one box per compute action."""
    for spec in REGISTRY.values():
        sim = simulate(spec.build(4, 8))
        assert len(boxes(to_svg(sim))) == compute_actions(sim), spec.name


def test_title_names_schedule_sizes_and_metrics():
    sim = simulate(build("interleaved-1f1b", 4, 8, 2))
    words = " ".join(texts(to_svg(sim)))
    assert "interleaved-1f1b" in words and "p=4" in words and "m=8" in words and "v=2" in words
    assert "bubble 0.1579" in words  # (p-1)/(v*m+p-1) = 3/19, as a decimal
    assert "peak activations 5.5" in words  # p + (p-1)/v
    assert "rank 3" in words and "time" in words
    # micro-batch labels, chunk shown by shade: the legend lists both chunks of F
    assert "F forward c0" in words and "F forward c1" in words


def test_boxes_sit_at_simulated_times_and_idle_is_empty():
    sim = simulate(build("gpipe", 4, 4))
    rects = boxes(to_svg(sim))
    by_row: dict[float, list[tuple[float, float]]] = {}
    for r in rects:
        by_row.setdefault(float(r.get("y")), []).append((float(r.get("x")), float(r.get("width"))))
    rows = [sorted(by_row[y]) for y in sorted(by_row)]
    assert len(rows) == 4
    unit = rows[0][0][1]  # width of one F
    left = rows[0][0][0]
    # rank r starts r time units later: the warm-up bubble is empty space
    for rank, row in enumerate(rows):
        assert row[0][0] == pytest.approx(left + rank * unit, abs=0.02)
        # B is twice as wide as F
        assert row[-1][1] == pytest.approx(2 * unit, abs=0.02)
    # rank 0 idles between its last F (ends at 4) and its first B (starts at 4 + 3 forward
    # hops + 3 backwards of 2 = 13): a gap with no box
    spans = sim.timeline[0]
    assert (spans[3].end, spans[4].start) == (4, 13)
    first_b, last_f = rows[0][4], rows[0][3]
    assert first_b[0] - (last_f[0] + last_f[1]) == pytest.approx(9 * unit, abs=0.05)


def test_colours_distinct_by_kind_and_shaded_by_chunk():
    kinds = [Kind.F, Kind.B, Kind.I, Kind.W, Kind.U]
    single = {chunk_color(k, 0, 1) for k in kinds}
    assert len(single) == len(kinds)
    for kind in kinds[:4]:
        shades = [chunk_color(kind, c, 4) for c in range(4)]
        assert len(set(shades)) == 4
    # labels stay readable: dark fills get white text
    assert text_color(chunk_color(Kind.F, 1, 2)) == "#ffffff"
    assert text_color(chunk_color(Kind.F, 0, 2)) != "#ffffff"


def test_large_schedule_stays_readable():
    sim = simulate(build("1f1b", 8, 32))
    svg = to_svg(sim)
    root = ET.fromstring(svg)
    assert float(root.get("width")) < 6000
    rects = boxes(svg)
    assert len(rects) == 8 * 32 * 2
    labels = [t for t in texts(svg) if t.isdigit()]
    assert len(labels) >= len(rects)  # every box carries its micro-batch (plus axis ticks)


def test_split_backward_kinds_and_costs():
    sim = simulate(build("interleaved-1f1b", 2, 4, 2), Costs.parse("1,2,1,1/4"))
    svg = to_svg(sim)
    assert len(boxes(svg)) == compute_actions(sim)
    assert "comm=0.25" in " ".join(texts(svg))


def test_format_number():
    from fractions import Fraction

    assert format_number(3) == "3"
    assert format_number(Fraction(11, 2)) == "5.5"
    assert format_number(Fraction(3, 11)) == "0.2727"
    assert format_number(0.0) == "0"
    assert format_number(28.5) == "28.5"


def test_save_svg_writes_atomically(tmp_path):
    sim = simulate(build("1f1b", 2, 2))
    target = tmp_path / "t.svg"
    assert save_svg(sim, target) == target
    ET.parse(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.svg"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "t.svg"
    target.write_text("old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.svg"]


def test_missing_directory_is_a_clear_error(tmp_path):
    sim = simulate(build("1f1b", 2, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_svg(sim, tmp_path / "nope" / "t.svg")
    assert not (tmp_path / "nope").exists()


def test_save_png_without_matplotlib_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    sim = simulate(build("1f1b", 2, 2))
    with pytest.raises(ImportError, match=r"pip install 'pp-ext\[plot\]'"):
        save_png(sim, tmp_path / "t.png")
    assert list(tmp_path.iterdir()) == []


def test_save_png(tmp_path):
    pytest.importorskip(
        "matplotlib", reason="PNG output needs matplotlib: pip install 'pp-ext[plot]'"
    )
    sim = simulate(build("interleaved-1f1b", 4, 8, 2))
    target = tmp_path / "t.png"
    save_png(sim, target)
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]


@pytest.mark.slow  # starts a process: a fresh interpreter's modules
def test_render_imports_no_heavy_modules():
    code = (
        "import sys, pp_ext.schedules.render\n"
        "bad = [m for m in ('matplotlib', 'torch', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)
