"""Cross-attention capture on a diffusers UNet."""

import pytest
import torch

from erasekit import tiny
from erasekit.attention import (
    CrossAttentionCapture,
    attention_levels,
    coarse_levels,
    cross_attention_layers,
    token_heatmap,
)


@pytest.fixture(scope="module")
def unet():
    return tiny.build("sd_v1", seed=0)["unet"]


def test_capture_does_not_change_the_output_and_restores_processors(unet):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, tiny.TINY_WIDTH)
    before = {n: type(m.processor) for n, m in cross_attention_layers(unet).items()}
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=ctx).sample
        with CrossAttentionCapture(unet) as cap:
            out = unet(x, 10, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert {n: type(m.processor) for n, m in cross_attention_layers(unet).items()} == before
    assert len(cap.maps) == len(before) == 10  # 3 down + 1 mid + 3 up blocks x 2 in this layout
    for maps in cap.maps.values():
        assert torch.allclose(maps[0].sum(-1), torch.ones(()), atol=1e-5)


def test_levels_and_batch_slice_select_what_is_kept(unet):
    assert attention_levels(unet) == [0, 1, 2] and coarse_levels([0, 1, 2]) == (1, 2)
    x, ctx = torch.randn(4, 4, 16, 16), torch.randn(4, 6, tiny.TINY_WIDTH)
    with torch.no_grad(), CrossAttentionCapture(unet, levels=(1, 2), batch_slice=slice(2, None), keep_last=1) as cap:
        unet(x, 10, encoder_hidden_states=ctx)
        unet(x, 20, encoder_hidden_states=ctx)
    shapes = {tuple(m[0].shape) for m in cap.maps.values()}
    assert shapes == {(2, 8, 8, 6), (2, 4, 4, 6)}  # 16x16 latent: level 1 = 8x8, level 2 = 4x4
    assert all(len(m) == 1 for m in cap.maps.values())


def test_token_heatmap_is_normalised_and_follows_the_token():
    # one layer, one step: token 1 attends to the top-left quadrant only
    probs = torch.zeros(1, 4, 4, 3)
    probs[..., 0] = 1.0
    probs[0, :2, :2, 0], probs[0, :2, :2, 1] = 0.0, 1.0
    heat = token_heatmap({"layer": [probs]}, [1], size=(8, 8))
    assert heat.shape == (1, 8, 8) and heat.min() == 0 and heat.max() == 1
    assert heat[0, :3, :3].min() > 0.9 and heat[0, 5:, 5:].max() < 0.1
    with pytest.raises(ValueError, match="no cross-attention maps were recorded"):
        token_heatmap({}, [1], size=(8, 8))


def test_latents_that_do_not_halve_evenly(unet):
    """600 x 800 px (a 75 x 100 latent): each downsampling rounds up, 38 x 50, 19 x 25, 10 x 13; one
    common ratio gave 38 x 51 and a reshape error mid-sampling."""
    from erasekit.attention import grid_shape

    assert [grid_shape((75, 100), n) for n in (7500, 1900, 475, 130)] == [(0, 75, 100), (1, 38, 50), (2, 19, 25),
                                                                          (3, 10, 13)]
    x, ctx = torch.randn(1, 4, 9, 13), torch.randn(1, 6, tiny.TINY_WIDTH)
    with torch.no_grad(), CrossAttentionCapture(unet) as cap:
        unet(x, 10, encoder_hidden_states=ctx)
    assert {tuple(m[0].shape[1:3]) for m in cap.maps.values()} == {(9, 13), (5, 7), (3, 4), (2, 2)}  # + the mid block
