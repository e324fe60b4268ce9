// Erasekit front-end extension: the live detection map of Detect-and-Guide, drawn on the node
// while the sampler runs. The server sends one small PNG per step ("erasekit.detection"): the map so far.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "erasekit.detectionPreview",
  setup() {
    api.addEventListener("erasekit.detection", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      const img = new Image();
      img.onload = () => {
        node.imgs = [img];
        node.erasekitStep = `${detail.step + 1}/${detail.steps}`;
        node.setDirtyCanvas(true, true);
      };
      img.src = `data:image/png;base64,${detail.image}`;
      window.erasekitLastDetection = { node: detail.node, step: detail.step, steps: detail.steps };
    });
  },
});
