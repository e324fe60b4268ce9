"""Detect-and-Guide (DAG, Li et al., CVPR 2025; seed paper 001).

    guideline.py  GuidelineEmbedding (tokens + metadata, safetensors I/O) and token optimisation (Eq. 2-3)
    detect.py     CAMs of the guideline keys -> detection map A-hat (Sec. 3.1)
    guidance.py   safe self-regulation (Eq. 4, Table 1, Alg. 1, Eq. 5) and the SLD / SEGA peers
    sampling.py   a diffusers sampling loop with DAG / SLD / SEGA (lazy: no extra pass when nothing is detected)
    conditioning.py  prompts -> UNet inputs, for one text encoder or SDXL's two (diffusers' encode_prompt)
    fit.py        a guideline embedding from the erasure trainer's data (the CLI's and the app's entry point)

The maths is written once here and used by ComfyUI (nodes/dag_nodes.py), diffusers and the benchmarks.
"""
