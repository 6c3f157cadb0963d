"""Timeline pictures of a simulated schedule, drawn like the papers' figures.

Ranks are rows, time runs left to right; every compute action is a box from its
simulated start to its end, coloured by kind (``F`` blue, ``B`` green, ``I`` orange,
``W`` purple, ``U`` grey) and shaded by chunk (chunk 0 lightest, the last chunk
darkest, so interleaved and V-shaped schedules read as in Narayanan et al. 2021
Fig. 4 and Qi et al. 2024 Fig. 3), labelled with its micro-batch. Idle time is the
empty space between boxes. The title gives the schedule, p, m, v and the metrics;
the axis is in the cost model's time units.

One layout (a list of rectangles, texts and lines in pixels) feeds two back ends:

- :func:`to_svg` writes SVG by hand (standard library only);
- :func:`png_bytes` / :func:`save_png` draw the same layout with matplotlib,
  imported only when called (``pip install 'pp-ext[plot]'``).

``save_svg`` and ``save_png`` write to a temporary file next to the target and
rename it into place, so a failure never leaves a half-written picture.

This module imports neither torch nor deepspeed (nor matplotlib at import time).
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from html import escape
from pathlib import Path
from typing import NamedTuple

from pp_ext.tools.files import check_output_path, write_atomic

from .actions import Kind
from .simulate import Simulation, SteadyState, steady_state

PLOT_HINT = "pip install 'pp-ext[plot]'"

# kind -> (hue in degrees, saturation); chunks vary the lightness
_HUES = {
    Kind.F: (212, 0.62),
    Kind.B: (135, 0.50),
    Kind.I: (30, 0.85),
    Kind.W: (275, 0.45),
    Kind.U: (0, 0.0),
}
KIND_NAMES = {
    Kind.F: "forward",
    Kind.B: "backward",
    Kind.I: "input grad",
    Kind.W: "weight grad",
    Kind.U: "update",
}
_KIND_ORDER = (Kind.F, Kind.B, Kind.I, Kind.W, Kind.U)

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
_CHAR_WIDTH = 0.62  # average glyph width as a fraction of the font size (digits, sans-serif)

# layout in pixels
_LEFT = 96
_RIGHT = 24
_ROW = 30
_GAP = 6
_MIN_BOX = 20  # wanted width of the shortest action
_MIN_PLOT = 640  # plot area at least this wide ...
_MAX_PLOT = 4800  # ... and at most this wide (labels shrink, then vanish, past it)
_TICK_SPACING = 70  # aim for a time tick every this many pixels


# --------------------------------------------------------------------------- helpers


def format_number(value: object, digits: int = 4) -> str:
    """Fractions and floats as short decimals: 3 -> "3", 11/2 -> "5.5", 3/11 -> "0.2727"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    number = float(value)  # type: ignore[arg-type]
    if math.isfinite(number) and number == round(number):
        return str(int(round(number)))
    text = f"{number:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def chunk_color(kind: Kind, chunk: int, chunks: int) -> str:
    """Fill colour of a ``kind`` box on ``chunk`` of ``chunks``: one hue per kind,
    lightest on chunk 0, darkest on the last chunk."""
    hue, saturation = _HUES[kind]
    if chunks <= 1:
        lightness = 0.56
    else:
        lightness = 0.74 - 0.36 * min(chunk, chunks - 1) / (chunks - 1)
    r, g, b = colorsys.hls_to_rgb(hue / 360, lightness, saturation)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


def _luminance(color: str) -> float:
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color(fill: str) -> str:
    """Black or white, whichever reads better on ``fill``."""
    return "#ffffff" if _luminance(fill) < 0.5 else "#1a1a1a"


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exponent = math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        step = factor * 10**exponent
        if step >= raw:
            return step
    return 10 ** (exponent + 1)


def _text_width(text: str, size: float) -> float:
    return _CHAR_WIDTH * size * len(text)


# --------------------------------------------------------------------------- layout


class Rect(NamedTuple):
    x: float
    y: float
    width: float
    height: float
    fill: str
    stroke: str = "none"
    stroke_width: float = 0.0
    css: str = ""  # SVG class ("action ..." marks one box per compute action)
    tooltip: str = ""  # SVG <title>: the action, rank and times on hover


