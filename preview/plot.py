"""InfSplign Attention Preview, the loss plot: per step, one line per image, the guidance
window shaded: the loss, each term that guided the run (relations, boxes, presence,
separation: a panel each, titled with its settings) and the relations' spatial term; below
them, when InfSplign Refine ran, its refinement step's loss per iteration. PIL only.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from ..guidance.trace import TERMS, RunTrace
from .maps import IMAGE_COLOURS, WINDOW, _fit, _font, _text_width, relation_text

REFINE_COLOUR = (230, 120, 20)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.2e}"


def _panel(draw, box, run: RunTrace, values, title: str, fonts, show_x: bool):
    """One plot: a line per image over the steps; guidance window shaded; filled markers on
    guided steps, rings on observed ones."""
    small, normal = fonts
    x0, y0, x1, y1 = box
    records = run.ordered()
    n = max(run.total_steps, max((r.index for r in records), default=0) + 1)
    finite = [v for vs in values for v in vs if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - max(abs(lo) * 0.1, 0.5), hi + max(abs(hi) * 0.1, 0.5)
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    px = lambda s: x0 + (s + 0.5) / n * (x1 - x0)  # noqa: E731
    py = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)  # noqa: E731

    # guidance window: shaded runs of in-window steps
    idx = [r.index for r in records if r.in_window]
    runs_ = []
    for s in idx:
        if runs_ and s == runs_[-1][1] + 1:
            runs_[-1][1] = s
        else:
            runs_.append([s, s])
    for a, b in runs_:
        draw.rectangle((px(a - 0.5), y0, px(b + 0.5), y1), fill=WINDOW)
    # grid and ticks
    for t in _nice_ticks(lo, hi):
        yy = py(t)
        draw.line((x0, yy, x1, yy), fill=(225, 225, 225))
        label = _label(t)
        draw.text((x0 - 6 - _text_width(draw, label, small), yy - 7), label, font=small, fill=(60, 60, 60))
    every = max(1, math.ceil(n / 12))
    for s in range(0, n, every):
        draw.line((px(s), y1, px(s), y1 + 4), fill=(60, 60, 60))
        if show_x:
            label = str(s)
            draw.text((px(s) - _text_width(draw, label, small) / 2, y1 + 6), label, font=small, fill=(60, 60, 60))
    draw.rectangle((x0, y0, x1, y1), outline=(90, 90, 90))
    if run.refinement is not None:  # InfSplign Refine's step: a dashed line
        xr = px(run.refinement.step)
        for yy in range(int(y0), int(y1), 8):
            draw.line((xr, yy, xr, min(yy + 4, y1)), fill=REFINE_COLOUR, width=2)
    draw.text((x0, y0 - 20), title, font=normal, fill=(20, 20, 20))
    # lines and markers
    for b, series in enumerate(values):
        colour = IMAGE_COLOURS[b % len(IMAGE_COLOURS)]
        pts = [(px(r.index), py(v), r.applied) for r, v in zip(records, series) if math.isfinite(v)]
        for (xa, ya, _), (xb, yb, _) in zip(pts, pts[1:]):
            draw.line((xa, ya, xb, yb), fill=colour, width=2)
        for x, y, applied in pts:
            if applied:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour, outline=colour)
            else:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 255, 255), outline=colour, width=2)


def render_loss(run: RunTrace, size: int) -> Image.Image:
    """Panels over the steps, one line per image: the loss the guidance differentiates (the
    sum of its terms, when it has several), each term titled with its settings, and the
    relations' spatial term alone; InfSplign Refine's step below."""
    steps = _render_steps(run, size)
    if run.refinement is None or not run.refinement.losses:
        return steps
    refine = render_refinement(run.refinement, steps.width)
    canvas = Image.new("RGB", (steps.width, steps.height + refine.height), (255, 255, 255))
    canvas.paste(steps, (0, 0))
    canvas.paste(refine, (0, steps.height))
    return canvas


def render_refinement(report, width: int) -> Image.Image:
    """A refinement burst (InfSplign Refine's, or Layout Boxes' placing): the loss (summed over the batch) before each Adam iteration,
    and at the refined latent."""
    small, normal = _font(12), _font(14)
    left, right, top, height = 70, 20, 44, max(170, round(width * 0.3))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    values = list(report.losses) + ([report.final] if math.isfinite(report.final) else [])
    title = (f"{report.source} at step {report.step} (sigma {report.sigma:.3g}): loss per iteration, "
             f"{values[0]:.4g} -> {values[-1]:.4g}" + (f" (stopped: {report.skipped})" if report.skipped else ""))
    draw.text((12, 8), _fit(draw, title, normal, width - 24), font=normal, fill=(20, 20, 20))
    x0, y0, x1, y1 = left, top, width - right, height - 34
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    n = max(len(values) - 1, 1)
    px = lambda i: x0 + i / n * (x1 - x0)  # noqa: E731
    py = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
    for t in _nice_ticks(lo, hi):
        draw.line((x0, py(t), x1, py(t)), fill=(225, 225, 225))
        label = _label(t)
        draw.text((x0 - 6 - _text_width(draw, label, small), py(t) - 7), label, font=small, fill=(60, 60, 60))
    for t in _nice_ticks(0, n):
        if float(t).is_integer():
            draw.line((px(t), y1, px(t), y1 + 4), fill=(60, 60, 60))
            label = str(int(t))
            draw.text((px(t) - _text_width(draw, label, small) / 2, y1 + 6), label, font=small, fill=(60, 60, 60))
    draw.rectangle((x0, y0, x1, y1), outline=(90, 90, 90))
    points = [(px(i), py(v)) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill=IMAGE_COLOURS[0], width=2)
    for x, y in points[:: max(1, len(points) // 25)]:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=IMAGE_COLOURS[0])
    draw.text(((x0 + x1) / 2 - 24, y1 + 18), "iteration", font=small, fill=(20, 20, 20))
    return canvas


TERM_LABELS = {"relations": "relation terms", "boxes": "box loss", "presence": "presence", "separation": "separation"}


def plotted_terms(run: RunTrace) -> list[str]:
    """The terms the plot shows (TERMS order): those the run's steps recorded; a run recorded
    without them shows its relations' loss."""
    seen = {name for r in run.steps.values() for name in r.terms}
    return [name for name in TERMS if name in seen] or ["relations"]


