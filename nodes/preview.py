"""InfSplign Attention Preview: the objects' attention maps and the loss of a finished run.

The run comes along the graph's edges: the MODEL (or the GUIDER's model) carries the
capture wrapper, whose trace keeps the last finished runs (guidance/trace.py); the LATENT
input says which of them (the run whose output it is) and makes the preview run after the
sampler. Drawing uses PIL and torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from comfy.patcher_extension import WrappersMP

from ..guidance.trace import MAX_RUNS, RunTrace, StepRecord, choose_steps
from .hooks import CAPTURE_KEY

# matplotlib's "inferno" at nine stops (dark purple -> orange -> pale yellow)
INFERNO = ((0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
           (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164))
# centroid colours per object: they stand out on inferno
OBJECT_COLOURS = ((0, 229, 255), (118, 255, 3), (255, 64, 129), (255, 255, 255), (68, 138, 255), (255, 171, 64))
# one line per image in the loss plot (tab10)
IMAGE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                 (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127))
HOLDS, FAILS = (60, 200, 90), (240, 80, 80)
BACKGROUND, INK, DIM = (24, 24, 28), (235, 235, 235), (150, 150, 160)
GUIDED_INK = (255, 196, 64)
WINDOW = (255, 240, 200)  # the guidance window's shade in the loss plot


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """text, shortened with "..." to fit `width` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while len(text) > 1 and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def colormap(values: torch.Tensor) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) uint8, inferno."""
    stops = torch.tensor(INFERNO, dtype=torch.float32)
    pos = values.clamp(0, 1) * (len(INFERNO) - 1)
    low = pos.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = stops[low] * (1 - frac) + stops[low + 1] * frac
    return rgb.round().to(torch.uint8).numpy()


VERBS = {"left": "left of", "right": "right of", "above": "above", "below": "below", "near": "near"}


def relation_text(run: RunTrace) -> str:
    parts = []
    for p in run.pairs:
        parts.append(f'"{run.objects[p.a]}" {VERBS[p.relation]} "{run.objects[p.b]}"')
    parts += [f'"{run.objects[slot]}" in a box' for slot, _ in run.boxes]
    return "; ".join(parts)


# -- the maps image ----------------------------------------------------------------------

def _disc(draw, xy, r, fill, outline=(0, 0, 0), width=2):
    x, y = xy
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=width)


def _dotted(draw, a, b, fill, dash=4, width=1):
    (x0, y0), (x1, y1) = a, b
    n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(i + 1, n) / n
        draw.line((x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0, x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1),
                  fill=fill, width=width)


def _arrow(draw, start, direction, length, fill, width):
    x, y = start
    dx, dy = direction
    end = (x + dx * length, y + dy * length)
    head = max(5.0, length * 0.3)
    px, py = -dy, dx
    tip = [end, (end[0] - dx * head + px * head * 0.55, end[1] - dy * head + py * head * 0.55),
           (end[0] - dx * head - px * head * 0.55, end[1] - dy * head - py * head * 0.55)]
    for w, colour in ((width + 2, (0, 0, 0)), (width, fill)):
        draw.line((x, y, end[0] - dx * head * 0.5, end[1] - dy * head * 0.5), fill=colour, width=w)
    draw.polygon(tip, fill=fill, outline=(0, 0, 0))


DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def _draw_relation(draw, run: RunTrace, centres, box, margin: float):
    """Per relation A R B: a dotted line A must cross (B's centroid shifted by the margin;
    for "near" a dotted circle), and an arrow in A's colour from B's centroid pointing where A
    belongs."""
    x0, y0, w, h = box
    at = lambda c: (x0 + float(c[0]) * (w - 1), y0 + float(c[1]) * (h - 1))  # noqa: E731
    for p in run.pairs:
        if not torch.isfinite(centres[p.b]).all():
            continue
        colour = OBJECT_COLOURS[p.a % len(OBJECT_COLOURS)]
        bx, by = at(centres[p.b])
        if p.relation == "near":
            rx, ry = max(0.5 - margin, 0.0) * (w - 1), max(0.5 - margin, 0.0) * (h - 1)
            steps = 48
            for i in range(0, steps, 2):
                a0, a1 = 2 * math.pi * i / steps, 2 * math.pi * (i + 1) / steps
                draw.line((bx + rx * math.cos(a0), by + ry * math.sin(a0), bx + rx * math.cos(a1),
                           by + ry * math.sin(a1)), fill=(255, 255, 255), width=1)
            continue
        dx, dy = DIRECTIONS[p.relation]
        if dx:
            lx = bx + dx * margin * (w - 1)
            _dotted(draw, (lx, y0), (lx, y0 + h - 1), (255, 255, 255))
        else:
            ly = by + dy * margin * (h - 1)
            _dotted(draw, (x0, ly), (x0 + w - 1, ly), (255, 255, 255))
        _arrow(draw, (bx, by), (dx, dy), 0.22 * min(w, h), colour, 3)


def _cell(rec: StepRecord, image: int, slot: int, run: RunTrace, cw: int, ch: int) -> Image.Image:
    """One object's map at one step: inferno, scaled to its own range, centroids on top."""
    m = torch.nan_to_num(rec.maps[image, slot], nan=0.0, posinf=0.0, neginf=0.0)[None, None]
    m = F.interpolate(m, size=(ch, cw), mode="bilinear", align_corners=True)[0, 0]
    lo, hi = float(m.min()), float(m.max())
    cell = Image.fromarray(colormap((m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)))
    draw = ImageDraw.Draw(cell)
    centres = rec.centroids[image]
    _draw_relation(draw, run, centres, (0, 0, cw, ch), run.settings.margin)
    for box_slot, (x0, y0, x1, y1) in run.boxes:  # the box the row's object is guided into
        if box_slot == slot:
            corners = (x0 * (cw - 1), y0 * (ch - 1), x1 * (cw - 1), y1 * (ch - 1))
            draw.rectangle(corners, outline=(0, 0, 0), width=4)
            draw.rectangle(corners, outline=(255, 255, 255), width=2)
    r = max(4, cw // 22)
    for k in range(centres.shape[0]):
        if not torch.isfinite(centres[k]).all():
            continue
        x, y = float(centres[k, 0]) * (cw - 1), float(centres[k, 1]) * (ch - 1)
        colour = OBJECT_COLOURS[k % len(OBJECT_COLOURS)]
        if k == slot:
            _disc(draw, (x, y), r + 1, colour)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(0, 0, 0), width=4)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=2)
    return cell