class Text(NamedTuple):
    x: float
    y: float  # baseline
    text: str
    size: float
    anchor: str = "start"  # start | middle | end
    fill: str = "#1a1a1a"
    bold: bool = False


class Line(NamedTuple):
    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str = "#999999"
    width: float = 1.0
    dashed: bool = False


@dataclass(frozen=True)
class Layout:
    width: float
    height: float
    items: tuple[Rect | Text | Line, ...]
    title: str


def _title_lines(simulation: "Simulation", steady: "SteadyState | None") -> tuple[str, str, str]:
    schedule = simulation.schedule
    title = (
        f"{schedule.name}: p={schedule.ranks}, m={schedule.micro_batches}, v={schedule.chunks} "
        f"({schedule.placement.name} placement)"
    )
    metrics = [f"bubble {format_number(simulation.bubble_ratio)} (flushed)"]
    if steady is not None:
        metrics.append(f"steady-state bubble {format_number(steady.bubble_ratio)}")
    metrics += [
        f"peak activations {format_number(simulation.peak_activations)}",
        f"makespan {format_number(simulation.makespan)}",
        f"weight copies {format_number(simulation.weight_copies)}",
        f"messages {simulation.messages}",
    ]
    return title, " · ".join(metrics), costs_text(simulation.costs)


def costs_text(costs) -> str:
    """One line describing a cost model."""
    if costs.per_stage is not None:
        text = f"costs: per-stage file ({len(costs.per_stage)} stages), comm={format_number(costs.comm)}"
    else:
        text = (
            f"costs per micro-batch and rank: F={format_number(costs.forward)} "
            f"I={format_number(costs.input_grad)} W={format_number(costs.weight_grad)} "
            f"comm={format_number(costs.comm)}"
        )
    if costs.update:
        text += f" U={format_number(costs.update)}"
    return text


def _legend_entries(simulation: "Simulation") -> list[tuple[str, str]]:
    chunks = simulation.schedule.chunks
    present = {(span.action.kind, span.action.chunk) for row in simulation.timeline for span in row}
    entries = []
    for kind in _KIND_ORDER:
        for chunk in range(chunks):
            if (kind, chunk) in present:
                label = f"{kind.value} {KIND_NAMES[kind]}" + (f" c{chunk}" if chunks > 1 else "")
                entries.append((label, chunk_color(kind, chunk, chunks)))
    return entries


def _stages_text(simulation: "Simulation", rank: int) -> str:
    placement = simulation.schedule.placement
    stages = []
    for chunk in range(placement.chunks):
        try:
            stages.append(str(placement.holds(rank, chunk)[1]))
        except (KeyError, ValueError):
            stages.append("?")
    return ("stage " if len(stages) == 1 else "stages ") + ",".join(stages)


