"""SDXL through erasekit's own code (a random tiny model with SDXL's layout: two text encoders
whose states are concatenated, a pooled embedding and size ids): Detect-and-Guide's diffusers
path, guideline training, and INPO training with an SDXL LoRA export."""

import os

import pytest
import torch

from erasekit import checkpoints, tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red circle and a blue square", "a green star"]


def tiny_sdxl():
    from diffusers import DDIMScheduler
    from transformers import AutoTokenizer

    from erasekit.models import Components

    torch.set_num_threads(1)
    p = tiny.build("sdxl", seed=0)
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "models", "toy", "tokenizer"))  # the toy's words
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    arch = checkpoints.sdxl((tiny.TINY_WIDTH, tiny.TINY_WIDTH_2))
    return Components(p["unet"], [p["text_encoder"], p["text_encoder_2"]], [tok, tok], p["vae"], sched, arch)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def test_conditioning_is_diffusers_sdxl_encoding(sdxl):
    from diffusers import StableDiffusionXLPipeline

    from erasekit.dag.conditioning import encode, unconditional

    c = encode(sdxl, PROMPTS, (8, 8))
    width = tiny.TINY_WIDTH + tiny.TINY_WIDTH_2
    assert c.states.shape == (2, sdxl.tokenizer.model_max_length, width) and c.pooled.shape[0] == 2
    assert c.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # 8x8 latents, the VAE's 8x downsampling
    pipe = StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoders[0],
                                     text_encoder_2=sdxl.text_encoders[1], tokenizer=sdxl.tokenizer,
                                     tokenizer_2=sdxl.tokenizers[1], unet=sdxl.unet, scheduler=sdxl.scheduler)
    ref, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1)
    assert torch.equal(c.states, ref) and torch.equal(c.pooled, pooled)
    u = unconditional(sdxl, c, (8, 8))
    assert torch.equal(u.states, neg) and torch.equal(u.pooled, neg_pooled)  # zeros, as diffusers' pipeline
    from erasekit.dag.sampling import sample

    assert sample(pipe, PROMPTS, [1, 2], steps=2).images.shape[:2] == (2, 3)  # the pipeline object itself


def test_dag_on_sdxl_lazy_and_guided(sdxl):
    """Plain CFG runs with SDXL's extra inputs; DAG with nothing detected is bit-identical to it and
    runs no extra pass; SEGA's safety pass (all rows) and DAG's (the detected rows) change the image."""
    from erasekit.dag.guidance import DagSettings
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase_for
    from erasekit.dag.sampling import sample

    sink, tokens = encode_phrase_for(sdxl, "red circle")
    assert tokens.shape == (2, tiny.TINY_WIDTH + tiny.TINY_WIDTH_2)
    quiet = GuidelineEmbedding(tokens, sink, "red circle", "sdxl_base_v1-0", gate=0.999, floor=0.0)
    kw = dict(steps=3, cfg=5.0, safety_text="red circle")
    plain = sample(sdxl, PROMPTS, [1, 2], embeddings=[quiet], keep_maps=True, **kw)
    assert plain.images.shape[0] == 2 and len(plain.detection_maps) == 3
    lazy = sample(sdxl, PROMPTS, [1, 2], mode="dag", embeddings=[quiet], **kw)
    assert torch.equal(lazy.images, plain.images) and lazy.extra_passes == 0
    sega = sample(sdxl, PROMPTS, [1, 2], mode="sega", **kw)
    assert sega.extra_passes > 0 and not torch.equal(sega.images, plain.images)
    # a gate every map passes, min-max maps, and an edit region of the upper half of each map (under the
    # AreaScaler's 80% rule): DAG edits the detected rows
    loud = GuidelineEmbedding(tokens, sink, "red circle", "sdxl_base_v1-0", gate=1e-3, floor=None)
    guided = sample(sdxl, PROMPTS, [1, 2], mode="dag", embeddings=[loud],
                    dag=DagSettings(warmup_fraction=0.0, tau_low=0.5), **kw)
    assert guided.extra_passes > 0 and not torch.equal(guided.images, plain.images)


def test_guideline_training_on_sdxl(sdxl, tmp_path):
    from erasekit.dag.fit import fit_guideline
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.erase.data import EraseData, make_image_set
    from erasekit.errors import ArchitectureError

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 1, 64, 64)
    masks[..., 16:40, 16:40] = 1.0
    data = EraseData("red circle",
                     make_image_set(sdxl, images[:2], ["a red circle", "a red circle on a dotted background"], masks),
                     make_image_set(sdxl, images[2:], ["a blue square"]), ["blue square"])
    emb = fit_guideline(sdxl, data, "red circle", steps=6, log=lambda m: None)
    assert emb.width == tiny.TINY_WIDTH + tiny.TINY_WIDTH_2 and emb.architecture == "sdxl_base_v1-0"
    back = GuidelineEmbedding.load(emb.save(str(tmp_path / "g.safetensors")), sdxl.architecture)
    assert torch.equal(back.tokens, emb.tokens.float())
    sd1 = checkpoints.detect_architecture({k: list(v.shape) for k, v in tiny.build("sd_v1")["unet"].state_dict().items()},
                                          "a tiny SD1 UNet")
    with pytest.raises(ArchitectureError, match="width"):
        GuidelineEmbedding.load(str(tmp_path / "g.safetensors"), sd1)


