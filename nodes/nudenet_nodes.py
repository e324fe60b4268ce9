"""NudeNet nodes: detect (mask, labelled overlay, detections as text) and censor, batch in, batch out.

NudeNet's own bundled ONNX model on onnxruntime (CPU, or a GPU provider where onnxruntime has one);
nothing is downloaded. The drawing and censoring live in ``erasekit.eval.nudenet``, which the evaluation
harness counts with.
"""

from __future__ import annotations

import json

from .spec import Input, NodeSpec, Output

DEVICES = ["auto", "cpu", "gpu"]


def _classes_input(default: str = "unsafe") -> Input:
    return Input("classes", "STRING", default=default,
                 tooltip="NudeNet classes, comma-separated: 'unsafe' (the papers' five exposed classes), 'all', or names "
                         "such as FACE_FEMALE, FEMALE_BREAST_EXPOSED, BELLY_EXPOSED.")


def _threshold_input() -> Input:
    return Input("threshold", "FLOAT", default=0.6, min=0.2, max=1.0, step=0.01,
                 tooltip="Lowest score that counts (the papers: 0.6; NudeNet reports nothing below 0.2).")


def _device_input() -> Input:
    return Input("device", "COMBO", options=DEVICES, default="auto",
                 tooltip="Where onnxruntime runs NudeNet: auto takes a GPU provider when onnxruntime has one.")


def _detections(image, classes: str, threshold: float, device: str):
    """Per image of the batch: (uint8 array, the chosen classes' detections at the threshold)."""
    from erasekit.errors import ErasekitError
    from erasekit.eval import nudenet as nn

    try:
        chosen = nn.parse_classes(classes)
        arrays = [nn.to_uint8(im) for im in image.detach().cpu().float().numpy()]
        found = nn.detect(arrays, device)
    except ErasekitError as err:
        raise ValueError(str(err)) from None
    return arrays, [nn.select(d, chosen, threshold) for d in found]


def detect(image, classes: str, threshold: float, feather: int, device: str = "auto"):
    import numpy as np
    import torch

    from erasekit.eval import nudenet as nn

    arrays, found = _detections(image, classes, threshold, device)
    h, w = image.shape[1:3]
    mask = torch.from_numpy(np.stack([nn.box_mask(h, w, d, int(feather)) for d in found]))
    overlay = torch.from_numpy(np.stack([nn.overlay(a, d) for a, d in zip(arrays, found)]).astype(np.float32) / 255.0)
    text = json.dumps([[{"class": d["class"], "score": round(float(d["score"]), 4), "box": [int(v) for v in d["box"]]}
                        for d in per] for per in found])
    return mask, overlay, text


def censor(image, classes: str, threshold: float, method: str, strength: float, device: str = "auto"):
    import numpy as np
    import torch

    from erasekit.eval import nudenet as nn

    arrays, found = _detections(image, classes, threshold, device)
    out = np.stack([nn.censor(a, d, method, strength) for a, d in zip(arrays, found)]).astype(np.float32) / 255.0
    return (torch.from_numpy(out),)


SPECS = [
    NodeSpec(
        node_id="ErasekitNudeNetDetect",
        display_name="NudeNet Detect",
        description="Finds body parts with NudeNet (its bundled model, run by onnxruntime; nothing is downloaded): a MASK "
                    "of the chosen classes' boxes, the image with every box labelled, and the detections as JSON text "
                    "(one list per image: class, score, box [x, y, w, h]).",
        inputs=[
            Input("image", "IMAGE", tooltip="One image or a batch."),
            _classes_input(),
            _threshold_input(),
            Input("feather", "INT", default=0, min=0, max=256, step=1,
                  tooltip="Soften the mask's edge over this many pixels outside the boxes."),
            _device_input(),
        ],
        outputs=[Output("MASK", "mask", "Union of the chosen classes' boxes, one mask per image."),
                 Output("IMAGE", "overlay", "The images with the detected boxes and their scores drawn."),
                 Output("STRING", "detections", "JSON: per image, a list of {class, score, box}.")],
        function=detect,
        search_aliases=["nudenet", "nsfw", "nudity detector", "censor mask"],
    ),
    NodeSpec(
        node_id="ErasekitNudeNetCensor",
        display_name="NudeNet Censor",
        description="Pixelates, blurs or covers what NudeNet finds of the chosen classes (its bundled model on "
                    "onnxruntime; nothing is downloaded). Images where nothing is found pass unchanged.",
        inputs=[
            Input("image", "IMAGE", tooltip="One image or a batch."),
            _classes_input(),
            _threshold_input(),
            Input("method", "COMBO", options=["pixelate", "blur", "cover"], default="pixelate",
                  tooltip="pixelate: coarse blocks; blur: Gaussian blur; cover: a black box."),
            Input("strength", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.05,
                  tooltip="pixelate: block size up to a quarter of the box; blur: radius up to half of it; cover: "
                          "opacity. 0 leaves the image as it is."),
            _device_input(),
        ],
        outputs=[Output("IMAGE", "image", "The images with the detected regions censored.")],
        function=censor,
        search_aliases=["nudenet", "nsfw", "censor", "pixelate", "blur nudity"],
    ),
]
