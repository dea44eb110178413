// Shows TVE_ConsistencyMetrics' summary on the node after a run (the node returns it as ui.text; ComfyUI's frontend
// shows ui.text only for its own text nodes, not for a custom node's).
//
// Public frontend API only, the same on frontend 1.27 (ComfyUI 0.3.64) and 1.48 (ComfyUI 0.33): `app` from
// scripts/app.js, app.registerExtension with beforeRegisterNodeDef, the node's onExecuted callback, and
// node.addDOMWidget with getValue/setValue over an element of our own. No scripts/widgets.js (an internal module:
// frontend 1.48 warns on import) and no widget.inputEl (deprecated there).
import { app } from "../../scripts/app.js";

const NODE = "TVE_ConsistencyMetrics";
const WIDGET = "tve_summary";

function summaryWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  const text = document.createElement("textarea");
  text.readOnly = true;
  text.rows = 5;
  text.style.cssText = "width: 100%; resize: none; font: 12px monospace; white-space: pre; overflow: auto;";
  const widget = node.addDOMWidget(WIDGET, "tve_summary", text, {
    getValue: () => text.value,
    setValue: (value) => { text.value = value ?? ""; },
    getMinHeight: () => 90,
    serialize: false,                 // a result, not a setting: never saved into the workflow or the prompt
  });
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "TextVideoEdit.ConsistencyMetrics",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      summaryWidget(this).value = (message?.text ?? []).join("\n");
      const needed = this.computeSize();
      this.setSize([Math.max(this.size[0], needed[0]), Math.max(this.size[1], needed[1])]);
      this.setDirtyCanvas(true, true);
    };
  },
});