def layout(simulation: "Simulation", steady: "SteadyState | None" = None) -> Layout:
    """The picture as rectangles, texts and lines in pixel coordinates."""
    schedule = simulation.schedule
    spans = [(rank, span) for rank, row in enumerate(simulation.timeline) for span in row]
    t0 = min((span.start for _, span in spans), default=Fraction(0))
    makespan = float(simulation.makespan) or 1.0
    durations = [float(span.end - span.start) for _, span in spans if span.end > span.start]
    shortest = min(durations, default=1.0)
    scale = max(_MIN_BOX / shortest, _MIN_PLOT / makespan)
    scale = min(scale, _MAX_PLOT / makespan)
    plot_width = makespan * scale

    title, metrics, costs = _title_lines(simulation, steady)
    entries = _legend_entries(simulation) + [("idle", "#ffffff")]
    width = _LEFT + plot_width + _RIGHT
    width = max(width, 24 + _text_width(metrics, 12) + 24, 24 + _text_width(title, 16) + 24)

    items: list[Rect | Text | Line] = []
    # title block
    y = 26.0
    items.append(Text(16, y, title, 16, bold=True))
    y += 20
    items.append(Text(16, y, metrics, 12))
    y += 14
    # legend, wrapped to the width
    y += 12
    x = 16.0
    for label, color in entries:
        needed = 14 + 6 + _text_width(label, 11) + 18
        if x + needed > width - 8 and x > 16:
            x = 16.0
            y += 20
        items.append(Rect(x, y - 11, 14, 14, color, "#555555", 0.8))
        items.append(Text(x + 20, y, label, 11))
        x += needed
    top = y + 18

    rows = schedule.ranks
    plot_height = rows * _ROW + (rows - 1) * _GAP
    bottom = top + plot_height

    # time ticks and faint guide lines behind the boxes
    step = _nice_step(_TICK_SPACING / scale)
    ticks = int(math.floor(makespan / step + 1e-9))
    for i in range(ticks + 1):
        t = i * step
        px = _LEFT + t * scale
        items.append(Line(px, top - 3, px, bottom + 3, "#e4e4e4", 1.0))
    # rank lanes: white, so idle time is visible as empty space
    for rank in range(rows):
        lane_y = top + rank * (_ROW + _GAP)
        items.append(Rect(_LEFT, lane_y, plot_width, _ROW, "none", "#bbbbbb", 1.0))
        items.append(Text(_LEFT - 10, lane_y + _ROW / 2 - 1, f"rank {rank}", 12, "end", bold=True))
        items.append(
            Text(
                _LEFT - 10,
                lane_y + _ROW / 2 + 11,
                _stages_text(simulation, rank),
                9,
                "end",
                fill="#666666",
            )
        )

    # one box per compute action
    for rank, span in spans:
        action = span.action
        lane_y = top + rank * (_ROW + _GAP)
        x0 = _LEFT + float(span.start - t0) * scale
        box_width = max(float(span.end - span.start) * scale, 2.0)
        fill = chunk_color(action.kind, action.chunk, schedule.chunks)
        tooltip = (
            f"rank {rank}: {action} ({KIND_NAMES[action.kind]}, micro-batch {action.micro_batch}, "
            f"chunk {action.chunk}) from {format_number(span.start - t0)} to {format_number(span.end - t0)}"
        )
        css = f"action kind-{action.kind.value} chunk-{action.chunk}"
        items.append(Rect(x0, lane_y + 1, box_width, _ROW - 2, fill, "#333333", 0.7, css, tooltip))
        label = str(action.micro_batch)
        size = min(12.0, (box_width - 3) / (_CHAR_WIDTH * len(label)))
        if size >= 6:
            items.append(
                Text(
                    x0 + box_width / 2,
                    lane_y + _ROW / 2 + size * 0.36,
                    label,
                    round(size, 1),
                    "middle",
                    text_color(fill),
                )
            )

    # time axis
    items.append(Line(_LEFT, bottom + 4, _LEFT + plot_width, bottom + 4, "#333333", 1.0))
    for i in range(ticks + 1):
        t = i * step
        px = _LEFT + t * scale
        items.append(Line(px, bottom + 4, px, bottom + 9, "#333333", 1.0))
        items.append(Text(px, bottom + 22, format_number(t), 11, "middle"))
    items.append(
        Text(_LEFT + plot_width / 2, bottom + 42, f"time ({costs})", 11, "middle", "#444444")
    )
    height = bottom + 54
    return Layout(round(width, 1), round(height, 1), tuple(items), title)


def _steady(simulation: "Simulation") -> "SteadyState":
    return steady_state(simulation.schedule, simulation.costs)


# --------------------------------------------------------------------------- SVG


def _f(value: float) -> str:
    return format_number(round(value, 2), 2)


