"""ComfyUI V3 node classes (``comfy_api.latest``) built from the pack's :class:`NodeSpec` list."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .registry import all_specs
from .spec import Input, NodeSpec

_SCHEMA_HAS_ALIASES = "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {"search_aliases": None})
_SOCKETS = {
    "MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "MASK": io.Mask,
    "LATENT": io.Latent, "CONDITIONING": io.Conditioning,
}


def _socket(type_name: str):
    """ComfyUI's own socket class, or a custom one (e.g. ERASEKIT_GUIDELINE) for pack types."""
    return _SOCKETS.get(type_name) or {"STRING": io.String, "INT": io.Int, "FLOAT": io.Float}.get(type_name) \
        or io.Custom(type_name)


def _input(i: Input):
    common = dict(tooltip=i.tooltip or None, optional=i.optional)
    if i.type in _SOCKETS or i.type.startswith("ERASEKIT_"):
        return _socket(i.type).Input(i.name, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default or "", multiline=i.multiline, **common)
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.choices(), default=i.default, **common)
    raise ValueError(f"unsupported input type {i.type}")


def make_node(spec: NodeSpec) -> type[io.ComfyNode]:
    def define_schema(cls):
        extra = {"search_aliases": spec.search_aliases} if _SCHEMA_HAS_ALIASES else {}  # newer ComfyUI only
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
            description=spec.description, **extra,
            inputs=[_input(i) for i in spec.inputs],
            outputs=[_socket(o.type).Output(display_name=o.name, tooltip=o.tooltip or None) for o in spec.outputs],
            is_output_node=spec.output_node,
            hidden=[io.Hidden.unique_id] if spec.wants_node_id else [],
        )

    def execute(cls, **kwargs):
        if spec.wants_node_id:
            kwargs["node_id"] = cls.hidden.unique_id
        res = spec.run(**kwargs)
        return io.NodeOutput(*res.values, ui=res.ui)

    members = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": spec.description}
    if spec.fingerprint is not None:
        members["fingerprint_inputs"] = classmethod(lambda cls, **kwargs: spec.fingerprint(**kwargs))
    return type(spec.node_id, (io.ComfyNode,), members)


class ErasekitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [make_node(s) for s in all_specs()]


async def comfy_entrypoint() -> ErasekitExtension:
    return ErasekitExtension()
