"""The configs Erasekit ships in models/configs, which single-file checkpoints load with, offline.

Mistakes in such configs are silent (a wrong head count or prediction type still loads), so each is
checked against what others use: full-size models built from them on the meta device (no memory)
have the published parameter counts and exactly the layout that diffusers' own LDM -> diffusers
conversion makes of a real checkpoint, whose layout comes from ComfyUI's model definitions; the
values equal the diffusers configs Forge ships; the tokenizers load offline; the SD2 768-v / 512 base
choice follows diffusers' rule; a missing file is named."""

import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tarfile
import time

import pytest
import torch

from erasekit import checkpoints, models
from erasekit.errors import ArchitectureError, ModelFileError
from tools import REPO
from tools.comfy_headless import COMFY_DIR

ARCHS = ("sd_v1", "sd_v2", "sd_v2_base", "sdxl_base_v1-0")
TEXT_ENCODERS = {"sd_v1": ["text_encoder"], "sd_v2": ["text_encoder"], "sd_v2_base": ["text_encoder"],
                 "sdxl_base_v1-0": ["text_encoder", "text_encoder_2"]}
# Published sizes (SD1.5 860M UNet, CLIP ViT-L/14 text 123M, OpenCLIP ViT-H/14 text less its last layer as SD2
# uses it, OpenCLIP ViT-bigG/14 text with projection, SD's VAE 84M), measured here on meta to the weight.
PARAMETERS = {
    "sd_v1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd_v2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd_v2_base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl_base_v1-0": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                       "text_encoder_2": 694_659_840},
}
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's BPE: <start> a photo of a cat <end>


def folder(arch: str) -> str:
    return os.path.join(models.CONFIGS_DIR, arch)


def read_json(*parts: str) -> dict:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def meta_parts(arch: str) -> dict:
    """The full-size UNet, VAE and text encoder(s) of a shipped config, on the meta device."""
    from accelerate import init_empty_weights

    index = read_json(folder(arch), "model_index.json")
    parts = {}
    with init_empty_weights():
        for name in ("unet", "vae", *TEXT_ENCODERS[arch]):
            library, class_name = index[name]
            cls = getattr(importlib.import_module(library), class_name)
            path = os.path.join(folder(arch), name)
            parts[name] = (cls.from_config(cls.load_config(path)) if library == "diffusers"
                           else cls(cls.config_class.from_pretrained(path)))
    return parts


def shapes_of(state_dict: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- the files themselves


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_folder_is_complete_and_has_no_weights(arch):
    assert models.missing_config_file(folder(arch)) is None
    for _, _, names in os.walk(folder(arch)):
        assert not [n for n in names if n.endswith((".safetensors", ".bin", ".ckpt", ".pt"))]


def test_clip_vocabulary_is_kept_once():
    found = [os.path.join(d, n) for d, _, names in os.walk(models.CONFIGS_DIR) for n in names
             if n in ("vocab.json", "merges.txt")]
    assert sorted(os.path.relpath(p, models.CONFIGS_DIR) for p in found) == [
        os.path.join("clip_bpe", "merges.txt"), os.path.join("clip_bpe", "vocab.json")]
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(models.CONFIGS_DIR) for n in names)
    assert total < 1_700_000  # the vocabulary (1.58 MB) and a few kB of JSON


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_models_have_the_published_parameter_counts(arch):
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in meta_parts(arch).items()}
    assert counts == PARAMETERS[arch]


# Values that change what a model computes without changing any shape (so the layout tests cannot see them),
# as the releases' configs have them (checked against Forge's copies below, where its archive is present).
UNSEEN = {
    "sd_v1": {"unet/config.json": {"attention_head_dim": 8, "sample_size": 64},
              "text_encoder/config.json": {"hidden_act": "quick_gelu", "eos_token_id": 2},
              "vae/config.json": {"scaling_factor": None},
              "scheduler/scheduler_config.json": {"prediction_type": None, "beta_start": 0.00085, "beta_end": 0.012,
                                                  "beta_schedule": "scaled_linear"}},
    "sd_v2": {"unet/config.json": {"attention_head_dim": [5, 10, 20, 20], "upcast_attention": True, "sample_size": 96},
              "text_encoder/config.json": {"hidden_act": "gelu", "eos_token_id": 2},
              "vae/config.json": {"scaling_factor": None},
              "scheduler/scheduler_config.json": {"prediction_type": "v_prediction", "beta_start": 0.00085,
                                                  "beta_end": 0.012, "beta_schedule": "scaled_linear"}},
    "sdxl_base_v1-0": {"unet/config.json": {"attention_head_dim": [5, 10, 20], "upcast_attention": None,
                                            "sample_size": 128, "addition_time_embed_dim": 256},
                       "text_encoder/config.json": {"hidden_act": "quick_gelu", "eos_token_id": 2},
                       "text_encoder_2/config.json": {"hidden_act": "gelu", "eos_token_id": 2},
                       "vae/config.json": {"scaling_factor": 0.13025, "force_upcast": True},
                       "scheduler/scheduler_config.json": {"prediction_type": "epsilon", "beta_start": 0.00085,
                                                           "beta_end": 0.012, "timestep_spacing": "leading"}},
}


