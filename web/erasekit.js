// Erasekit front-end extension.
// 1. The live detection map of Detect-and-Guide, drawn on the node while the sampler runs. The server
//    sends one small PNG per step ("erasekit.detection"): the map so far.
// 2. An Erasekit node's error sentence (what to do, in words) as a toast: ComfyUI's own overlay shows a
//    generic title and keeps the sentence behind "View details".
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "erasekit.detectionPreview",
  setup() {
    api.addEventListener("erasekit.detection", ({ detail }) => {
      // a node inside a subgraph runs as "5:12": draw on the subgraph node (5) the canvas shows
      const node = app.graph.getNodeById(Number(String(detail.node).split(":")[0]));
      if (!node) return;
      const img = new Image();
      img.onload = () => {
        node.imgs = [img];
        node.setDirtyCanvas(true, true);
      };
      img.src = `data:image/png;base64,${detail.image}`;
      window.erasekitLastDetection = { node: detail.node, step: detail.step, steps: detail.steps };
    });
  },
});

app.registerExtension({
  name: "erasekit.errorToast",
  setup() {
    api.addEventListener("execution_error", ({ detail }) => {
      if (!detail || !String(detail.node_type || "").startsWith("Erasekit")) return;
      const node = app.graph?.getNodeById(Number(String(detail.node_id).split(":")[0]));
      const title = node?.title || detail.node_type;
      const toast = app.extensionManager?.toast;
      if (toast) toast.add({ severity: "error", summary: `${title}: what to do`, detail: detail.exception_message, life: 20000 });
      window.erasekitLastError = { node: detail.node_id, message: detail.exception_message };
    });
  },
});
