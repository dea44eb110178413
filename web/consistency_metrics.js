// Shows TVE_ConsistencyMetrics' summary on the node after a run (the node returns it as ui.text).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "TextVideoEdit.ConsistencyMetrics",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "TVE_ConsistencyMetrics") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      let widget = this.widgets?.find((w) => w.name === "tve_summary");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "tve_summary", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false;
      }
      widget.value = (message?.text ?? []).join("\n");
      this.setSize(this.computeSize());
    };
  },
});