@pytest.mark.parametrize("arch", sorted(UNSEEN))
def test_values_that_shapes_do_not_show(arch):
    for rel, values in UNSEEN[arch].items():
        config = read_json(folder(arch), rel)
        assert {k: config.get(k) for k in values} == values, rel  # None: absent, the library default applies


def test_sd2_base_differs_from_768_v_only_in_size_and_prediction():
    """The 512 base release (stabilityai/stable-diffusion-2-1-base) is the 768-v one's network, trained at
    512 with epsilon prediction; its published configs differ in these values only (its VAE config says 768 too)."""
    expected = {
        ("model_index.json", "scheduler"): (["diffusers", "DDIMScheduler"], ["diffusers", "PNDMScheduler"]),
        ("unet/config.json", "sample_size"): (96, 64),
        ("unet/config.json", "upcast_attention"): (True, False),
        ("scheduler/scheduler_config.json", "_class_name"): ("DDIMScheduler", "PNDMScheduler"),
        ("scheduler/scheduler_config.json", "prediction_type"): ("v_prediction", "epsilon"),
    }
    diffs = {}
    for d, _, names in os.walk(folder("sd_v2")):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), folder("sd_v2")).replace(os.sep, "/")
            a, b = read_json(folder("sd_v2"), rel), read_json(folder("sd_v2_base"), rel)
            diffs |= {(rel, k): (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert diffs == expected


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizers_load_offline_and_encode_as_clip(arch, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    toks = models.shipped_tokenizers(folder(arch))
    assert sorted(toks) == (["tokenizer", "tokenizer_2"] if arch.startswith("sdxl") else ["tokenizer"])
    for name, tok in toks.items():
        assert tok("a photo of a cat").input_ids == CAT_IDS
        assert tok.model_max_length == 77
        # SD2's OpenCLIP and SDXL's second encoder pad with "!" (id 0), CLIP-L with its end token
        open_clip = arch.startswith("sd_v2") or name == "tokenizer_2"
        assert (tok.pad_token, tok.pad_token_id) == (("!", 0) if open_clip else ("<|endoftext|>", 49407))
        padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert padded[:7] == CAT_IDS and set(padded[7:]) == {tok.pad_token_id} and len(padded) == 77


def _no_network(*args, **kwargs):
    raise AssertionError("single-file loading tried to reach the network")


# ----------------------------------------------------------------------------- the SD2 variant


SD2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # diffusers' "v2" key


@pytest.mark.parametrize("step, spec, expected", [
    (None, None, "sd_v2"), (875000, None, "sd_v2_base"), (470000, None, "sd_v2"),
    (None, "stable-diffusion-v2-512", "sd_v2_base"), (875000, "stable-diffusion-v2-768-v", "sd_v2"),
])
def test_sd2_variant_follows_diffusers_rule(tmp_path, monkeypatch, step, spec, expected):
    from diffusers import DDIMScheduler
    from diffusers.loaders import single_file_utils as sfu

    tensors = {SD2_KEY: torch.zeros(8, 1024), "cond_stage_model.model.ln_final.weight": torch.zeros(1024)}
    if step is not None:
        tensors["global_step"] = torch.tensor(step)
    path = str(tmp_path / "sd2.safetensors")
    checkpoints.save_file_atomic(tensors, path, {"modelspec.architecture": spec} if spec else None)
    shapes, metadata = checkpoints.read_header(path)
    arch = checkpoints.detect_architecture(shapes, path)
    assert arch.name == "sd_v2"
    assert models.config_variant(arch, path, shapes, metadata) == expected
    ours = read_json(folder(expected), "scheduler", "scheduler_config.json")["prediction_type"]
    assert ours == ("epsilon" if expected == "sd_v2_base" else "v_prediction")
    if spec is None:  # where the file declares nothing, diffusers' own rule picks the same prediction type
        monkeypatch.setattr(sfu, "SCHEDULER_DEFAULT_CONFIG", dict(sfu.SCHEDULER_DEFAULT_CONFIG))  # it writes into it
        import safetensors.torch

        ckpt = safetensors.torch.load_file(path)
        assert sfu.infer_diffusers_model_type(ckpt) == "v2"
        assert sfu._legacy_load_scheduler(DDIMScheduler, ckpt, "scheduler").config.prediction_type == ours


def test_shipped_folders_are_the_releases_diffusers_itself_fetches():
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS as paths

    assert paths["v1"]["pretrained_model_name_or_path"].endswith("/stable-diffusion-v1-5")  # sd_v1
    assert paths["v2"]["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-2-1"  # sd_v2
    assert paths["xl_base"]["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"


# ----------------------------------------------------------------------------- errors


def _sd1_header_only(path) -> str:
    checkpoints.save_file_atomic({
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 32),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(32, 32, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32),
    }, str(path))
    return str(path)


@pytest.mark.parametrize("rel", ["model_index.json", "unet/config.json", "text_encoder/config.json",
                                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
                                 "../clip_bpe/vocab.json"])
def test_a_missing_shipped_file_is_named(tmp_path, monkeypatch, rel):
    root = tmp_path / "configs"
    shutil.copytree(models.CONFIGS_DIR, root)
    monkeypatch.setattr(models, "CONFIGS_DIR", str(root))
    monkeypatch.setattr(models, "CLIP_BPE_DIR", str(root / "clip_bpe"))
    missing = os.path.normpath(os.path.join(root, "sd_v1", rel))
    os.remove(missing)
    with pytest.raises(ModelFileError) as err:
        models.load(_sd1_header_only(tmp_path / "sd15.safetensors"))
    msg = str(err.value)
    assert f"the config file '{missing}' it needs is missing; restore models/configs" in msg
    assert "--model-config" in msg and msg.endswith(".") and "\n" not in msg


def test_a_missing_file_of_a_given_config_folder_is_named(tmp_path):
    user = tmp_path / "my-sd15"
    shutil.copytree(folder("sd_v1"), user)
    for f in ("vocab.json", "merges.txt"):  # a folder of one's own holds its tokenizer whole
        shutil.copy(os.path.join(models.CLIP_BPE_DIR, f), user / "tokenizer" / f)
    assert models.missing_config_file(str(user)) is None
    os.remove(user / "vae" / "config.json")
    with pytest.raises(ModelFileError, match=re.escape(f"the config file '{user / 'vae' / 'config.json'}' it needs "
                                                       "is missing; pass a complete diffusers folder")):
        models.load(_sd1_header_only(tmp_path / "sd15.safetensors"), config=str(user))


def test_a_file_that_does_not_fit_the_shipped_config_says_model_config(tmp_path, monkeypatch):
    """No config given and the Hub out of reach: the shipped config is used (no Hub), and a file that is
    not the released network (here a 3-tensor stub) is refused with the way out."""
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    with pytest.raises(ArchitectureError, match=re.escape(f"does not fit the config in '{folder('sd_v1')}'")
                       + r".*--model-config\.$"):
        models.load(_sd1_header_only(tmp_path / "sd15.safetensors"))


# ----------------------------------------------------------------------------- ComfyUI's layouts


@pytest.fixture(scope="module")
def comfy():
    if not os.path.isfile(os.path.join(COMFY_DIR, "comfy", "supported_models.py")):
        pytest.skip("ComfyUI's source is not unpacked (make setup)")
    if COMFY_DIR not in sys.path:
        sys.path.insert(0, COMFY_DIR)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported, as tools.comfy_headless does
    for name in ("clip_model", "diffusers_convert", "model_detection", "ops", "supported_models", "utils",
                 "ldm.models.autoencoder", "ldm.modules.diffusionmodules.openaimodel"):
        importlib.import_module("comfy." + name)
    return sys.modules["comfy"]


COMFY_MODEL = {"sd_v1": "SD15", "sd_v2": "SD20", "sd_v2_base": "SD20", "sdxl_base_v1-0": "SDXL"}
# (part, key prefix in an LDM checkpoint, ComfyUI's config of that encoder, OpenCLIP layout)
COMFY_TEXT = {
    "sd_v1": [("text_encoder", "cond_stage_model.transformer.", "sd1_clip_config.json", False)],
    "sd_v2": [("text_encoder", "cond_stage_model.model.", "text_encoders/sd2_clip_config.json", True)],
    "sdxl_base_v1-0": [("text_encoder", "conditioner.embedders.0.transformer.", "sd1_clip_config.json", False),
                       ("text_encoder_2", "conditioner.embedders.1.model.", "clip_config_bigg.json", True)],
}
COMFY_TEXT["sd_v2_base"] = COMFY_TEXT["sd_v2"]


def comfy_unet(comfy, arch):
    """ComfyUI's UNet of the architecture (its own full config, from its detection) on meta."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ours = meta_parts(arch)["unet"]
    config = comfy.model_detection.unet_config_from_diffusers_unet(ours.state_dict())
    assert config is not None, "ComfyUI knows no SD UNet of this layout"
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    assert type(model_config).__name__ == COMFY_MODEL[arch]
    with torch.device("meta"):
        ldm = UNetModel(**dict(config, dtype=torch.float32), device="meta", operations=comfy.ops.disable_weight_init)
    return config, ldm


def comfy_vae():
    """ComfyUI's SD VAE on meta, with the ddconfig its VAE loader uses for SD1.x / SD2.x / SDXL."""
    import ast

    from comfy.ldm.models.autoencoder import AutoencoderKL

    with open(os.path.join(COMFY_DIR, "comfy", "sd.py"), encoding="utf-8") as f:
        found = re.search(r"#default SD1\.x/SD2\.x VAE parameters\s*\n\s*ddconfig = (\{[^}]*\})", f.read())
    if found is None:
        pytest.skip("this ComfyUI's comfy/sd.py names its default VAE config differently")
    with torch.device("meta"):
        return AutoencoderKL(ddconfig=ast.literal_eval(found.group(1)), embed_dim=4)


def comfy_text_encoder(comfy, config_file, prefix, open_clip) -> tuple[dict, dict]:
    """(LDM checkpoint keys -> meta tensors, ComfyUI's config) of a text encoder as a real checkpoint
    stores it: CLIP-L as transformers names it, OpenCLIP through ComfyUI's own converter."""
    config = read_json(COMFY_DIR, "comfy", config_file)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    sd = model.state_dict()
    if not open_clip:
        return {prefix + k: v for k, v in sd.items() if not k.startswith("text_projection")}, config
    out = comfy.diffusers_convert.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in sd.items()})
    out = {k[len("transformer."):] if k.startswith("transformer.") and not k.startswith("transformer.resblocks")
           else k: v for k, v in out.items()}
    return {prefix + k: v for k, v in out.items()}, config


def ldm_layout(comfy, arch) -> dict:
    """Keys and meta tensors of a whole single-file checkpoint of the architecture, as ComfyUI lays it out."""
    _, unet = comfy_unet(comfy, arch)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in comfy_vae().state_dict().items()}
    for _, prefix, config_file, open_clip in COMFY_TEXT[arch]:
        sd |= comfy_text_encoder(comfy, config_file, prefix, open_clip)[0]
    return sd


@pytest.mark.parametrize("arch", ARCHS)
def test_unet_is_what_diffusers_converts_a_real_checkpoint_to(comfy, arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config, ldm = comfy_unet(comfy, arch)
    ours = meta_parts(arch)["unet"]
    want = shapes_of(ours.state_dict())
    # ComfyUI's supported model (SD15 / SD20 / SDXL) and its unet_config: channels, depths, context, linear proj, adm
    supported = getattr(comfy.supported_models, COMFY_MODEL[arch])
    assert {k: config[k] for k in supported.unet_config} == supported.unet_config
    # diffusers' own conversion of a checkpoint of ComfyUI's layout gives exactly our parameters
    ldm_sd = {"model.diffusion_model." + k: v for k, v in ldm.state_dict().items()}
    assert shapes_of(convert_ldm_unet_checkpoint(ldm_sd, dict(ours.config))) == want
    # and ComfyUI's own diffusers -> LDM key map sends each of ours onto its tensor of that shape
    key_map = comfy.utils.unet_to_diffusers(config)
    assert {key_map[k]: s for k, s in want.items()} == shapes_of(ldm.state_dict())
    # heads (invisible in shapes): ComfyUI's num_heads / num_head_channels against our attention_head_dim
    heads = {}
    for name, module in ours.named_modules():
        if name.endswith((".attn1", ".attn2")):
            theirs = ldm.get_submodule(key_map[name + ".to_q.weight"][: -len(".to_q.weight")])
            heads[name] = (module.heads, theirs.heads)
    assert heads and all(a == b for a, b in heads.values())
    # attention upcast: ComfyUI runs every SD2 UNet's attention in float32; SD2.1 768-v's config says so too
    if arch == "sd_v2":
        assert supported.unet_extra_config.get("attn_precision") == torch.float32 and ours.config.upcast_attention


@pytest.mark.parametrize("arch", ARCHS)
def test_vae_is_what_diffusers_converts_a_real_checkpoint_to(comfy, arch):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = meta_parts(arch)["vae"]
    ldm_sd = {"first_stage_model." + k: v for k, v in comfy_vae().state_dict().items()}
    assert shapes_of(convert_ldm_vae_checkpoint(ldm_sd, dict(ours.config))) == shapes_of(ours.state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_text_encoders_are_what_diffusers_converts_a_real_checkpoint_to(comfy, arch):
    from diffusers.loaders.single_file_utils import (
        SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    for part, prefix, config_file, open_clip in COMFY_TEXT[arch]:
        ours = meta_parts(arch)[part]
        ldm_sd, config = comfy_text_encoder(comfy, config_file, prefix, open_clip)
        if open_clip:
            converted = convert_open_clip_checkpoint(ours, ldm_sd, prefix=prefix)
        else:
            converted = convert_ldm_clip_checkpoint(ldm_sd, prefix)
        if not hasattr(ours, "text_model"):  # CLIPTextModel is flat in transformers >= 5.6, as diffusers handles
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        want, got = shapes_of(ours.state_dict()), shapes_of(converted)
        assert {k: got.get(k) for k in want} == want  # every parameter is in the checkpoint, of its shape
        # what diffusers converts beyond (it is not loaded): SD2's projection, which CLIPTextModel lacks
        assert set(got) - set(want) <= {"text_projection.weight"}
        mine = ours.config
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "vocab_size",
                      "max_position_embeddings", "layer_norm_eps"):
            assert getattr(mine, field) == config[field], (part, field)
        dropped = {k for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE if k.startswith(prefix)}
        # SD2 uses OpenCLIP-H's penultimate layer: diffusers drops the last of ComfyUI's 24, our config has 23
        assert mine.num_hidden_layers == config["num_hidden_layers"] - (1 if dropped else 0)


# ----------------------------------------------------------------------------- Forge's copies


FORGE_TARBALL = os.path.join(os.environ.get("ERASEKIT_A1111_SOURCES") or os.path.join(REPO, "..", "shared", "a1111"),
                             "stable-diffusion-webui-forge-dfdcbab.tar.gz")
FORGE = {"sd_v1": "runwayml/stable-diffusion-v1-5", "sd_v2": "stabilityai/stable-diffusion-2-1",
         "sdxl_base_v1-0": "stabilityai/stable-diffusion-xl-base-1.0"}
PROVENANCE = {"_diffusers_version", "_name_or_path", "name_or_path", "transformers_version", "torch_dtype",
              "special_tokens_map_file"}  # who wrote a file and when, not what it configures
NOT_SHIPPED = ("safety_checker/", "feature_extractor/", "vae_1_0/", "vae_decoder/", "vae_encoder/")
# the deliberate differences: no safety checker or its image processor (the loader passes safety_checker=None);
# SD2.1's tokenizer_config.json says pad "<|endoftext|>" but its special_tokens_map.json "!", which wins when
# loaded (checked below): ours says "!" in both
DIFFERENT = {
    ("sd_v1", "model_index.json"): {"safety_checker": [None, None], "feature_extractor": [None, None],
                                    "requires_safety_checker": False},
    ("sd_v2", "model_index.json"): {"feature_extractor": [None, None]},
    ("sd_v2", "tokenizer/tokenizer_config.json"): {"pad_token": "!"},
}


@pytest.fixture(scope="module")
def forge_files():
    """{(arch, relative path): bytes} of the diffusers configs Forge ships (backend/huggingface/...)."""
    if not os.path.isfile(FORGE_TARBALL):
        pytest.skip(f"Forge's source archive is not here ({FORGE_TARBALL})")
    out = {}
    with tarfile.open(FORGE_TARBALL) as tf:
        for member in tf:
            name = member.name.removeprefix("./")
            for arch, repo in FORGE.items():
                head = f"backend/huggingface/{repo}/"
                if member.isfile() and name.startswith(head):
                    out[(arch, name[len(head):])] = tf.extractfile(member).read()
    if not out:
        pytest.skip("Forge's archive holds no backend/huggingface configs")
    return out


@pytest.mark.parametrize("arch", sorted(FORGE))
def test_values_equal_the_configs_forge_ships(forge_files, arch):
    theirs = {rel: data for (a, rel), data in forge_files.items() if a == arch and not rel.startswith(NOT_SHIPPED)}
    assert theirs, f"no configs of {FORGE[arch]} in Forge's archive"
    for rel, data in sorted(theirs.items()):
        if rel.endswith((".txt", "vocab.json")):  # the BPE vocabulary: our one shared copy
            with open(os.path.join(models.CLIP_BPE_DIR, os.path.basename(rel)), "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest(), rel
            continue
        want = {k: v for k, v in json.loads(data).items() if k not in PROVENANCE}
        want |= DIFFERENT.get((arch, rel), {})
        got = {k: v for k, v in read_json(folder(arch), rel).items() if k not in PROVENANCE}
        assert got == want, rel


@pytest.mark.parametrize("arch", sorted(FORGE))
def test_tokenizers_behave_as_forges(forge_files, arch, tmp_path):
    from transformers import CLIPTokenizer

    ours = models.shipped_tokenizers(folder(arch))
    for name, tok in ours.items():
        part = tmp_path / name
        part.mkdir()
        for (a, rel), data in forge_files.items():
            if a == arch and rel.startswith(name + "/"):
                (part / rel.split("/", 1)[1]).write_bytes(data)
        theirs = CLIPTokenizer.from_pretrained(str(part))
        text = "a Photo of a CAT, sitting on 2 mats!"
        for kwargs in ({}, {"padding": "max_length", "max_length": 77}):
            assert tok(text, **kwargs).input_ids == theirs(text, **kwargs).input_ids, (name, kwargs)
        assert (tok.pad_token, tok.model_max_length) == (theirs.pad_token, theirs.model_max_length)


# ----------------------------------------------------------------------------- a full-size SD1.5 file


def write_random_checkpoint(path: str, tensors: dict, seed: int = 0) -> None:
    """A safetensors file of random fp16 values with the keys and shapes of ``tensors``, written one tensor
    at a time (peak memory: the largest tensor, not the 2 GB file)."""
    keys = sorted(tensors)
    header, offset = {}, 0
    for k in keys:
        size = tensors[k].numel() * 2
        header[k] = {"dtype": "F16", "shape": list(tensors[k].shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in keys:
            f.write((torch.randn(tuple(tensors[k].shape), generator=gen) * 0.02).half().numpy().tobytes())


def test_full_size_sd15_single_file_loads_offline(comfy, tmp_path, monkeypatch):
    """A random SD1.5 checkpoint of the real size and layout (2.1 GB, fp16) loads with the shipped config
    and nothing else: every weight lands where the file has it (18 s and 1.3 GB peak on two CPU cores)."""
    t0 = time.time()
    path = str(tmp_path / "random-sd15.safetensors")
    write_random_checkpoint(path, ldm_layout(comfy, "sd_v1"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    try:
        _check_random_sd15(path, models.load(path, torch_dtype=torch.float16))
    finally:  # 2.1 GB: not left for pytest's kept temporary folders
        import contextlib
        import gc

        gc.collect()
        with contextlib.suppress(OSError):
            os.remove(path)
    assert time.time() - t0 < 120


def _check_random_sd15(path, comps):
    from safetensors import safe_open

    assert comps.architecture.name == "sd_v1"
    assert comps.scheduler.config.prediction_type == "epsilon"
    assert comps.tokenizer("a photo of a cat").input_ids == CAT_IDS
    for name, module in (("unet", comps.unet), ("vae", comps.vae), ("text_encoder", comps.text_encoder)):
        assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in module.parameters()), name
        assert sum(p.numel() for p in module.parameters()) == PARAMETERS["sd_v1"][name]
    te = comps.text_encoder.get_input_embeddings().weight
    with safe_open(path, framework="pt") as f:
        assert torch.equal(comps.unet.conv_in.weight, f.get_tensor("model.diffusion_model.input_blocks.0.0.weight"))
        assert torch.equal(comps.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_k.weight,
                           f.get_tensor("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"))
        assert torch.equal(comps.vae.decoder.conv_in.weight, f.get_tensor("first_stage_model.decoder.conv_in.weight"))
        assert torch.equal(te, f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"))
