// InfSplign web extension: after a run, Spatial Relation Parse and InfSplign Layout Boxes
// show their parsed summary on the node, in a read-only text box.
//
// Safety: the summary repeats words of the user's prompt. It is only ever a text widget's
// value, which both node renderers put into a <textarea>'s `value` (plain text), never into
// innerHTML or any HTML sink, so markup in a prompt shows as the characters typed
// (tests/tier4 checks this in the real frontend, with both renderers).
//
// Help: the frontend's node help panel (the (i) button of the selection toolbox, or the
// node library) reads web/docs/<NodeClass>.md, served at /extensions/<pack>/docs/.
import { app } from "../../scripts/app.js";

const EXTENSION = "infsplign.relationSummary";
const SUMMARY_NODES = ["InfSplignRelationParse", "InfSplignLayout"];
const SUMMARY = "parsed";

// ComfyUI serves this folder once per name it knows the pack by (its folder in
// custom_nodes/ and, via pyproject.toml, its project name); when they differ the frontend
// imports this file twice. Register once.
if (!app.extensions?.some((e) => e.name === EXTENSION)) {
  app.registerExtension({
    name: EXTENSION,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!SUMMARY_NODES.includes(nodeData.name)) return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        showSummary(this, summaryText(message));
      };
    },
  });
}

/** The "text" list of the node's ui message, joined; always a string. */
function summaryText(message) {
  const text = message?.text;
  if (Array.isArray(text)) return text.map((t) => String(t ?? "")).join("\n");
  return text == null ? "" : String(text);
}

function showSummary(node, text) {
  const widget = node.widgets?.find((w) => w.name === SUMMARY) ?? addSummaryWidget(node);
  widget.value = text;
  fitSummary(node, widget);
  // Measured again once the frontend has laid the text box out (a new one is not in the page yet).
  requestAnimationFrame(() => requestAnimationFrame(() => fitSummary(node, widget)));
}

/** The summary's text box: the widget's element (`inputEl` is deprecated since frontend 1.4x). */
function textBox(widget) {
  const el = widget.element;
  if (el instanceof HTMLTextAreaElement) return el;
  return el?.querySelector?.("textarea") ?? null;
}

const LINE = 13; // px per line of the frontend's textarea font (10 px) when the box cannot be measured
const SLACK = 4; // px: padding and rounding
const FRAME = 20; // px the frontend takes from a DOM widget's height for its margins (1.32 and 1.49)

/** Widget height (CSS px) that shows every line of `text` in the text box, wrapped lines included. */
function neededHeight(widget, text) {
  const box = textBox(widget);
  if (box?.isConnected && box.clientWidth > 0) {
    const shown = box.offsetHeight;
    const frame = widget.computedHeight > shown && shown > 0 ? widget.computedHeight - shown : FRAME;
    const previous = box.style.height;
    box.style.height = "0px"; // scrollHeight is then the content's height (restored before any paint)
    const content = box.scrollHeight;
    box.style.height = previous;
    if (content > 0) return content + SLACK + frame;
  }
  return String(text ?? "").split("\n").length * LINE + 2 * SLACK + FRAME;
}

/** Give the summary the height its lines need, and grow the node by what it takes, so the
 * node's other widgets (the text boxes, the layout editor) keep their size. */
function fitSummary(node, widget) {
  const need = Math.max(2 * LINE + FRAME, neededHeight(widget, widget.value));
  widget.infsplignNeed = need;
  const granted = widget.infsplignGranted ?? 0; // what the node has grown by for it so far
  if (need > granted) {
    widget.infsplignGranted = need;
    node.setSize?.([node.size[0], node.size[1] + need - granted]);
  }
  node.setDirtyCanvas?.(true, true);
}

/** A read-only multiline text widget for the summary, shown by both node renderers.
 *
 * The frontend's own multiline STRING widget (ComfyWidgets.STRING) where it has one: the
 * classic renderer shows it as a <textarea>, and the Vue renderer ("Nodes 2.0", frontend
 * 1.3x and later) draws its own text box from the widget's value, which only the
 * frontend's own widgets keep it told of (a plain DOM widget's box stays empty there).
 * Otherwise a DOM widget holding our own <textarea>. Either way the text reaches the page
 * only as a textarea's value. Its height is fixed to what its lines need (fitSummary). */
function addSummaryWidget(node) {
  const STRING = window.comfyAPI?.widgets?.ComfyWidgets?.STRING;
  let widget;
  if (STRING) {
    widget = STRING(node, SUMMARY, ["STRING", { multiline: true }], app).widget;
  } else {
    const box = document.createElement("textarea");
    box.className = "comfy-multiline-input";
    widget = node.addDOMWidget(SUMMARY, "customtext", box, {
      getValue: () => box.value,
      setValue: (v) => {
        box.value = v == null ? "" : String(v); // plain text, never HTML
      },
    });
  }
  widget.serialize = false; // display only: not saved into the workflow file
  widget.options ??= {};
  Object.assign(widget.options, {
    serialize: false, read_only: true, // nor sent with the prompt
    // the layout gives it exactly the height of its lines; the other widgets share the rest
    getMinHeight: () => widget.infsplignNeed ?? 2 * LINE + FRAME,
    getMaxHeight: () => widget.infsplignNeed ?? 2 * LINE + FRAME,
  });
  const box = textBox(widget);
  if (box) {
    box.readOnly = true;
    box.spellcheck = false;
    box.placeholder = "parsed relations (after a run)";
    box.setAttribute("aria-label", "Parsed spatial relations");
    box.classList.add("infsplign-summary");
    box.dataset.infsplign = "summary";
  }
  return widget;
}