def test_inpo_trains_and_exports_an_sdxl_lora(tmp_path):
    """The data carries SDXL's conditioning, INPO trains on it, and the exported LoRA is an SDXL LoRA
    that changes an SDXL UNet's output (and is refused by an SD1 one)."""
    from erasekit import lora_io
    from erasekit.erase.data import EraseData, make_image_set
    from erasekit.erase.engine import TrainConfig, train
    from erasekit.erase.inpo import InpoObjective
    from erasekit.errors import ArchitectureError

    comps = tiny_sdxl()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 1, 64, 64)
    masks[..., 16:40, 16:40] = 1.0
    forget = make_image_set(comps, images[:2], ["a red circle"] * 2, masks)
    preserve = make_image_set(comps, images[2:], ["a blue square"] * 2)
    assert forget.pooled.shape == (2, tiny.TINY_WIDTH_2) and forget.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    data = EraseData("red circle", forget, preserve, ["blue square"])
    cfg = TrainConfig(out=str(tmp_path / "run"), target="red circle", steps=2, batch_size=1, lr=1e-2,
                      checkpoint_every=2, tensorboard=False, export=True)
    result = train(cfg, InpoObjective(), data, comps)
    assert lora_io.check_compatible(str(result.lora), comps.architecture) == "sdxl"
    sd1 = checkpoints.detect_architecture({k: list(v.shape) for k, v in tiny.build("sd_v1")["unet"].state_dict().items()},
                                          "a tiny SD1 UNet")
    with pytest.raises(ArchitectureError, match="SDXL|XL"):
        lora_io.check_compatible(str(result.lora), sd1)
    fresh = tiny_sdxl()
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    kw = {"encoder_hidden_states": forget.embeds[:1], "added_cond_kwargs": {"text_embeds": forget.pooled[:1],
                                                                             "time_ids": forget.time_ids[:1]}}
    with torch.no_grad():
        before = fresh.unet(x, t, **kw).sample
        assert lora_io.apply_lora(fresh.unet, lora_io.load_lora(str(result.lora))[0]) > 0
        after = fresh.unet(x, t, **kw).sample
    assert not torch.allclose(before, after)


def test_sdxl_folder_through_the_cli(tmp_path):
    """A user's SDXL diffusers folder and folders of images: `trainer guideline` and `trainer train`
    (then --resume from the cached data, which keeps SDXL's conditioning) end with SDXL files."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from erasekit import lora_io
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.erase.data import DataConfig, build_erase_data
    from trainer.cli import main

    c = tiny_sdxl()
    StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                              tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet,
                              scheduler=c.scheduler).save_pretrained(tmp_path / "xl")
    forget, keep = tmp_path / "forget", tmp_path / "keep"
    forget.mkdir(), keep.mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 16:40] = 255
    for i in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(forget / f"{i}.png")
        Image.fromarray(mask).save(forget / f"{i}_mask.png")
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(keep / f"{i}.png")
    common = ["--target", "red circle", "--base", str(tmp_path / "xl"), "--forget-dir", str(forget),
              "--preserve-dir", str(keep)]
    assert main(["guideline", *common, "--steps", "4", "--out", str(tmp_path / "g.safetensors")]) == 0
    assert GuidelineEmbedding.load(str(tmp_path / "g.safetensors")).width == tiny.TINY_WIDTH + tiny.TINY_WIDTH_2
    run = tmp_path / "run"
    assert main(["train", *common, "--steps", "2", "--out", str(run)]) == 0
    assert main(["train", *common, "--steps", "3", "--out", str(run), "--resume"]) == 0
    lora = run / "erase-red-circle-inpo.safetensors"
    assert lora_io.check_compatible(str(lora), c.architecture) == "sdxl"
    # images without masks get them from the guideline: its detection runs the SDXL UNet with its extra inputs
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(bare / f"{i}.png")
    # a wide photo: SDXL's size ids carry its size and where the centre crop began, as SDXL was trained
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(bare / "wide.png")
    said = []
    for forget_dir in (str(bare), None):  # a user's folder, or images the model draws
        cfg = DataConfig(forget_dir=forget_dir, forget_images=2, sample_steps=2, preserve_dir=str(keep),
                         mask_from="guideline", guideline=str(tmp_path / "g.safetensors"))
        data = build_erase_data(c, "red circle", cfg, log=said.append)
        assert data.forget.masks.shape == (2 if forget_dir is None else 3, 1, 8, 8)
        if forget_dir:
            assert data.forget.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2 + [[64, 96, 0, 16, 64, 64]]
        else:
            assert data.forget.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert sum("masks: the guideline 'red circle' found the concept in" in m for m in said) == 2


def test_sampling_in_half_precision():
    """A pipeline loaded in bfloat16 (as users load fp16 on GPUs) samples under CFG and DAG: the noise is
    drawn in float32 and moved to the UNet's dtype (a float32 latent met bf16 weights before)."""
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase_for
    from erasekit.dag.sampling import sample

    comps = tiny_sdxl()
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        module.to(torch.bfloat16)
    sink, tokens = encode_phrase_for(comps, "red circle")
    emb = GuidelineEmbedding(tokens.float(), sink.float(), "red circle", "sdxl")
    for mode in ("cfg", "dag"):
        r = sample(comps, PROMPTS, [1, 2], steps=2, mode=mode, safety_text="red circle", embeddings=[emb])
        assert r.images.shape[:2] == (2, 3) and torch.isfinite(r.images).all()