def term_series(run: RunTrace, name: str) -> list[list[float]]:
    """One list per image: the term's value at each recorded step (NaN where it was not recorded)."""
    records = run.ordered()
    images = records[0].loss.shape[0] if records else 0

    def value(r, b):
        if not r.terms and name == "relations":
            return float(r.loss[b])
        t = r.terms.get(name)
        return float(t[b]) if t is not None else float("nan")
    return [[value(r, b) for r in records] for b in range(images)]


def term_settings(run: RunTrace, name: str) -> str:
    """The settings of the run that act on one term, for its panel's title."""
    o, s = run.objective, run.settings
    if name == "relations":
        text = (f"{s.activation}, alpha {s.alpha:g}, margin {s.margin:g}, orthogonal {s.orthogonal}"
                + (", thresholded maps" if s.threshold else ""))
        return text + (f", weight {o.relation_weight:g}" if o is not None and o.relation_weight != 1 else "")
    if name == "boxes":
        text = f"{o.box_loss}, weight {o.box_weight:g}"
        return text + (f", steps before {run.layout.box_end_percent:g}" if run.layout is not None else "")
    return f"weight {getattr(o, name):g}, InfSplign Refine's term"


def _render_steps(run: RunTrace, size: int) -> Image.Image:
    records = run.ordered()
    images = records[0].loss.shape[0] if records else 0
    terms = plotted_terms(run)
    series = {name: term_series(run, name) for name in terms}
    panels = []  # (title, values per image)
    guided = run.guided or any(r.applied for r in records)
    lowers = ("what the guidance lowers" if guided else "what InfSplign Refine lowers" if run.refinement is not None
              else "what guidance would lower")
    if len(terms) > 1:
        total = [[sum(v) for v in zip(*(series[n][b] for n in terms))] for b in range(images)]
        panels.append((f"loss: the sum of the terms below ({lowers})", total))
    for name in terms:
        lowers = f" - {lowers}" if len(terms) == 1 else ""
        panels.append((f"{TERM_LABELS[name]} ({term_settings(run, name)}){lowers}", series[name]))
    if "relations" in terms:
        panels.append(("spatial term (lowest when the relation clearly holds)",
                       [[float(r.spatial[b]) for r in records] for b in range(images)]))

    width = max(520, 5 * size)
    panel_h = max(170, round(width * 0.3))
    small, normal, big = _font(12), _font(14), _font(16)
    left, right, top = 70, 20, 58
    legend_h = 44
    height = top + 20 + len(panels) * (panel_h - 20) + (len(panels) - 1) * 40 + 48 + legend_h + 6
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    subject = relation_text(run) or ", ".join('"' + o + '"' for o in run.objects)
    title = f"InfSplign loss per step: {subject}"
    draw.text((12, 8), _fit(draw, title, big, width - 24), font=big, fill=(20, 20, 20))
    how = ", ".join(TERM_LABELS[n] for n in terms)
    if run.settings.temperature != 1:
        how += f"; maps at temperature {run.settings.temperature:g}"
    if run.layout is not None and run.layout.injection > 0:
        how += f"; attention injection {run.layout.injection:g} before {run.layout.injection_end_percent:g}"
    if guided:
        how = f"this run's guidance: {how}"
    elif run.refinement is not None:
        how = f"refined at one step by InfSplign Refine (below); observed on every step: {how}"
    else:
        how = f"observed only (no guidance on this model), default settings: {how}"
    draw.text((12, 30), _fit(draw, how, small, width - 24), font=small, fill=(110, 110, 110))
    y0 = top + 20
    for i, (panel_title, values) in enumerate(panels):
        _panel(draw, (left, y0, width - right, y0 + panel_h - 20), run, values,
               _fit(draw, panel_title, normal, width - left - right), (small, normal), i == len(panels) - 1)
        y0 += panel_h - 20 + 40
    y = y0 - 40 + 22
    draw.text(((width + left) / 2 - 14, y), "step", font=normal, fill=(20, 20, 20))
    # legend: images, then the markers and the window; wraps to a second line when needed
    y += 26
    entries = [("line", IMAGE_COLOURS[b % len(IMAGE_COLOURS)], f"image {b + 1}") for b in range(images)]
    if run.batch > images:
        entries.append(("text", None, f"(first {images} of {run.batch})"))
    entries += [("disc", None, "guided")] if any(r.applied for r in records) else []
    entries += [("ring", None, "observed")] if not all(r.applied for r in records) else []
    if any(r.in_window for r in records):
        entries.append(("box", None, "guidance window"))
    if run.refinement is not None:
        entries.append(("dash", None, "refined step"))
    x = left
    for kind, colour, text in entries:
        need = (0 if kind == "text" else 22) + _text_width(draw, text, small) + 14
        if x + need > width - right and x > left:
            x, y = left, y + 20
        if kind == "line":
            draw.line((x, y + 8, x + 18, y + 8), fill=colour, width=3)
        elif kind == "disc":
            draw.ellipse((x + 5, y + 4, x + 13, y + 12), fill=(60, 60, 60))
        elif kind == "ring":
            draw.ellipse((x + 5, y + 4, x + 13, y + 12), outline=(60, 60, 60), width=2)
        elif kind == "dash":
            draw.line((x + 8, y + 1, x + 8, y + 15), fill=REFINE_COLOUR, width=2)
        elif kind == "box":
            draw.rectangle((x, y + 2, x + 16, y + 14), fill=WINDOW, outline=(200, 170, 100))
        draw.text((x + (0 if kind == "text" else 22), y), text, font=small, fill=(40, 40, 40))
        x += need
    return canvas
