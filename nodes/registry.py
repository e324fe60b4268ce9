"""Every node of the pack, in menu order."""

from __future__ import annotations


def all_specs():
    from . import attention_nodes, dag_nodes, lora_nodes, model_nodes, nudenet_nodes

    return [*model_nodes.SPECS, *lora_nodes.SPECS, *dag_nodes.SPECS, *attention_nodes.SPECS, *nudenet_nodes.SPECS]
