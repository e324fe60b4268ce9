"""One Detect-and-Guide step in A1111 equals the same step in ComfyUI (within 1e-4), and DAG's edit stays
in the detected region.

Both adapters run on one LDM UNet (ComfyUI's, loaded from a tiny SD1 model) with the same latent,
noise level, prompt, negative, safety text and guideline: ComfyUI through the patch's
``sampler_post_cfg_function`` (``comfy.samplers.sampling_function``, real ComfyUI), A1111 through
:class:`A1111Dag`'s pre-hooks and CFG callbacks, driven as A1111's ``CFGDenoiser`` drives them
around a k-diffusion ``CompVisDenoiser`` (x0 = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma))).
A1111's ``modules`` are stand-ins for the three names the adapter imports; the web UI itself is
tested over HTTP in tests/a1111/.
"""

import sys
import types

import pytest
import torch

from erasekit import tiny
from tools.comfy_headless import from_pack


class CompVisDenoiser:
    """k-diffusion's eps -> x0 wrapper as A1111 builds it around an SD1 model: x0 = x - sigma
    eps(x / sqrt(sigma^2 + 1), t(sigma)). ComfyUI's ``BaseModel.apply_model`` computes the same formula;
    it does so here, so that the two hosts' UNet outputs are bit-identical and only the adapters differ
    (k-diffusion's own float order differs by ~4e-6, which SLD's scale of 2000 would magnify)."""

    def __init__(self, base_model):
        self.base_model = base_model

    def sigma_to_t(self, sigma):
        return self.base_model.model_sampling.timestep(sigma).float()

    def __call__(self, x, sigma, cond):
        return self.base_model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"][0])


class Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def a1111_step(A1111Dag, base_model, x, sigma, cond, uncond, safety, emb, guidance, scale):
    """A1111's CFGDenoiser for one step of a batch of one: rows [prompt, negative], the callbacks in order."""
    denoiser = Params(inner_model=CompVisDenoiser(base_model), sampler=None)
    sd_model = Params(model=Params(diffusion_model=base_model.diffusion_model), get_learned_conditioning=lambda text: safety)
    p = Params(sd_model=sd_model, cfg_scale=scale, width=64, height=64)
    dag = A1111Dag(p, [emb], guidance, "safety text")
    x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
    image_cond = torch.zeros(2, 5, 1, 1)
    with dag:
        dag.on_denoiser(Params(x=x_in, sigma=sigma_in, image_cond=image_cond, text_cond=cond, text_uncond=uncond,
                               denoiser=denoiser, total_sampling_steps=1))
        with torch.no_grad():
            out = denoiser.inner_model(x_in, sigma_in, cond={"c_crossattn": [torch.cat([cond, uncond])]})
        dag.on_denoised(Params(x=out))
        cfg = out[1:] + (out[:1] - out[1:]) * scale
        after = Params(x=cfg)
        dag.on_after_cfg(after)
    assert dag.error is None, dag.error
    return after.x, cfg, dag.session.log


@pytest.fixture
def a1111_modules(monkeypatch):
    """``modules.prompt_parser.SdConditioning``, ``modules.shared`` and ``modules.errors``, as the adapter uses them."""
    modules = types.ModuleType("modules")
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.SdConditioning = lambda prompts, width=None, height=None: list(prompts)
    for name, mod in (("modules", modules), ("modules.prompt_parser", prompt_parser),
                      ("modules.shared", types.ModuleType("modules.shared")),
                      ("modules.errors", types.ModuleType("modules.errors"))):
        monkeypatch.setitem(sys.modules, name, mod)
    modules.prompt_parser = prompt_parser


