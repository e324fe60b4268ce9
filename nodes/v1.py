"""Classic ComfyUI node classes (``NODE_CLASS_MAPPINGS``) for ComfyUI builds without ``comfy_api``.

Same specs and functions as :mod:`.v3`; only the way ComfyUI discovers and calls them differs.
"""

from __future__ import annotations

from .registry import all_specs
from .spec import Input, NodeSpec


def _input(i: Input):
    if i.type == "COMBO":
        opts = {"default": i.default} if i.default is not None else {}
        return (i.choices(), {**opts, "tooltip": i.tooltip})
    opts = {"tooltip": i.tooltip}
    for key in ("default", "min", "max", "step"):
        if getattr(i, key) is not None:
            opts[key] = getattr(i, key)
    if i.multiline:
        opts["multiline"] = True
    return (i.type, opts)


def make_node(spec: NodeSpec) -> type:
    def INPUT_TYPES(cls):
        req = {i.name: _input(i) for i in spec.inputs if not i.optional}
        opt = {i.name: _input(i) for i in spec.inputs if i.optional}
        types = {"required": req, "optional": opt} if opt else {"required": req}
        if spec.wants_node_id:
            types["hidden"] = {"node_id": "UNIQUE_ID"}
        return types

    def run(self, **kwargs):
        res = spec.run(**kwargs)
        return {"ui": res.ui, "result": res.values} if res.ui else res.values

    extra = {} if spec.fingerprint is None else {"IS_CHANGED": classmethod(lambda cls, **kwargs: spec.fingerprint(**kwargs))}
    return type(spec.node_id, (), {
        **extra,
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs),
        "FUNCTION": "run", "CATEGORY": spec.category, "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node, "run": run, "__doc__": spec.description,
    })


NODE_CLASS_MAPPINGS = {s.node_id: make_node(s) for s in all_specs()}
NODE_DISPLAY_NAME_MAPPINGS = {s.node_id: s.display_name for s in all_specs()}
