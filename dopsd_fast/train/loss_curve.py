"""The loss curve as a PNG (``<output_dir>/loss.png``, redrawn at every checkpoint from metrics.jsonl): the mean loss
and the loss of each roll-out step against the training step, drawn with PIL (a dependency already; no plotting
library for one figure).

Where a run has more steps than the plot has pixel columns, each point is the mean of the steps in its column
(a 2,000-step run on 640 columns: about 3 steps each), so the lines stay readable without hiding a trend. The
loss axis is logarithmic when the losses span 10x or more, else linear. A step whose loss was NaN/Inf (null in
the JSONL) leaves a gap.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 900, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 34, 44         # px around the plot: tick labels, the legend, title, x label
MEAN_COLOUR = (0, 0, 0)
# one colour per roll-out step, distinguishable and colour-blind friendly (Okabe-Ito)
STEP_COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0), (0, 114, 178), (204, 121, 167),
                (240, 228, 66)]


def draw_loss_curve(rows: list[dict], png: Path, sigmas: list[float]) -> Path | None:
    """``rows``: metrics.jsonl's rows (step, loss, losses); ``sigmas``: the roll-out schedule (K + 1 values), which
    names each step's line. Returns ``png``, or None when no row has a finite loss yet."""
    steps = [r["step"] for r in rows]
    K = len(sigmas) - 1
    series = [("mean", MEAN_COLOUR, 2, [r.get("loss") for r in rows])]
    series += [(f"roll-out {k}: sigma {sigmas[k]:.2f} -> {sigmas[k + 1]:.2f}", STEP_COLOURS[k % len(STEP_COLOURS)], 1,
                [_item(r.get("losses"), k) for r in rows]) for k in range(K)]
    values = [v for *_, ys in series for v in ys if v is not None and math.isfinite(v)]
    if not values:
        return None
    log_y = min(values) > 0 and max(values) / min(values) >= 10
    fy = math.log10 if log_y else float
    lo, hi = fy(min(values)), fy(max(values))
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * pw

    def py(value: float) -> float:
        return TOP + (hi - fy(value)) / (hi - lo) * ph

    image = Image.new("RGB", (W, H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline=(0, 0, 0))
    for t in (t for t in _ticks(x0, x1) if t == int(t)):       # steps are whole numbers
        draw.line([px(t), TOP + ph, px(t), TOP + ph + 4], fill=(0, 0, 0))
        _text(draw, font, (px(t), TOP + ph + 6), f"{t:g}", "centre")
    for v in _log_ticks(lo, hi) if log_y else _ticks(lo, hi):
        draw.line([LEFT, py(v), LEFT + pw, py(v)], fill=(225, 225, 225))
        _text(draw, font, (LEFT - 6, py(v)), f"{v:.3g}", "right", middle=True)
    for _, colour, width, ys in reversed(series):       # the mean last, on top
        for segment in _segments(_binned(steps, ys, pw, x0, x1)):
            points = [(px(s), py(v)) for s, v in segment]
            if len(points) > 1:
                draw.line(points, fill=colour, width=width)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
    for i, (name, colour, width, _) in enumerate(series):
        y = TOP + 8 + 16 * i
        draw.line([LEFT + pw + 12, y, LEFT + pw + 32, y], fill=colour, width=width + 1)
        _text(draw, font, (LEFT + pw + 38, y), name, "left", middle=True)
    scale = "log scale" if log_y else "linear scale"
    title = f"loss of each roll-out step and their mean, steps {min(steps)}-{max(steps)}"
    _text(draw, font, (LEFT + pw / 2, 10), title, "centre")
    _text(draw, font, (LEFT + pw / 2, H - 14), "training step", "centre")
    _text(draw, font, (8, 10), f"loss ({scale})", "left")
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(png)        # a viewer never opens a half-written picture
    return png


def _text(draw, font, xy: tuple[float, float], text: str, align: str, middle: bool = False) -> None:
    """``text`` left of, centred on or right of ``xy``, its top (or ``middle``) at ``xy``'s height; computed here,
    not with draw.text's anchor, which Pillow's bitmap default font (Pillow 10.0, builds without FreeType) refuses."""
    width = font.getlength(text)
    x = xy[0] - {"left": 0, "centre": width / 2, "right": width}[align]
    y = xy[1] - (font.getbbox("Ag")[3] / 2 if middle else 0)
    draw.text((x, y), text, fill=(0, 0, 0), font=font)


def _item(values, k: int):
    return values[k] if isinstance(values, list) and len(values) > k else None


def _binned(steps: list[int], ys: list, columns: int, x0: float, x1: float) -> list[tuple[float, float | None]]:
    """(step, value) points, averaged over the steps that share a pixel column; None: a non-finite step (a gap)."""
    bins: dict[int, list] = {}
    for s, y in zip(steps, ys):
        bins.setdefault(int((s - x0) / (x1 - x0) * (columns - 1)), []).append((s, y))
    out = []
    for members in bins.values():
        finite = [y for _, y in members if y is not None and math.isfinite(y)]
        mean_step = sum(s for s, _ in members) / len(members)
        out.append((mean_step, sum(finite) / len(finite) if len(finite) == len(members) else None))
    return out


def _segments(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of points without a gap."""
    runs: list[list[tuple[float, float]]] = [[]]
    for s, v in points:
        if v is None:
            runs.append([])
        else:
            runs[-1].append((s, v))
    return [r for r in runs if r]


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round values (1, 2 or 5 x 10^k apart) between ``lo`` and ``hi``, at most about ``n``."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Values 1, 2, 5 x 10^k between 10^lo and 10^hi (log10 bounds); the decades alone where those are many."""
    ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
             if lo <= math.log10(m * 10.0 ** e) <= hi]
    return [t for t in ticks if f"{t:.0e}".startswith("1")] if len(ticks) > 8 else ticks