@pytest.mark.parametrize("mode", ["dag", "sega", "sld"])
def test_one_guided_step_equals_comfyui(comfy, a1111_modules, mode):
    import comfy.sampler_helpers
    import comfy.samplers

    load_diffusers_unet = from_pack("nodes.comfy_bridge", "load_diffusers_unet")
    install = from_pack("nodes.dag_patch", "install")
    A1111Dag = from_pack("a1111.dag_hooks", "A1111Dag")
    from erasekit.dag.guidance import DagSettings, Guidance, SegaSettings, SldSettings
    from erasekit.dag.guideline import GuidelineEmbedding

    parts = tiny.build("sd_v1", seed=5)
    width = parts["unet"].config.cross_attention_dim
    patcher = load_diffusers_unet(parts["unet"], parts["scheduler"])
    torch.manual_seed(0)
    cond, uncond, safety = (torch.randn(1, 7, width) for _ in range(3))
    # a guideline whose keys are the prompt's own tokens, with a low gate: it detects in this random model
    emb = GuidelineEmbedding(cond[0, 1:3].clone(), cond[0, 0].clone(), "x", "sd_v1")
    emb.gate, emb.floor = 0.05, 0.0
    dag = DagSettings(warmup_fraction=0.0, tau_high=0.9, tau_low=0.6)  # a small region of this map
    sld = SldSettings.preset("strong")
    sld.warmup_steps = 0
    x = torch.randn(1, 4, 16, 16)
    sigma = patcher.model.model_sampling.sigmas[600:601].clone()
    scale = 6.0

    guided_a1111, cfg_a1111, log = a1111_step(A1111Dag, patcher.model, x, sigma, cond, uncond,
                                              safety, emb, Guidance(mode, dag, SegaSettings(), sld), scale)

    m = install(patcher, [emb], [[safety, {}]], mode=mode, dag=dag, sld=sld)
    m.model.current_patcher = m  # what ComfyUI's sampler sets once the model is loaded
    conds = [comfy.samplers.encode_model_conds(m.model.extra_conds, comfy.sampler_helpers.convert_cond([[c, {}]]), x,
                                               x.device, kind) for c, kind in ((cond, "positive"), (uncond, "negative"))]
    with torch.no_grad():
        guided_comfy = comfy.samplers.sampling_function(m.model, x, sigma, conds[1], conds[0], scale, m.model_options)

    assert log.guided_steps == 1 and log.extra_passes == 1  # the step was guided, not plain CFG
    edit = (guided_a1111 - cfg_a1111).abs().max()
    assert edit > 1e-2
    assert torch.allclose(guided_a1111, guided_comfy, atol=1e-4), (guided_a1111 - guided_comfy).abs().max()
    if mode == "dag":  # Eq. 4 edits the detected region only (A-hat >= tau_low); the rest is A1111's CFG, bit for bit
        outside = (log.seen < dag.tau_low)[:, None].expand_as(cfg_a1111)
        assert 0 < outside.sum() < outside.numel()
        assert torch.equal(guided_a1111[outside], cfg_a1111[outside])
        assert (guided_a1111[~outside] - cfg_a1111[~outside]).abs().max() > 1e-2


