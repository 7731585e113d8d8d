// InfSplign web extension: after a run, Spatial Relation Parse shows its parsed summary
// on the node, in a read-only text box.
//
// Safety: the summary repeats words of the user's prompt. It is only ever assigned to a
// <textarea>'s `value` (plain text), never to innerHTML or any HTML sink, so markup in a
// prompt shows as the characters typed (tests/tier4 checks this in the real frontend).
//
// Help: the frontend's node help panel (the (i) button of the selection toolbox, or the
// node library) reads web/docs/<NodeClass>.md, served at /extensions/<pack>/docs/.
import { app } from "../../scripts/app.js";

const EXTENSION = "infsplign.relationSummary";
const PARSE_NODE = "InfSplignRelationParse";
const SUMMARY = "parsed";

// ComfyUI serves this folder once per name it knows the pack by (its folder in
// custom_nodes/ and, via pyproject.toml, its project name); when they differ the frontend
// imports this file twice. Register once.
if (!app.extensions?.some((e) => e.name === EXTENSION)) {
  app.registerExtension({
    name: EXTENSION,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData.name !== PARSE_NODE) return;
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
  let widget = node.widgets?.find((w) => w.name === SUMMARY);
  if (!widget) {
    const box = document.createElement("textarea");
    box.className = "comfy-multiline-input infsplign-summary";
    box.readOnly = true;
    box.spellcheck = false;
    box.placeholder = "parsed relations (after a run)";
    box.setAttribute("aria-label", "Parsed spatial relations");
    box.dataset.infsplign = "summary";
    widget = node.addDOMWidget(SUMMARY, "customtext", box, {
      getValue: () => box.value,
      setValue: (v) => {
        box.value = v == null ? "" : String(v); // plain text, never HTML
      },
      serialize: false, // display only: not sent to the server with the prompt
      read_only: true, // the Vue node renderer ("Nodes 2.0") draws its own read-only text box
    });
    widget.serialize = false; // and not saved into the workflow file
    widget.inputEl = box;
    const size = node.computeSize?.();
    if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}
