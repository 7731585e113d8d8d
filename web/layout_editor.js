// InfSplign Layout Boxes: an editor drawn on the node. It shows the image frame (the
// aspect of the node's width / height inputs) and each box of the `boxes` widget in its own
// colour; drag on an empty place to draw a box for the object named in the editor's
// "object" field, drag a box to move it, drag its corner to resize it, double-click it to
// remove it. Every change is written to the `boxes` widget as JSON, so saved workflows and
// API prompts carry the boxes; the JSON stays editable as text and the editor follows it.
//
// Safety: `boxes` may come from a shared workflow. It is read with JSON.parse only, and
// object names reach the page only as canvas text (fillText) and as an <input>'s value,
// never as HTML (tests/tier4 checks this in the real frontend).
import { app } from "../../scripts/app.js";

const EXTENSION = "infsplign.layoutEditor";
const NODE = "InfSplignLayout";
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
                "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"];
const HANDLE = 8; // px: a corner within this distance resizes the box

if (!app.extensions?.some((e) => e.name === EXTENSION)) {
  app.registerExtension({
    name: EXTENSION,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData.name !== NODE) return;
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        addEditor(this);
        return r;
      };
    },
  });
}

/** The boxes of the widget's JSON, or null when it is not a list of boxes. */
function readBoxes(text) {
  let data;
  try {
    data = JSON.parse(text || "[]");
  } catch {
    return null;
  }
  if (!Array.isArray(data)) return null;
  return data
    .filter((b) => b && typeof b.object === "string" && Array.isArray(b.box) && b.box.length === 4
                   && b.box.every((v) => typeof v === "number" && Number.isFinite(v)))
    .map((b) => ({ object: b.object, box: b.box.map((v) => Math.min(1, Math.max(0, v))) }));
}

const round = (v) => Math.round(v * 1000) / 1000;

