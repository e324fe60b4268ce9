"""The diffusers <-> ComfyUI bridge: same weights, same outputs, same attention maps."""

import pytest
import torch

from erasekit import tiny
from erasekit.attention import CrossAttentionCapture
from tools.comfy_headless import from_pack


def _sdxl_y(text_embeds, time_ids):
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    return torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), 8).reshape(time_ids.shape[0], -1)], 1)


@pytest.mark.parametrize("layout", tiny.LAYOUTS)
def test_comfy_unet_and_attention_match_diffusers(comfy, layout):
    AttentionRecorder, load_diffusers_unet = from_pack("nodes.comfy_bridge", 'AttentionRecorder', 'load_diffusers_unet')

    parts = tiny.build(layout, seed=3)
    unet = parts["unet"]
    patched = (rec := AttentionRecorder()).patch(load_diffusers_unet(unet, parts["scheduler"]))
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim)
    kwargs, y = {}, None
    if layout == "sdxl":
        te, tid = torch.randn(2, tiny.TINY_WIDTH_2), torch.randn(2, 6)
        kwargs, y = {"added_cond_kwargs": {"text_embeds": te, "time_ids": tid}}, _sdxl_y(te, tid)
    with torch.no_grad(), CrossAttentionCapture(unet) as cap:
        ref = unet(x, t, encoder_hidden_states=ctx, **kwargs).sample
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[0])
    with torch.no_grad():
        out = patched.model.diffusion_model(x, timesteps=t, context=ctx, y=y, transformer_options=options)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    # every cross-attention layer, under the same diffusers name on both sides
    assert set(cap.maps) == set(rec.maps) and len(cap.maps) >= 5
    for name in cap.maps:
        assert cap.maps[name][0].shape == rec.maps[name][0].shape
        assert torch.allclose(cap.maps[name][0], rec.maps[name][0], atol=1e-5), name


def test_recorder_keeps_only_conditional_entries_and_chosen_levels(comfy):
    AttentionRecorder, load_diffusers_unet = from_pack("nodes.comfy_bridge", 'AttentionRecorder', 'load_diffusers_unet')

    parts = tiny.build("sd_v1")
    rec = AttentionRecorder(levels=(1, 2))
    patched = rec.patch(load_diffusers_unet(parts["unet"], parts["scheduler"]))
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 5, tiny.TINY_WIDTH)
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0])  # uncond chunk first
    with torch.no_grad():
        patched.model.diffusion_model(x, timesteps=torch.full((4,), 10.0), context=ctx, transformer_options=options)
    sizes = {m[0].shape[1] for m in rec.maps.values()}
    assert sizes == {4, 2}  # 8x8 latent: level 1 = 4x4, level 2 = 2x2; level 0 and the 1x1 mid excluded
    for maps in rec.maps.values():
        assert maps[0].shape[0] == 2  # the two conditional entries only
        assert torch.allclose(maps[0].sum(-1), torch.ones(()), atol=1e-5)  # probabilities over tokens


def test_recorder_keeps_another_extensions_attention_replacement(comfy):
    """An attn2 replacement already on the model (IPAdapter's, say) still computes the layer's output
    under Capture Cross-Attention, which only records (it replaced the other patch before)."""
    AttentionRecorder, attn2_layer_names, load_diffusers_unet = from_pack("nodes.comfy_bridge", 'AttentionRecorder', 'attn2_layer_names', 'load_diffusers_unet')

    parts = tiny.build("sd_v1")
    model = load_diffusers_unet(parts["unet"], parts["scheduler"])
    calls = []

    def other(q, k, v, extra_options):  # an extension's attention: here, none at all
        calls.append(1)
        return torch.zeros_like(q)

    for block, number, t_index in attn2_layer_names(model.model.model_config.unet_config):
        model.set_model_attn2_replace(other, block, number, t_index)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, tiny.TINY_WIDTH)

    def run(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[0])
        with torch.no_grad():
            return m.model.diffusion_model(x, timesteps=torch.full((2,), 10.0), context=ctx, transformer_options=options)

    alone = run(model)
    rec = AttentionRecorder()
    captured = run(rec.patch(model))
    assert torch.equal(alone, captured) and len(calls) == 2 * len(rec.maps) and rec.maps


@pytest.mark.parametrize("layout", tiny.LAYOUTS)
def test_dag_patch_cams_equal_the_diffusers_taps(comfy, layout, monkeypatch):
    """Detect-and-Guide's CAMs in ComfyUI (attn2 patch) and in the diffusers sampler (to_q hooks):
    the same layers, the same maps, for SD1, SD2 and SDXL. SDXL's (and the toy's) mid block sits at a
    coarse level and must be left out on both sides."""
    load_diffusers_unet = from_pack("nodes.comfy_bridge", 'load_diffusers_unet')
    install = from_pack("nodes.dag_patch", 'install')
    from erasekit.dag import detect
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.dag.sampling import GuidelineTap

    parts = tiny.build(layout, seed=4)
    unet = parts["unet"]
    width = unet.config.cross_attention_dim
    torch.manual_seed(2)
    emb = GuidelineEmbedding(torch.randn(2, width), torch.randn(width), "x", layout)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 7, width)
    kwargs, y = {}, None
    if layout == "sdxl":
        te, tid = torch.randn(1, tiny.TINY_WIDTH_2), torch.randn(1, 6)
        kwargs, y = {"added_cond_kwargs": {"text_embeds": te, "time_ids": tid}}, _sdxl_y(te, tid)

    cams = []
    cam = detect.guideline_cam
    monkeypatch.setattr(detect, "guideline_cam", lambda *a: cams.append(cam(*a)) or cams[-1])
    with torch.no_grad(), GuidelineTap(unet, [emb]) as tap:
        unet(x, t, encoder_hidden_states=ctx, **kwargs)
        tap.cams((8, 8))
    ours, cams = cams, []
    patched = install(load_diffusers_unet(unet, parts["scheduler"]), [emb], [[torch.zeros(1, 7, width), {}]])
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[0])
    with torch.no_grad():
        patched.model.diffusion_model(x, timesteps=t, context=ctx, y=y, transformer_options=options)
    assert len(cams) == len(ours) >= 4
    for a, b in zip(cams, ours):
        assert a.numel() == b.numel() and torch.allclose(a.flatten(), b.flatten(), atol=1e-5)


@pytest.mark.parametrize("layout", ["sd_v1", "sd_v2", "sdxl"])
def test_ldm_layer_levels_pick_the_layers_the_comfyui_patch_reads(comfy, layout):
    """The LDM-layout rule A1111 uses (levels from the Downsample / Upsample blocks) selects exactly the
    layers the ComfyUI patch reads (the diffusers rule through ComfyUI's key map)."""
    from erasekit.attention import coarse_levels, ldm_cross_attention_levels

    load_diffusers_unet, dag_layer_coordinates = from_pack("nodes.comfy_bridge", "load_diffusers_unet",
                                                           "dag_layer_coordinates")
    built = tiny.build(layout, seed=0)
    patcher = load_diffusers_unet(built["unet"], built["scheduler"])
    levels = ldm_cross_attention_levels(patcher.model.diffusion_model)
    keep = coarse_levels({lv for name, lv in levels.items() if name.startswith("input_blocks")})
    ours = set()
    for name, lv in levels.items():
        if lv in keep:
            parts = name.split(".")
            block = {"input_blocks": "input", "output_blocks": "output"}[parts[0]]
            ours.add((block, int(parts[1]), int(parts[parts.index("transformer_blocks") + 1])))
    assert ours == dag_layer_coordinates(patcher) and ours
