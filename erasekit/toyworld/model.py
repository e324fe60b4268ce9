"""The toy text-to-image model: Stable Diffusion's architecture at toy scale.

Every component is a real diffusers / transformers class, so the stock
`StableDiffusionPipeline`, its schedulers and the project's ComfyUI conversion treat the
toy model like SD1.x:

* `ToyVAE` (`ModelMixin, ConfigMixin`, no weights): a fixed, exactly invertible latent map
  with the `AutoencoderKL` API. A 128x128 display image (the 32x32 scene nearest-upsampled
  x4) <-> a 12x16x16 latent: encode = area-mean downscale by 4, then pixel-unshuffle by 2;
  decode = pixel-shuffle by 2, then nearest upsample x4. SD's 8x latent convention holds.
* `ToyCLIPTextModel` (a `CLIPTextModel`) with a fixed *content gate* on its output.
* `UNet2DConditionModel` (`toy_unet_config()`), a `DDIMScheduler` config that the DDPM and
  Euler-ancestral schedulers accept too, and a WordLevel tokenizer saved as `tokenizer.json`.

The shipped model lives in `models/toy/` (a diffusers folder, safetensors weights);
`load_toy_pipeline()` loads it. Heavy imports happen inside functions where possible; this
module itself imports torch and diffusers, so import it only when the model is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, StableDiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from transformers import CLIPTextConfig, CLIPTextModel

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "toy"
DISPLAY_SIZE = 128  # user-facing image side (the 32x32 scene upsampled x4)
SCENE_SIZE = 32
LATENT_CHANNELS = 12
LATENT_SIZE = 16


# ----------------------------------------------------------------------------- latent map
class ExactLatentDistribution:
    """Stands in for `DiagonalGaussianDistribution`: a point mass at `mean` (the map is exact).

    `sample()` and `mode()` both return `mean`, shape [B, 12, H/8, W/8].
    """

    def __init__(self, mean: torch.Tensor):
        self.mean = mean
        self.std = torch.zeros_like(mean)
        self.var = self.std
        self.logvar = torch.full_like(mean, -30.0)
        self.deterministic = True

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other=None) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device)


class ToyVAE(ModelMixin, ConfigMixin):
    """Fixed, exactly invertible 8x latent map with the `AutoencoderKL` API (no weights).

    encode: x [B, 3, H, W] in [-1, 1], H and W divisible by 8
        -> area-mean downscale by `display_scale` (4) -> [B, 3, H/4, W/4]
        -> pixel-unshuffle by 2 -> latent [B, 12, H/8, W/8].
    decode: the inverse: pixel-shuffle by 2, then nearest upsample by 4.
    On display images (every 4x4 block constant) decode(encode(x)) == x up to float rounding,
    which vanishes when the result is quantised to uint8.

    `block_out_channels` has length 4 only so that `StableDiffusionPipeline` computes
    `vae_scale_factor = 2 ** 3 = 8`; the values mean nothing.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = LATENT_CHANNELS,
        block_out_channels: tuple = (8, 8, 8, 8),
        display_scale: int = 4,
        unshuffle: int = 2,
        sample_size: int = DISPLAY_SIZE,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        force_upcast: bool = False,
    ):
        super().__init__()
        if latent_channels != in_channels * unshuffle**2:
            raise ValueError("latent_channels must equal in_channels * unshuffle**2")
        # A non-persistent buffer so that `.dtype` / `.device` (used by the pipelines) work
        # on a module with no parameters; nothing is saved.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    # pure functions of the config -------------------------------------------------------
    def scene_to_latent(self, scene: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] scene-resolution image in [-1, 1] -> [B, 12, h/2, w/2]."""
        return F.pixel_unshuffle(scene, self.config.unshuffle)

    def latent_to_scene(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 12, h, w] latent -> [B, 3, 2h, 2w] scene-resolution image."""
        return F.pixel_shuffle(z, self.config.unshuffle)

    # AutoencoderKL API -----------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x [B, 3, H, W] -> `AutoencoderKLOutput(latent_dist)` with mean [B, 12, H/8, W/8]."""
        s = self.config.display_scale
        scene = F.avg_pool2d(x, kernel_size=s, stride=s) if s > 1 else x
        latent = ExactLatentDistribution(self.scene_to_latent(scene))
        if not return_dict:
            return (latent,)
        return AutoencoderKLOutput(latent_dist=latent)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **kwargs):
        """z [B, 12, h, w] -> `DecoderOutput(sample)` with sample [B, 3, 8h, 8w]."""
        image = self.latent_to_scene(z)
        s = self.config.display_scale
        if s > 1:
            image = F.interpolate(image, scale_factor=s, mode="nearest")
        if not return_dict:
            return (image,)
        return DecoderOutput(sample=image)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        z = self.encode(sample).latent_dist.mode()
        return self.decode(z, return_dict=return_dict)

    # diffusers pipelines call these on real VAEs; the map needs no tiling or slicing.
    def enable_tiling(self, *args, **kwargs):
        pass

    def disable_tiling(self):
        pass

    def enable_slicing(self):
        pass

    def disable_slicing(self):
        pass


