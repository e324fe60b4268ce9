"""Nodes that show where the model puts each word: capture cross-attention, draw a heatmap."""

from __future__ import annotations

from .spec import Input, NodeSpec, Output

RECORDER_KEY = "erasekit_attention_recorder"


def capture(model, layers: str):
    from erasekit.attention import coarse_levels

    from .comfy_bridge import AttentionRecorder, attention_levels, outer_sample_hook

    config = model.model.model_config.unet_config
    if not config.get("context_dim") or "transformer_depth" not in config:
        raise ValueError(f"Capture Cross-Attention works on UNet models with cross-attention (SD1.x, SD2.x, SDXL); "
                         f"this model ({type(model.model).__name__}) is not one.")
    levels = None if layers == "all" else coarse_levels(attention_levels(model))
    rec = AttentionRecorder(levels=levels)
    patched = rec.patch(model)
    patched.model_options["transformer_options"][RECORDER_KEY] = rec
    outer_sample_hook(patched, rec.clear)
    return (patched,)


def word_token_positions(clip, prompt: str, words: str) -> list[int]:
    """Token positions (in the encoded sequence) of each word of ``words`` (whitespace or comma
    separated) in ``prompt``: every run of the word's own token ids, tokenized by the same CLIP.
    ComfyUI's word ids number weighted segments, not words ("a photo of a red cat" is one), so the
    ids are matched, not the word numbers; "(red circle:1.2)" still finds "circle"."""

    def tokens(text):  # [(position, token id)] of the text's words: word id 0 marks start / end / padding
        rows = next(iter(clip.tokenize(text, return_word_ids=True).values()))  # first encoder, chunks in order
        flat = [r for chunk in rows for r in chunk]
        return [(pos, int(r[0])) for pos, r in enumerate(flat) if len(r) > 2 and r[2] != 0 and isinstance(r[0], int)]

    in_prompt = tokens(prompt)
    ids = [t for _, t in in_prompt]
    positions = set()
    for word in words.replace(",", " ").split():
        want = [t for _, t in tokens(word)]
        for i in range(len(ids) - len(want) + 1) if want else ():
            if ids[i:i + len(want)] == want:
                positions.update(p for p, _ in in_prompt[i:i + len(want)])
    if not positions:
        raise ValueError(f"None of the words '{words}' occurs in the prompt '{prompt}'; type words from the prompt.")
    return sorted(positions)


def heatmap(model, image, clip, prompt: str, words: str, step: str):
    import torch

    from erasekit.attention import token_heatmap
    from erasekit.visualize import heat_overlay

    rec = model.model_options.get("transformer_options", {}).get(RECORDER_KEY)
    if rec is None:
        raise ValueError("This model carries no attention recorder: connect the MODEL output of 'Capture Cross-Attention' "
                         "(the same one the sampler used).")
    if not rec.maps:
        raise ValueError("No attention was recorded yet: connect the sampler's decoded IMAGE to this node so it runs after sampling.")
    positions = word_token_positions(clip, prompt, words)
    size = tuple(image.shape[1:3])
    if step == "mean over steps":
        n = min(len(v) for v in rec.maps.values())
        heat = sum(token_heatmap(rec.maps, positions, size, step=i) for i in range(n)) / n
    else:
        heat = token_heatmap(rec.maps, positions, size, step=-1)
    heat = heat[torch.arange(image.shape[0]) % heat.shape[0]]  # one map per image (the batch's maps in turn)
    return (heat.float(), heat_overlay(image, heat.to(image.dtype)).to(torch.float32))


SPECS = [
    NodeSpec(
        node_id="ErasekitCaptureAttention",
        display_name="Capture Cross-Attention",
        description="Records the cross-attention maps of the model while a sampler runs, so 'Cross-Attention Heatmap' "
                    "can show where each word of the prompt went. The model's output is unchanged.",
        inputs=[
            Input("model", "MODEL"),
            Input("layers", "COMBO", options=["coarse", "all"], default="coarse",
                  tooltip="coarse: the two lowest-resolution levels with cross-attention (SD1.5: 32x32 and 16x16), "
                          "where words localise best; all: every cross-attention layer."),
        ],
        outputs=[Output("MODEL", "model", "The same model, recording its cross-attention.")],
        function=capture,
        search_aliases=["attention map", "daam", "cam"],
    ),
    NodeSpec(
        node_id="ErasekitAttentionHeatmap",
        display_name="Cross-Attention Heatmap",
        description="Shows where the model attended to the given words during the last sampling: a MASK in [0, 1] "
                    "and the image with the heatmap over it.",
        inputs=[
            Input("model", "MODEL", tooltip="The MODEL from 'Capture Cross-Attention' that the sampler used."),
            Input("image", "IMAGE", tooltip="The decoded image of that sampling (also makes this node run after it)."),
            Input("clip", "CLIP", tooltip="The CLIP that encoded the prompt (to find the words' tokens)."),
            Input("prompt", "STRING", multiline=True, tooltip="The positive prompt, exactly as encoded."),
            Input("words", "STRING", default="", tooltip="Words of the prompt to show, separated by spaces or commas."),
            Input("step", "COMBO", options=["last step", "mean over steps"], default="last step"),
        ],
        outputs=[Output("MASK", "mask", "Attention of the words, min-max normalised."),
                 Output("IMAGE", "overlay", "The image with the heatmap over it.")],
        function=heatmap,
    ),
]
