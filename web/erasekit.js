// Erasekit front-end extension: the live detection map of Detect-and-Guide, drawn on the node
// while the sampler runs. The server sends one small PNG per step ("erasekit.detection"): the map so far.
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
