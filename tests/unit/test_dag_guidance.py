"""DAG's guidance maths on hand-computed cases (Eq. 4-5, Table 1, Alg. 1) and its peers."""

import pytest
import torch

from erasekit.dag.guidance import (
    DagSettings,
    SegaSettings,
    SldSettings,
    SldState,
    area_scaler,
    dag_combine,
    dag_scale_map,
    detected_rows,
    magnitude_scaler,
    sega_combine,
    sld_combine,
    top_p_mask,
)


def test_magnitude_scaler_clamps_to_1_5_above_tau():
    a = torch.tensor([[[0.0, 0.005, 0.01, 0.02, 0.04, 0.5, 1.0]]])
    assert magnitude_scaler(a).tolist() == [[[0.0, 0.0, 1.0, 2.0, 4.0, 5.0, 5.0]]]


def test_area_scaler_gives_each_object_5x_its_area_fraction():
    a = torch.zeros(1, 10, 10)
    a[0, 0:2, 0:2] = 0.9  # object 1: 4 px
    a[0, 5:8, 5:8] = 0.8  # object 2: 9 px
    s = area_scaler(a)
    assert s[0, 0, 0].item() == pytest.approx(5 * 4 / 100)
    assert s[0, 6, 6].item() == pytest.approx(5 * 9 / 100)
    assert s[0, 9, 0].item() == 0  # outside the editing region (A < 0.01)


def test_area_scaler_fills_the_editing_region_from_the_nearest_object():
    a = torch.zeros(1, 10, 10)
    a[0, 0:2, 0:2] = 0.9
    a[0, 0:2, 2:4] = 0.05  # weakly detected neighbourhood of object 1
    s = area_scaler(a)
    assert s[0, 1, 3].item() == pytest.approx(5 * 4 / 100)


def test_area_scaler_skips_when_the_edit_region_covers_80_percent():
    a = torch.full((2, 10, 10), 0.02)
    a[:, 0:3, 0:3] = 0.9
    a[1, 5:, :] = 0.0  # second image: editing region only 50%
    s = area_scaler(a)
    assert s[0].abs().sum() == 0 and s[1].abs().sum() > 0


def test_scale_map_is_area_times_magnitude():
    a = torch.zeros(1, 4, 4)
    a[0, 0, 0], a[0, 0, 1] = 1.0, 0.6
    s = dag_scale_map(a)
    assert s[0, 0, 0].item() == pytest.approx(5 * 2 / 16 * 5)
    assert s[0, 0, 1].item() == pytest.approx(5 * 2 / 16 * 5)


def test_zero_scale_is_plain_cfg_exactly_and_detection_drives_the_edit():
    torch.manual_seed(0)
    x0_u, x0_p, x0_cs = torch.randn(3, 1, 4, 8, 8)
    x0_cfg = x0_u + 7.5 * (x0_p - x0_u)
    nothing = torch.zeros(1, 8, 8)
    assert detected_rows(nothing, DagSettings()) == []
    assert torch.equal(dag_combine(x0_cfg, x0_u, x0_cs, nothing, 7.5, DagSettings()), x0_cfg)
    a = torch.zeros(1, 8, 8)
    a[0, 2:4, 2:4] = 1.0
    assert detected_rows(a, DagSettings()) == [0]
    out = dag_combine(x0_cfg, x0_u, x0_cs, a, 7.5, DagSettings())
    expected = x0_cfg[..., 2, 2] - 7.5 * (5 * 4 / 64 * 5) * (x0_cs - x0_u)[..., 2, 2]
    assert torch.allclose(out[..., 2, 2], expected)
    assert torch.equal(out[..., 7, 7], x0_cfg[..., 7, 7])  # outside the detected region: untouched


def test_top_p_mask_keeps_the_largest_fraction_per_channel():
    d = torch.arange(100.0).view(1, 1, 10, 10)
    assert top_p_mask(d, 0.9).sum() == 10 and top_p_mask(d, 0.0).all()


def test_sld_matches_its_noise_space_definition():
    torch.manual_seed(1)
    eps_u, eps_p, eps_s = torch.randn(3, 1, 4, 4, 4) * 0.1
    s = SldSettings.preset("medium")
    # noise-space reference (SLD / diffusers' safe pipeline), first step, no momentum yet
    diff = eps_p - eps_s
    scale = torch.where(diff >= s.threshold, torch.zeros_like(diff), torch.clamp(diff.abs() * s.guidance_scale, max=1.0))
    ref = eps_u + 7.5 * ((eps_p - eps_u) - scale * (eps_s - eps_u))
    out = sld_combine(eps_u, eps_p, eps_s, -1.0, 7.5, 10, s, SldState())
    assert torch.allclose(out, ref, atol=1e-6)
    # and in x0 space with sigma = 2, x0 = x - 2 eps
    x = torch.randn(1, 4, 4, 4)
    x0 = sld_combine(x - 2 * eps_u, x - 2 * eps_p, x - 2 * eps_s, 2.0, 7.5, 10, s, SldState())
    assert torch.allclose(x0, x - 2 * ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown SLD preset"):
        SldSettings.preset("extreme")


def test_sega_edits_only_its_top_fraction():
    x0_u, x0_cs = torch.zeros(1, 1, 10, 10), torch.arange(100.0).view(1, 1, 10, 10)
    out = sega_combine(torch.zeros(1, 1, 10, 10), x0_u, x0_cs, 2.0, SegaSettings(edit_scale=1.0, threshold=0.9))
    assert (out != 0).sum() == 10 and out.min() == -2 * 99


def test_one_step_of_each_mode_calls_the_safety_pass_only_when_it_guides():
    from erasekit.dag.guidance import Guidance

    torch.manual_seed(0)
    eps_u, eps_p, eps_s = torch.randn(3, 2, 4, 8, 8)
    eps_cfg = eps_u + 7.5 * (eps_p - eps_u)
    calls = []

    def safety_pass(rows):
        calls.append(rows)
        return eps_s if rows is None else eps_s[rows]

    assert Guidance("cfg").apply(eps_cfg, eps_u, eps_p, safety_pass, 10, 25, 7.5) == (eps_cfg, False)
    assert Guidance("sega").apply(eps_cfg, eps_u, eps_p, safety_pass, 4, 25, 7.5) == (eps_cfg, False)  # warm-up 5 of 25
    assert Guidance("dag").apply(eps_cfg, eps_u, eps_p, safety_pass, 10, 25, 7.5, a_hat=torch.zeros(2, 8, 8)) \
        == (eps_cfg, False)
    assert calls == []
    a = torch.zeros(2, 8, 8)
    a[1, 2:4, 2:4] = 1.0
    out, guided = Guidance("dag").apply(eps_cfg, eps_u, eps_p, safety_pass, 10, 25, 7.5, a_hat=a)
    assert guided and calls == [[1]] and torch.equal(out[0], eps_cfg[0]) and not torch.equal(out[1], eps_cfg[1])
    # SLD's preset counts warm-up steps of 50: medium's 10 are 5 of 25
    g = Guidance("sld", sld=SldSettings.preset("medium"))
    out, guided = g.apply(eps_cfg, eps_u, eps_p, safety_pass, 4, 25, 7.5)
    assert torch.equal(out, eps_cfg) and not guided
    out, guided = g.apply(eps_cfg, eps_u, eps_p, safety_pass, 5, 25, 7.5)
    assert not torch.equal(out, eps_cfg) and guided
