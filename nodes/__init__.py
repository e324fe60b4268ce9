"""ComfyUI adapter: node declarations (spec.py), V3 and V1 front doors, and the bridge to ComfyUI internals."""