# ----------------------------------------------------------------------------- text encoder
def content_gate(hidden: torch.Tensor, input_ids: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
    """Replace the states of non-content tokens by the state at position 0 ([bos]).

    hidden [B, L, D], input_ids [B, L], keep_ids [K] (the content-word ids and [bos]).
    Returns [B, L, D]: hidden where input_ids is in keep_ids, else hidden[:, :1].
    """
    keep = torch.isin(input_ids.to(hidden.device), keep_ids.to(hidden.device))
    return torch.where(keep.unsqueeze(-1), hidden, hidden[:, :1].expand_as(hidden))


class ToyCLIPTextModel(CLIPTextModel):
    """A `CLIPTextModel` whose outputs pass through a fixed *content gate*.

    The gate: at every position whose token is NOT a content word (colour, shape, style,
    character name) and not [bos], the hidden state is replaced by the [bos] position's state
    (position 0). In a causal encoder the [bos] state is identical for every prompt, so gated
    positions carry nothing about the prompt; they still give background pixels a neutral key
    to attend to, and the empty caption becomes L copies of that one state.

    Why: with a jointly trained causal encoder the UNet learns to read object identity from
    the end/pad tokens (they have seen the whole prompt), so the cross-attention maps of the
    colour and shape words do not localise the object (measured IoU 0.01). Masking those tokens
    in cross-attention fixed that (IoU 0.54-0.61), but masks are not passed by the stock
    `StableDiffusionPipeline` or by ComfyUI's conditioning. The gate gives the same effect
    inside the text encoder, so no attention mask is needed anywhere. Anything that rebuilds
    this encoder from its weights (e.g. a ComfyUI conversion) must apply the same gate.

    Config extras (saved in config.json): `content_token_ids` (list of int). The [bos] id is
    `config.bos_token_id`. Gated: `last_hidden_state` and, when requested, every entry of
    `hidden_states` (so `clip_skip` sees gated states too). `pooler_output` (the [eos] state,
    unused by SD1) is left alone.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        ids = list(getattr(config, "content_token_ids", None) or [])
        # A plain list, not a buffer: from_pretrained builds modules on the meta device and
        # would leave a non-persistent buffer uninitialised.
        self.gate_keep_list = sorted(set(ids) | {int(config.bos_token_id)})

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        ids = input_ids.view(-1, input_ids.shape[-1])
        keep = torch.tensor(self.gate_keep_list, dtype=torch.long, device=ids.device)
        out.last_hidden_state = content_gate(out.last_hidden_state, ids, keep)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(content_gate(h, ids, keep) for h in out.hidden_states)
        return out


# ----------------------------------------------------------------------------- configs
def build_toy_tokenizer():
    """The WordLevel tokenizer of `vocab.build_tokenizer()` as a `PreTrainedTokenizerFast`
    (what `StableDiffusionPipeline` calls: padding="max_length", truncation, batch_decode)."""
    from transformers import PreTrainedTokenizerFast

    from .vocab import MAX_LEN, build_tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="[bos]",
        eos_token="[eos]",
        pad_token="[pad]",
        unk_token="[unk]",
        model_max_length=MAX_LEN,
        padding_side="right",
    )


def content_token_ids(tokenizer) -> list[int]:
    """Ids of `vocab.CONTENT_WORDS` in `tokenizer` (the words the gate lets through)."""
    from .vocab import CONTENT_WORDS

    vocab = tokenizer.get_vocab()
    return sorted(vocab[w] for w in CONTENT_WORDS if w in vocab)


def toy_text_config(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, mlp: int = 128) -> CLIPTextConfig:
    """CLIPTextConfig for the toy encoder (0.07 M params at the defaults), gate ids included."""
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=mlp,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        pad_token_id=vocab["[pad]"],
        bos_token_id=vocab["[bos]"],
        eos_token_id=vocab["[eos]"],
    )
    config.content_token_ids = content_token_ids(tokenizer)
    config.architectures = ["ToyCLIPTextModel"]
    return config


def toy_unet_config(cross_attention_dim: int = 64, tiny: bool = False) -> dict:
    """UNet2DConditionModel config: 12x16x16 latents, cross-attention at 8x8, 4x4 and mid.

    The default (4.6 M params) is the recipe measured in the toy-world notes; `tiny=True` is
    a ~0.2 M-param version of the same layout for tests.
    """
    channels = (32, 32, 64) if tiny else (64, 64, 128)
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' name for the number of heads in SD1 UNets
        # 32 groups, as in SD: ComfyUI's UNetModel hard-codes GroupNorm(32, C), so any other
        # value gives a model that loads into ComfyUI but computes something else (measured).
        norm_num_groups=32,
    )


def toy_scheduler_config() -> dict:
    """Training / sampling schedule: DDPM 1000 steps, cosine betas, epsilon prediction.

    Valid for DDPMScheduler, DDIMScheduler and EulerAncestralDiscreteScheduler (they ignore the
    keys they do not know). `clip_sample` (x0 clipping to [-1, 1], standard for pixel-space
    DDPMs) is on: the latent here *is* pixel space. DDIM must then take its noise direction from
    the clipped x0 (`use_clipped_model_output`, which `ToyPipeline` and erasekit's sampler pass):
    clipping x0 alone, diffusers' default, is what made this model collapse at CFG >= 3 (see
    `models/toy/MODEL_CARD.md` for the measurements).
    """
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        thresholding=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# ----------------------------------------------------------------------------- pipeline
class ToyPipeline(StableDiffusionPipeline):
    """`StableDiffusionPipeline` with no safety checker or feature extractor by default."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False):
        # StableDiffusionPipeline.__init__ silently turns `clip_sample` off (right for SD's
        # latents, whose range is not [-1, 1]). The toy latent is pixel space in [-1, 1], where
        # x0 clipping is the standard, measured-to-help choice: keep the scheduler's own setting.
        original = getattr(scheduler, "_internal_dict", None)
        if original is not None and original.get("clip_sample"):
            from diffusers.configuration_utils import FrozenDict

            scheduler._internal_dict = FrozenDict({**original, "clip_sample": False})
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        if original is not None:
            scheduler._internal_dict = original

    def prepare_extra_step_kwargs(self, generator, eta):
        """DDIM's x0 clipping made consistent: with ``use_clipped_model_output`` the step's noise
        direction is recomputed from the clipped x0, as ComfyUI's samplers do with a clamped
        denoised prediction. Without it DDIM pairs the clipped x0 with the unclipped noise, and at
        CFG >= 3 that mismatch wrecks the samples (measured in ``models/toy/MODEL_CARD.md``)."""
        from ..dag.sampling import clipped_x0_step_kwargs

        return {**super().prepare_extra_step_kwargs(generator, eta), **clipped_x0_step_kwargs(self.scheduler)}


def build_toy_pipeline(seed: int = 0, tiny: bool = False, text_hidden: int = 64) -> ToyPipeline:
    """A randomly initialised toy pipeline (training starts here; tests use `tiny=True`)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    text_config = toy_text_config(tokenizer, hidden_size=32 if tiny else text_hidden, mlp=64 if tiny else 2 * text_hidden)
    text_encoder = ToyCLIPTextModel(text_config)
    unet = UNet2DConditionModel(**toy_unet_config(cross_attention_dim=text_config.hidden_size, tiny=tiny))
    scheduler = DDIMScheduler(**toy_scheduler_config())
    return ToyPipeline(vae=ToyVAE(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def save_toy_pipeline(pipe, path: str | os.PathLike) -> Path:
    """Write `pipe` as a diffusers folder (model_index.json, unet/, text_encoder/, tokenizer/,
    vae/, scheduler/), all weights as safetensors. Returns the folder."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_toy_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                      torch_dtype: torch.dtype = torch.float32) -> ToyPipeline:
    """Load the toy model folder (default: the shipped `models/toy/`).

    The custom components (`ToyVAE`, `ToyCLIPTextModel`) are loaded explicitly, so this works
    whether or not diffusers can resolve their module from model_index.json.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import PreTrainedTokenizerFast

    from .. import checkpoints
    from ..errors import ModelFileError

    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise ModelFileError(
            f"No toy model at {path} (model_index.json missing): train one with "
            f"`python -m erasekit.toyworld train --out {path}` or pass the folder of an existing one."
        )
    index = json.loads((path / "model_index.json").read_text())
    scheduler_cls = DDIMScheduler
    if "scheduler" in index:
        import diffusers

        scheduler_cls = getattr(diffusers, index["scheduler"][1], DDIMScheduler)
    checkpoints.check_safetensors_folder(str(path), "toy model folder")
    try:  # use_safetensors: weights that are only a pickle (.bin) are refused, never unpickled
        pipe = ToyPipeline(
            vae=ToyVAE.from_config(ToyVAE.load_config(path / "vae")),  # weightless: config only
            text_encoder=ToyCLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True,
                                                          torch_dtype=torch_dtype),
            tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype, use_safetensors=True),
            scheduler=scheduler_cls.from_pretrained(path / "scheduler"),
        )
    except OSError as err:
        reason = str(err).splitlines()[0][:200].rstrip('.')
        raise ModelFileError(f"The toy model folder '{path}' could not be loaded ({reason}); "
                             "check that its unet/ and text_encoder/ hold .safetensors weights.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