function addEditor(node) {
  const boxesWidget = () => node.widgets?.find((w) => w.name === "boxes");
  const sizeOf = (name, fallback) => Number(node.widgets?.find((w) => w.name === name)?.value) || fallback;

  const wrap = document.createElement("div");
  wrap.className = "infsplign-box-editor";
  wrap.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:4px;align-items:center;font-size:12px";
  const label = document.createElement("span");
  label.textContent = "object";
  const objectInput = document.createElement("input");
  objectInput.type = "text";
  objectInput.placeholder = "words of the prompt";
  objectInput.dataset.infsplign = "box-object";
  objectInput.style.cssText = "flex:1;min-width:0";
  const clear = document.createElement("button");
  clear.textContent = "clear";
  clear.type = "button";
  bar.append(label, objectInput, clear);
  const canvas = document.createElement("canvas");
  canvas.dataset.infsplign = "box-editor";
  canvas.style.cssText = "flex:1;width:100%;min-height:160px;cursor:crosshair;touch-action:none";
  wrap.append(bar, canvas);

  let boxes = [];
  let lastText = null;
  let drag = null; // {mode: "new"|"move"|"resize", index, start: [x, y], orig}

  /** The frame (CSS px inside the canvas) that stands for the image. */
  function frame() {
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const aspect = sizeOf("width", 512) / sizeOf("height", 512);
    const fw = Math.min(w - 8, (h - 8) * aspect), fh = fw / aspect;
    return { x: (w - fw) / 2, y: (h - fh) / 2, w: fw, h: fh };
  }

  function sync() {
    const text = String(boxesWidget()?.value ?? "[]");
    if (text === lastText) return;
    lastText = text;
    const read = readBoxes(text);
    canvas.dataset.invalid = read === null ? "1" : "";
    if (read !== null) boxes = read;
    draw();
  }

  function write() {
    const widget = boxesWidget();
    if (!widget) return;
    const text = JSON.stringify(boxes.map((b) => ({ object: b.object, box: b.box.map(round) })));
    lastText = text;
    widget.value = text;
    widget.callback?.(text);
    node.setDirtyCanvas?.(true, true);
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const f = frame();
    canvas.dataset.frame = JSON.stringify({ x: f.x, y: f.y, w: f.w, h: f.h });
    ctx.fillStyle = "#111";
    ctx.fillRect(f.x, f.y, f.w, f.h);
    ctx.strokeStyle = "#888";
    ctx.strokeRect(f.x + 0.5, f.y + 0.5, f.w - 1, f.h - 1);
    ctx.font = "12px sans-serif";
    boxes.forEach((b, i) => {
      const [x0, y0, x1, y1] = b.box;
      const color = COLORS[i % COLORS.length];
      ctx.fillStyle = color + "33";
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      const rx = f.x + x0 * f.w, ry = f.y + y0 * f.h, rw = (x1 - x0) * f.w, rh = (y1 - y0) * f.h;
      ctx.fillRect(rx, ry, rw, rh);
      ctx.strokeRect(rx, ry, rw, rh);
      ctx.fillRect(rx + rw - HANDLE / 2, ry + rh - HANDLE / 2, HANDLE, HANDLE);
      ctx.fillStyle = color;
      ctx.fillText(b.object, rx + 3, ry + 13, Math.max(rw - 6, 20)); // canvas text: never HTML
    });
    if (canvas.dataset.invalid) {
      ctx.fillStyle = "#f66";
      ctx.fillText("boxes is not valid JSON: fix the text below", f.x + 4, f.y + f.h - 6);
    }
  }

  /** The pointer as fractions of the frame. */
  function at(event) {
    const r = canvas.getBoundingClientRect(), f = frame();
    const sx = canvas.clientWidth / r.width, sy = canvas.clientHeight / r.height; // canvas zoom
    return [((event.clientX - r.left) * sx - f.x) / f.w, ((event.clientY - r.top) * sy - f.y) / f.h];
  }

  function hit([x, y]) {
    const f = frame(), tol = HANDLE / Math.min(f.w, f.h);
    for (let i = boxes.length - 1; i >= 0; i--) {
      const [x0, y0, x1, y1] = boxes[i].box;
      if (Math.abs(x - x1) <= tol && Math.abs(y - y1) <= tol) return { mode: "resize", index: i };
      if (x >= x0 && x <= x1 && y >= y0 && y <= y1) return { mode: "move", index: i };
    }
    return null;
  }

  const clamp = (v) => Math.min(1, Math.max(0, v));

  canvas.addEventListener("pointerdown", (event) => {
    event.stopPropagation();
    event.preventDefault();
    sync();
    const p = at(event);
    const found = hit(p);
    if (found) {
      drag = { ...found, start: p, orig: [...boxes[found.index].box] };
    } else {
      const name = objectInput.value.trim().replace(/\s+/g, " ") || `object ${boxes.length + 1}`;
      let index = boxes.findIndex((b) => b.object.toLowerCase() === name.toLowerCase());
      const box = [clamp(p[0]), clamp(p[1]), clamp(p[0]), clamp(p[1])];
      if (index < 0) {
        boxes.push({ object: name, box });
        index = boxes.length - 1;
      } else {
        boxes[index].box = box;
      }
      drag = { mode: "new", index, start: [clamp(p[0]), clamp(p[1])] };
    }
    canvas.setPointerCapture?.(event.pointerId);
    draw();
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    event.stopPropagation();
    const [x, y] = at(event);
    const b = boxes[drag.index];
    if (drag.mode === "new") {
      const [sx, sy] = drag.start;
      b.box = [Math.min(sx, clamp(x)), Math.min(sy, clamp(y)), Math.max(sx, clamp(x)), Math.max(sy, clamp(y))];
    } else if (drag.mode === "move") {
      const [x0, y0, x1, y1] = drag.orig;
      const dx = Math.min(Math.max(x - drag.start[0], -x0), 1 - x1);
      const dy = Math.min(Math.max(y - drag.start[1], -y0), 1 - y1);
      b.box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
    } else {
      const [x0, y0] = drag.orig;
      b.box = [x0, y0, Math.max(clamp(x), x0 + 0.01), Math.max(clamp(y), y0 + 0.01)];
    }
    draw();
  });

  const finish = (event) => {
    if (!drag) return;
    event.stopPropagation();
    const b = boxes[drag.index];
    if (drag.mode === "new" && (b.box[2] - b.box[0] < 0.01 || b.box[3] - b.box[1] < 0.01)) {
      boxes.splice(drag.index, 1); // a click, not a drag: no box
    }
    drag = null;
    write();
    draw();
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  canvas.addEventListener("dblclick", (event) => {
    event.stopPropagation();
    const found = hit(at(event));
    if (found) {
      boxes.splice(found.index, 1);
      write();
      draw();
    }
  });
  clear.addEventListener("click", (event) => {
    event.stopPropagation();
    boxes = [];
    write();
    draw();
  });
  for (const el of [objectInput, clear]) el.addEventListener("pointerdown", (e) => e.stopPropagation());

  const widget = node.addDOMWidget("box_editor", "infsplign_box_editor", wrap, {
    serialize: false, // the boxes live in the `boxes` widget; the editor only shows them
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => 220,
  });
  widget.serialize = false;
  // Follow the JSON (typed, loaded from a workflow, or set by another node) and the size.
  new ResizeObserver(() => draw()).observe(canvas);
  const timer = setInterval(() => {
    if (!canvas.isConnected && node.graph == null) return clearInterval(timer);
    sync();
  }, 300);
  const size = node.computeSize?.();
  if (size) node.setSize?.([Math.max(node.size[0], size[0], 360), Math.max(node.size[1], size[1])]);
  sync();
}
