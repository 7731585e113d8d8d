// InfSplign web extension: after a run, Spatial Relation Parse shows its parsed summary
// on the node. The text goes into a read-only text widget's value (never into HTML).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SUMMARY = "parsed";

app.registerExtension({
  name: "infsplign.relationSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "InfSplignRelationParse") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === SUMMARY);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, SUMMARY, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: not saved into the workflow
        if (widget.inputEl) widget.inputEl.readOnly = true;
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
