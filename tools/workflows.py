"""ComfyUI workflow files: API-format graphs <-> the UI format ComfyUI's front end opens.

The pack's ``example_workflows/*.json`` (listed by ComfyUI under Templates) are written from the
API graphs in ``tools/graphs.py`` with the real node definitions of a running ComfyUI, so the
widget order always matches the nodes. ``ui_to_api`` reads them back for the tests, which run
each template through ComfyUI's executor.

    python -m tools.workflows       # regenerate example_workflows/
"""

from __future__ import annotations

import json
import os

from tools import REPO

SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT", "CONDITIONING"}
NOTE_TYPES = ("Note", "MarkdownNote")  # the front end's own nodes: drawn, never queued

# The Note at the top left of each template: what to do first, in a user's words. ComfyUI's Templates
# dialog shows a custom node's template by its file name with <name>.jpg beside it (no title or
# description field for them), so the Note is where a template explains itself.
NOTES = {
    "erasure_lora_before_after": (
        "ERASURE LoRA: BEFORE | AFTER\n\n"
        "What to do first:\n"
        "1. Make an erasure LoRA with the Erasekit trainer (make trainer, or python -m trainer app): "
        "Generate data, Start, then Export into 'ComfyUI models/loras'.\n"
        "2. Press R here to refresh the lists and pick your LoRA in both Load Erasure LoRA nodes.\n"
        "3. Queue. Left: strength 0 (the model as it was); right: strength 1 (the concept erased), same seed.\n\n"
        "'Preview as Text' shows what the LoRA erases. The model is the bundled toy model; for your own "
        "checkpoint use Load Checkpoint instead of Load Diffusers Model."),
    "detect_and_guide": (
        "DETECT-AND-GUIDE: SAFE SAMPLING WITHOUT RETRAINING\n\n"
        "What to do first: nothing to train. The toy model and its 'red circle' guideline embedding ship "
        "with the pack: press Queue and the red circle turns into something else while the blue square stays.\n\n"
        "Your own concept: train 'DAG guideline tokens' in the Erasekit trainer, Export into ComfyUI, "
        "press R and pick it in Load Guideline Embedding. Raise Strength when small objects survive."),
    "detect_and_guide_side_by_side": (
        "DETECT-AND-GUIDE, SIDE BY SIDE\n\n"
        "What to do first: press Queue. Same prompt and seed: left plain sampling, right with "
        "Detect-and-Guide; the live detection map is drawn on the node while it samples.\n\n"
        "Your own concept: train 'DAG guideline tokens' in the Erasekit trainer, Export into ComfyUI, "
        "press R and pick it in Load Guideline Embedding."),
}


def _inputs(node_cls) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in declaration order (required, then optional)."""
    spec = node_cls.INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, decl in spec.get(group, {}).items():
            kind = decl[0]
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            out.append((name, kind, opts))
    return out


def _is_widget(kind, opts) -> bool:
    if isinstance(kind, list):
        return True
    if kind == "COMBO":
        return True
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput")


def api_to_ui(graph: dict, node_classes: dict, note: str | None = None) -> dict:
    """UI-format workflow (nodes laid out left to right by depth) for an API-format graph; ``note``:
    a Note node above them (what to do first)."""
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in graph[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in graph:
        d(nid)
    nodes, links, column_rows = [], [], {}
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in sorted(graph, key=lambda n: (depth[n], int(n))):
        node = graph[nid]
        cls = node_classes[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, opts in _inputs(cls):
            value = node["inputs"].get(name)
            if isinstance(value, list):  # a link
                link_id = len(links) + 1
                src, slot = value
                src_type = _output_types(node_classes[graph[src]["class_type"]])[slot]
                links.append([link_id, int(src), slot, int(nid), len(inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                inputs.append({"name": name, "type": src_type, "link": link_id})
            elif _is_widget(kind, opts):
                widgets.append(value if value is not None else opts.get("default"))
                if name == "seed" or opts.get("control_after_generate"):
                    widgets.append("fixed")
        row = column_rows.get(depth[nid], 0)
        column_rows[depth[nid]] = row + 1
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 340 * depth[nid], 40 + 260 * row],
                      "size": [300, 200], "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for n in nodes:
        types = _output_types(node_classes[n["type"]])
        n["outputs"] = [{"name": t, "type": t, "links": out_links.get((str(n["id"]), i), []), "slot_index": i}
                        for i, t in enumerate(types)]
    last = max(int(k) for k in graph)
    if note:
        for n in nodes:
            n["pos"][1] += 200
        last += 1
        nodes.insert(0, {"id": last, "type": "Note", "pos": [40, 10], "size": [620, 170], "flags": {}, "order": 0,
                         "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note],
                         "color": "#432", "bgcolor": "#653"})
        for i, n in enumerate(nodes):
            n["order"] = i
    return {"last_node_id": last, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _output_types(node_cls) -> list[str]:
    return [t if isinstance(t, str) else "COMBO" for t in node_cls.RETURN_TYPES]


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """The inverse (what ComfyUI's front end does when it queues a workflow)."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for n in workflow["nodes"]:
        if n["type"] in NOTE_TYPES:
            continue
        cls = node_classes[n["type"]]
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values", []))
        inputs = {}
        for name, kind, opts in _inputs(cls):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
            elif _is_widget(kind, opts) and values:
                inputs[name] = values.pop(0)
                if name == "seed" or opts.get("control_after_generate"):
                    values.pop(0)
        graph[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return graph


def example_graphs() -> dict[str, dict]:
    from tools.graphs import dag_graph, lora_before_after_graph, single_dag_graph

    # Detect-and-Guide at the node's defaults (strength 1, the paper's scale), as `make demo`
    lora = lora_before_after_graph("toy", "erase-red-circle.safetensors", "a red circle and a blue square")
    lora["50"] = {"class_type": "PreviewAny", "inputs": {"source": ["40", 2]}}  # the after branch's LoRA: its info
    return {
        # the trainer app's default export (runs/... or ComfyUI's models/loras): erase-red-circle.safetensors
        "erasure_lora_before_after": lora,
        "detect_and_guide": single_dag_graph("toy", "a red circle and a blue square", "toy-red-circle.safetensors"),
        "detect_and_guide_side_by_side": dag_graph("toy", "a red circle and a blue square", "toy-red-circle.safetensors"),
    }


def main() -> None:
    from tools.comfy_headless import HeadlessComfy

    comfy = HeadlessComfy()
    folder = os.path.join(REPO, "example_workflows")
    os.makedirs(folder, exist_ok=True)
    for name, graph in example_graphs().items():
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(api_to_ui(graph, comfy.nodes.NODE_CLASS_MAPPINGS, NOTES[name]), f, indent=1)
        print("wrote", os.path.join(folder, f"{name}.json"))


if __name__ == "__main__":
    main()