def _step_tag(rec: StepRecord) -> tuple[str, tuple]:
    if rec.applied:
        return "guided", GUIDED_INK
    return ("in window, not applied" if rec.in_window else "observed"), DIM


@dataclass(frozen=True)
class MapsLayout:
    """Where everything goes in the maps image (pixels)."""

    size: int  # cell width
    cell_h: int
    images: int
    objects: int
    relations: int
    columns: int

    @property
    def line(self) -> int:
        return max(14, self.size // 7)

    @property
    def gap(self) -> int:
        return max(4, self.size // 24)

    @property
    def label_w(self) -> int:
        return max(120, self.size)

    @property
    def top(self) -> int:  # title, legend and column headers
        return 6 * self.line + self.gap

    @property
    def block_h(self) -> int:  # one image: its label, object rows, relation rows
        return self.line + self.objects * (self.cell_h + self.gap) + self.relations * self.line + self.gap

    @property
    def width(self) -> int:
        return self.label_w + self.columns * (self.size + self.gap) + self.gap

    @property
    def height(self) -> int:
        return self.top + self.images * self.block_h + self.gap

    def column_x(self, j: int) -> int:
        return self.label_w + j * (self.size + self.gap)

    def row_y(self, image: int, obj: int) -> int:
        return self.top + image * self.block_h + self.line + obj * (self.cell_h + self.gap)

    def cell(self, image: int, obj: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one map cell."""
        x, y = self.column_x(j), self.row_y(image, obj)
        return x, y, x + self.size, y + self.cell_h


def maps_layout(run: RunTrace, steps: list[int], size: int) -> MapsLayout:
    maps = run.steps[steps[0]].maps
    h, w = maps.shape[-2:]
    return MapsLayout(size, max(16, round(size * h / w)), maps.shape[0], maps.shape[1], len(run.pairs), len(steps))


def render_maps(run: RunTrace, steps: list[int], size: int) -> Image.Image:
    """Rows: per image, one row per object; columns: the chosen steps. Each cell shows the
    object's map (own range), its centroid (filled disc), the other objects' centroids
    (rings), and per relation the line A must cross and an arrow to A's side. Under each
    image's rows, per relation and step: Delta (> margin: holds)."""
    records = [run.steps[s] for s in steps]
    lay = maps_layout(run, steps, size)
    images, k_objects, cw, ch = lay.images, lay.objects, lay.size, lay.cell_h
    line, gap, label_w, width = lay.line, lay.gap, lay.label_w, lay.width
    small, normal, big = _font(max(10, size // 11)), _font(max(11, size // 9)), _font(max(13, size // 8))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    canvas = Image.new("RGB", (width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    # title and legend
    title = f"InfSplign attention: {relation_text(run)}, {run.total_steps} steps (0-{run.total_steps - 1})"
    draw.text((gap, gap), _fit(measure, title, big, width - 2 * gap), font=big, fill=INK)
    more = f"  (first {images} of {run.batch} images)" if run.batch > images else ""
    legend_y = gap + line
    x = gap
    _disc(draw, (x + 5, legend_y + line // 2), 5, OBJECT_COLOURS[0])
    x += 14
    draw.text((x, legend_y), "centroid of the row's object", font=small, fill=INK)
    x += _text_width(measure, "centroid of the row's object", small) + 14
    draw.ellipse((x, legend_y + line // 2 - 5, x + 10, legend_y + line // 2 + 5), outline=OBJECT_COLOURS[1], width=2)
    x += 14
    draw.text((x, legend_y), "the other's" + more, font=small, fill=INK)
    if len(run.pairs) == 1 and run.pairs[0].relation != "near":
        a, b = (run.objects[run.pairs[0].a], run.objects[run.pairs[0].b])
        explain = f'arrow: from the centroid of "{b}" toward where "{a}" belongs; dotted: the line "{a}" must cross.'
    elif len(run.pairs) == 1:
        explain = f'dotted circle: "{run.objects[run.pairs[0].a]}" belongs inside it.'
    else:
        explain = "per relation A-B: an arrow from B's centroid toward where A belongs; dotted: the line A must cross."
    if run.boxes:
        explain = ("white frame: the box of the row's object. " + explain) if run.pairs else \
            "white frame: the box of the row's object."
    explain += " Each map is scaled to its own range."
    draw.text((gap, legend_y + line), _fit(measure, explain, small, width - 2 * gap), font=small, fill=DIM)

    # column headers
    y = 3 * line + gap
    for j, rec in enumerate(records):
        cx = lay.column_x(j)
        tag, colour = _step_tag(rec)
        draw.text((cx, y), f"step {rec.index}", font=normal, fill=INK)
        draw.text((cx, y + line), f"sigma {rec.sigma:.3g}", font=small, fill=DIM)
        draw.text((cx, y + 2 * line), _fit(measure, tag, small, cw), font=small, fill=colour)

    for b in range(images):
        draw.text((gap, lay.row_y(b, 0) - line), f"image {b + 1}", font=normal, fill=INK)
        for k in range(k_objects):
            y = lay.row_y(b, k)
            colour = OBJECT_COLOURS[k % len(OBJECT_COLOURS)]
            _disc(draw, (gap + 6, y + ch // 2), 6, colour)
            lines, current = [], ""
            for word in run.objects[k].split():  # wrap the object's name into the label column
                trial = f"{current} {word}".strip()
                if current and _text_width(measure, trial, normal) > label_w - 24 - gap:
                    lines.append(current)
                    current = word
                else:
                    current = trial
            lines.append(current)
            ty = y + ch // 2 - len(lines) * line // 2
            for text in lines:
                draw.text((gap + 18, ty), _fit(measure, text, normal, label_w - 24 - gap), font=normal, fill=colour)
                ty += line
            for j, rec in enumerate(records):
                canvas.paste(_cell(rec, b, k, run, cw, ch), lay.cell(b, k, j)[:2])
        y = lay.row_y(b, k_objects)
        for i, p in enumerate(run.pairs):
            name = (f"{i + 1}. " if len(run.pairs) > 1 else "") + f"{VERBS[p.relation]}: delta"
            draw.text((gap, y), _fit(measure, name, small, label_w - gap), font=small, fill=DIM)
            for j, rec in enumerate(records):
                delta = float(run.deltas(rec)[b, i])
                holds = delta > run.settings.margin
                text = f"{delta:+.2f} {'holds' if holds else 'fails'}"
                draw.text((lay.column_x(j), y), _fit(measure, text, small, cw),
                          font=small, fill=HOLDS if holds else FAILS)
            y += line
    return canvas


# -- the loss plot ------------------------------------------------------------------------

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
    """Two panels over the steps: the loss the guidance differentiates, and its spatial
    term alone (the relation part), one line per image."""
    width = max(520, 5 * size)
    panel_h = max(170, round(width * 0.3))
    small, normal, big = _font(12), _font(14), _font(16)
    left, right, top = 70, 20, 58
    legend_h = 44
    height = top + 2 * panel_h + 40 + 34 + legend_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title = f"InfSplign loss per step: {relation_text(run)}"
    draw.text((12, 8), _fit(draw, title, big, width - 24), font=big, fill=(20, 20, 20))
    records = run.ordered()
    images = records[0].loss.shape[0] if records else 0
    s = run.settings
    how = (f"loss {s.activation}, alpha {s.alpha:g}, margin {s.margin:g}, orthogonal {s.orthogonal}"
           + (", thresholded maps" if s.threshold else "")
           + (f", maps at temperature {s.temperature:g}" if s.temperature != 1 else ""))
    how = (f"this run's guidance settings: {how}" if run.guided
           else f"observed only (no guidance on this model), default settings: {how}")
    draw.text((12, 30), _fit(draw, how, small, width - 24), font=small, fill=(110, 110, 110))
    loss = [[float(r.loss[b]) for r in records] for b in range(images)]
    spatial = [[float(r.spatial[b]) for r in records] for b in range(images)]
    y0 = top + 20
    _panel(draw, (left, y0, width - right, y0 + panel_h - 20), run, loss,
           "loss (what the guidance lowers)", (small, normal), False)
    y0 += panel_h + 20
    _panel(draw, (left, y0, width - right, y0 + panel_h - 20), run, spatial,
           "spatial term (lowest when the relation clearly holds)", (small, normal), True)
    y = y0 + panel_h + 2
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
        elif kind == "box":
            draw.rectangle((x, y + 2, x + 16, y + 14), fill=WINDOW, outline=(200, 170, 100))
        draw.text((x + (0 if kind == "text" else 22), y), text, font=small, fill=(40, 40, 40))
        x += need
    return canvas


# -- the node -----------------------------------------------------------------------------

def to_image(picture: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def traces_of(model=None, guider=None) -> list:
    """The capture traces on the connected MODEL and/or the GUIDER's model."""
    if model is None and guider is None:
        raise ValueError("InfSplign Attention Preview needs the MODEL the sampler used (the output of InfSplign "
                         "(KSampler) or Attention Capture Patch) or the GUIDER (InfSplign Guider) that sampled: "
                         "connect `model` or `guider`.")
    found, named = [], []
    for name, patcher in (("MODEL", model), ("GUIDER", getattr(guider, "model_patcher", None) if guider else None)):
        if name == "GUIDER" and guider is not None and patcher is None:
            raise ValueError("The connected GUIDER has no model: connect InfSplign Guider (or a CFGGuider whose "
                             "model went through Attention Capture Patch).")
        if patcher is None:
            continue
        named.append(name)
        for wrapper in patcher.get_wrappers(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY):
            trace = getattr(wrapper, "trace", None)
            if trace is not None and all(trace is not t for t in found):
                found.append(trace)
    if not found:
        raise ValueError(f"The connected {' and '.join(named)} carries no InfSplign attention capture: connect the "
                         "MODEL that InfSplign (KSampler) or Attention Capture Patch outputs (the one the sampler "
                         "uses), or the InfSplign Guider.")
    return found


def find_run(traces: list, latent: dict) -> RunTrace:
    samples = latent["samples"] if isinstance(latent, dict) else latent
    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        raise ValueError("InfSplign Attention Preview reads image latents (one tensor); this LATENT is not one.")
    runs = [run for trace in traces for run in trace.runs]
    if not runs:
        raise ValueError("This model has not finished a sampling run yet (an interrupted run is not kept). "
                         "Connect the LATENT that this model's sampler produced, so the preview runs after it.")
    for trace in traces:
        run = trace.find(samples)
        if run is not None:
            return run
    raise ValueError(f"None of the last {len(runs)} sampling runs of this model produced the connected LATENT "
                     f"(a model keeps its last {MAX_RUNS}). Connect the LATENT that this model's sampler produced "
                     "(the sampler's own output, not a copy changed by another node).")


class AttentionPreview:
    DESCRIPTION = ("Shows a finished run's attention: per object, its cross-attention map at chosen steps "
                   "with its centroid, the other objects' centroids and the wanted relation (an arrow from B "
                   "to where A belongs, dotted: the line A must cross), and a plot of the loss per step with "
                   "the guidance window shaded. Works after InfSplign (KSampler) / InfSplign Guider and after "
                   "a capture-only run (Attention Capture Patch without guidance), which records without "
                   "changing the image. Rows: per image of the batch (the first 8).")
    CATEGORY = "sampling/InfSplign"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("maps", "loss_plot")
    OUTPUT_TOOLTIPS = ("Attention maps: rows per image and object, columns per step.",
                       "Loss and its spatial term per step, one line per image.")
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The LATENT the sampler produced with this model or guider: it "
                                      "picks the run to show and makes the preview run after sampling."}),
                "steps": ("STRING", {"default": "auto", "tooltip":
                          'Which steps to show: "auto" = about 6 evenly spaced steps, or step numbers '
                          'such as "0, 2, 4" (0 = the first step, as KSamplerAdvanced counts).'}),
                "size": ("INT", {"default": 128, "min": 48, "max": 512, "step": 8, "tooltip":
                         "Width of one map cell in pixels (the loss plot grows with it)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The MODEL the sampler used: the output of InfSplign (KSampler) or "
                                    "Attention Capture Patch (or a later node's output)."}),
                "guider": ("GUIDER", {"tooltip": "The GUIDER that sampled (InfSplign Guider), for "
                                      "SamplerCustomAdvanced."}),
            },
        }

    def preview(self, latent, steps="auto", size=128, model=None, guider=None):
        import nodes  # ComfyUI's: PreviewImage saves to the temp folder and says so to the browser
        run = find_run(traces_of(model, guider), latent)
        recorded = sorted(run.steps)
        if not recorded:
            raise ValueError("This run recorded no attention maps (its conditionings covered only part of the "
                             "latent, or the sampler skipped every step)." +
                             (f" Recording failed: {run.failed}" if run.failed else ""))
        shown = choose_steps(steps, recorded)
        maps = to_image(render_maps(run, shown, size))
        plot = to_image(render_loss(run, size))
        saver = nodes.PreviewImage()
        ui = saver.save_images(maps, "InfSplign_attention")["ui"]["images"]
        ui += saver.save_images(plot, "InfSplign_loss")["ui"]["images"]
        return {"ui": {"images": ui}, "result": (maps, plot)}
