"""InfSplign Attention Preview, the maps image: per image and object, the object's attention
map at the chosen steps with its centroid, the others' centroids, the wanted relation and
its box, if it has one. PIL and torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..guidance.trace import RunTrace, StepRecord

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