def test_second_order_samplers_count_steps_not_model_calls(comfy, a1111_modules, monkeypatch):
    """Heun and the other second-order samplers call the model twice a step (A1111's ``total_steps`` = 2 x
    steps): warm-up and SLD's schedule must see the step, or the warm-up would end halfway."""
    load_diffusers_unet = from_pack("nodes.comfy_bridge", "load_diffusers_unet")
    A1111Dag = from_pack("a1111.dag_hooks", "A1111Dag")
    from erasekit.dag.guidance import Guidance, SegaSettings, SldSettings
    from erasekit.dag.session import DagSession

    parts = tiny.build("sd_v1", seed=5)
    patcher = load_diffusers_unet(parts["unet"], parts["scheduler"])
    width = parts["unet"].config.cross_attention_dim
    cond, uncond, safety = (torch.randn(1, 7, width) for _ in range(3))
    seen = []
    monkeypatch.setattr(DagSession, "step", lambda self, i, pred_cfg, *a, **k: seen.append((i, self.n_steps)) or pred_cfg)
    sd_model = Params(model=Params(diffusion_model=patcher.model.diffusion_model), get_learned_conditioning=lambda t: safety)
    dag = A1111Dag(Params(sd_model=sd_model, cfg_scale=5.0, width=64, height=64), [],
                   Guidance("sld", sld=SldSettings.preset("medium"), sega=SegaSettings()), "safety text")
    denoiser = Params(inner_model=CompVisDenoiser(patcher.model), sampler=None, total_steps=10)
    x = torch.randn(2, 4, 8, 8)
    with dag:
        for _ in range(10):
            dag.on_denoiser(Params(x=x, sigma=torch.ones(2), image_cond=torch.zeros(2, 5, 1, 1), text_cond=cond,
                                   text_uncond=uncond, denoiser=denoiser, total_sampling_steps=5))
            dag.on_denoised(Params(x=x))
            dag.on_after_cfg(Params(x=x[:1]))
    assert dag.error is None and seen == [(i // 2, 5) for i in range(10)]


def test_a_skipped_negative_is_computed_for_the_guidance(comfy, a1111_modules):
    """With NGMS or Skip Early CFG, A1111 puts the prompt's prediction where the negative's goes and combines
    at CFG 1; the guided step must use the real negative (an extra pass) and CFG 1, as ComfyUI would at CFG 1."""
    import comfy.sampler_helpers
    import comfy.samplers

    load_diffusers_unet = from_pack("nodes.comfy_bridge", "load_diffusers_unet")
    install = from_pack("nodes.dag_patch", "install")
    A1111Dag = from_pack("a1111.dag_hooks", "A1111Dag")
    from erasekit.dag.guidance import Guidance, SegaSettings, SldSettings

    parts = tiny.build("sd_v1", seed=5)
    width = parts["unet"].config.cross_attention_dim
    patcher = load_diffusers_unet(parts["unet"], parts["scheduler"])
    torch.manual_seed(0)
    cond, uncond, safety = (torch.randn(1, 7, width) for _ in range(3))
    x, sigma = torch.randn(1, 4, 16, 16), patcher.model.model_sampling.sigmas[600:601].clone()
    base = patcher.model
    denoiser = Params(inner_model=CompVisDenoiser(base), sampler=None)
    sd_model = Params(model=Params(diffusion_model=base.diffusion_model), get_learned_conditioning=lambda text: safety)
    p = Params(sd_model=sd_model, cfg_scale=6.0, width=64, height=64, extra_generation_params={"NGMS": 3.0})
    dag = A1111Dag(p, [], Guidance("sega", sega=SegaSettings(), sld=SldSettings.preset("medium")), "safety text")
    with dag:
        dag.on_denoiser(Params(x=torch.cat([x, x]), sigma=torch.cat([sigma, sigma]), image_cond=torch.zeros(2, 5, 1, 1),
                               text_cond=cond, text_uncond=uncond, denoiser=denoiser, total_sampling_steps=1))
        with torch.no_grad():
            x_out = denoiser.inner_model(x, sigma, cond={"c_crossattn": [cond]})  # the negative skipped ...
        dag.on_denoised(Params(x=torch.cat([x_out, x_out])))  # ... and the prompt's copied in its place
        after = Params(x=x_out)  # CFG at 1
        dag.on_after_cfg(after)
    assert dag.error is None and dag.session.log.extra_passes == 1

    m = install(patcher, [], [[safety, {}]], mode="sega")
    m.model.current_patcher = m
    m.model_options["disable_cfg1_optimization"] = True  # ComfyUI at CFG 1 with the negative computed
    conds = [comfy.samplers.encode_model_conds(m.model.extra_conds, comfy.sampler_helpers.convert_cond([[c, {}]]), x,
                                               x.device, kind) for c, kind in ((cond, "positive"), (uncond, "negative"))]
    with torch.no_grad():
        expected = comfy.samplers.sampling_function(m.model, x, sigma, conds[1], conds[0], 1.0, m.model_options)
    assert (after.x - x_out).abs().max() > 1e-2
    assert torch.allclose(after.x, expected, atol=1e-4), (after.x - expected).abs().max()