def to_svg(simulation: "Simulation", steady: "SteadyState | None" = None) -> str:
    """The timeline as a standalone SVG document (no dependency).

    ``steady`` is :func:`pp_ext.schedules.simulate.steady_state` of the same
    schedule and costs; it is computed when not given. Each compute action is one
    ``<rect class="action kind-K chunk-C">`` with a ``<title>`` tooltip.
    """
    if steady is None:
        steady = _steady(simulation)
    lay = layout(simulation, steady)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{_f(lay.width)}" '
        f'height="{_f(lay.height)}" viewBox="0 0 {_f(lay.width)} {_f(lay.height)}" '
        f'font-family="{escape(FONT)}">',
        f"<title>{escape(lay.title)}</title>",
        f'<rect x="0" y="0" width="{_f(lay.width)}" height="{_f(lay.height)}" fill="#ffffff"/>',
    ]
    for item in lay.items:
        if isinstance(item, Rect):
            attrs = (
                f'x="{_f(item.x)}" y="{_f(item.y)}" width="{_f(item.width)}" height="{_f(item.height)}" '
                f'fill="{item.fill}"'
            )
            if item.stroke != "none":
                attrs += f' stroke="{item.stroke}" stroke-width="{_f(item.stroke_width)}"'
            if item.css:
                attrs += f' class="{escape(item.css)}"'
            if item.tooltip:
                out.append(f"<rect {attrs}><title>{escape(item.tooltip)}</title></rect>")
            else:
                out.append(f"<rect {attrs}/>")
        elif isinstance(item, Text):
            attrs = f'x="{_f(item.x)}" y="{_f(item.y)}" font-size="{_f(item.size)}"'
            if item.anchor != "start":
                attrs += f' text-anchor="{item.anchor}"'
            attrs += f' fill="{item.fill}"'
            if item.bold:
                attrs += ' font-weight="bold"'
            out.append(f"<text {attrs}>{escape(item.text)}</text>")
        else:
            attrs = (
                f'x1="{_f(item.x1)}" y1="{_f(item.y1)}" x2="{_f(item.x2)}" y2="{_f(item.y2)}" '
                f'stroke="{item.stroke}" stroke-width="{_f(item.width)}"'
            )
            if item.dashed:
                attrs += ' stroke-dasharray="3,3"'
            out.append(f"<line {attrs}/>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- PNG


def require_matplotlib():
    """Import matplotlib or raise ImportError naming the fix."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            f"PNG output needs matplotlib, which is not installed ({exc}): "
            f"{PLOT_HINT}, or write an SVG instead (--svg)"
        ) from None
    return Figure


_ANCHORS = {"start": "left", "middle": "center", "end": "right"}


def png_bytes(
    simulation: "Simulation", steady: "SteadyState | None" = None, dpi: float | None = None
) -> bytes:
    """The timeline as PNG bytes, drawn with matplotlib (imported here, not at module import)."""
    Figure = require_matplotlib()
    from matplotlib.patches import Rectangle

    if steady is None:
        steady = _steady(simulation)
    lay = layout(simulation, steady)
    pt = 72 / 100  # layout pixels -> points at 100 layout pixels per inch
    fig = Figure(figsize=(lay.width / 100, lay.height / 100), facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.set_axis_off()
    family = "DejaVu Sans"  # bundled with matplotlib: no font look-up warnings anywhere
    for order, item in enumerate(lay.items):  # draw in layout order, as SVG does
        zorder = 1 + order * 1e-6
        if isinstance(item, Rect):
            ax.add_patch(
                Rectangle(
                    (item.x, item.y),
                    item.width,
                    item.height,
                    facecolor=item.fill if item.fill != "none" else "none",
                    edgecolor=item.stroke if item.stroke != "none" else "none",
                    linewidth=item.stroke_width * pt,
                    zorder=zorder,
                )
            )
        elif isinstance(item, Text):
            ax.text(
                item.x,
                item.y,
                item.text,
                fontsize=item.size * pt,
                ha=_ANCHORS[item.anchor],
                va="baseline",
                color=item.fill,
                fontweight="bold" if item.bold else "normal",
                family=family,
                zorder=zorder,
            )
        else:
            ax.plot(
                [item.x1, item.x2],
                [item.y1, item.y2],
                color=item.stroke,
                linewidth=item.width * pt,
                linestyle="--" if item.dashed else "-",
                solid_capstyle="butt",
                zorder=zorder,
            )
    if dpi is None:  # crisp, but keep the image at most ~6000 px wide
        dpi = max(100.0, min(200.0, 600000 / lay.width))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


# --------------------------------------------------------------------------- files


def save_svg(
    simulation: "Simulation", path: str | os.PathLike, steady: "SteadyState | None" = None
) -> Path:
    """Write :func:`to_svg` to ``path`` atomically; returns the path."""
    check_output_path(path)
    return write_atomic(path, to_svg(simulation, steady).encode("utf-8"))


def save_png(
    simulation: "Simulation", path: str | os.PathLike, steady: "SteadyState | None" = None
) -> Path:
    """Write the PNG timeline to ``path`` atomically (needs matplotlib:
    ``pip install 'pp-ext[plot]'``); returns the path."""
    check_output_path(path)
    require_matplotlib()
    return write_atomic(path, png_bytes(simulation, steady))


__all__ = [
    "to_svg",
    "png_bytes",
    "save_svg",
    "save_png",
    "layout",
    "chunk_color",
    "format_number",
    "costs_text",
    "require_matplotlib",
    "PLOT_HINT",
]
