"""Text conditioning for a UNet call, for one text encoder (SD1.x, SD2.x, the toy) or two (SDXL).

SD1.x / SD2.x condition on the text encoder's last hidden states. SDXL concatenates the
penultimate hidden states of its two encoders and also takes ``added_cond_kwargs``: the second
encoder's pooled, projected embedding and the micro-conditioning ids (original size, crop
corner, target size). For SDXL the encoding is diffusers' own ``StableDiffusionXLPipeline.encode_prompt``,
so the states are the ones diffusers' pipeline and ComfyUI give the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Conditioning:
    """What a batch of prompts gives the UNet. ``states`` ``[B, L, D]``; SDXL also ``pooled``
    ``[B, P]`` and ``time_ids`` ``[B, 6]``."""

    states: object
    pooled: object = None
    time_ids: object = None

    def unet_kwargs(self, rows=None) -> dict:
        """Keyword arguments of a diffusers UNet call, for all rows or the ``rows`` (indices) given."""
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        kwargs = {"encoder_hidden_states": pick(self.states)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pick(self.pooled), "time_ids": pick(self.time_ids)}
        return kwargs

    def rows(self, idx) -> Conditioning:
        """The rows ``idx`` (a slice, indices or a mask) of every part."""
        return Conditioning(*(None if x is None else x[idx] for x in (self.states, self.pooled, self.time_ids)))

    def to(self, *args) -> Conditioning:
        """Every part ``.to(*args)`` (a device, and optionally a dtype)."""
        return Conditioning(*(None if x is None else x.to(*args) for x in (self.states, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @staticmethod
    def cat(parts) -> Conditioning:
        import torch

        parts = list(parts)
        extra = parts[0].pooled is not None
        return Conditioning(torch.cat([p.states for p in parts]),
                            torch.cat([p.pooled for p in parts]) if extra else None,
                            torch.cat([p.time_ids for p in parts]) if extra else None)


def encoders(model) -> tuple[list, list]:
    """(text encoders, tokenizers) of an :class:`erasekit.models.Components` or a diffusers pipeline."""
    if hasattr(model, "text_encoders"):
        return list(model.text_encoders), list(model.tokenizers)
    tes = [getattr(model, k, None) for k in ("text_encoder", "text_encoder_2")]
    toks = [getattr(model, k, None) for k in ("tokenizer", "tokenizer_2")]
    return [t for t in tes if t is not None], [t for t in toks if t is not None]


def image_size(model, latent_hw) -> tuple[int, int]:
    """Pixel size of a latent ``(h, w)``: the VAE's downsampling (8 for SD's VAE)."""
    vae = getattr(model, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return int(latent_hw[0]) * factor, int(latent_hw[1]) * factor


def encode(model, prompts, latent_hw=(64, 64)) -> Conditioning:
    """:class:`Conditioning` of ``prompts`` for ``model`` (one or two text encoders)."""
    import torch

    tes, toks = encoders(model)
    if len(tes) < 2:
        return Conditioning(encode_last_states(tes[0], toks[0], prompts))
    from diffusers import StableDiffusionXLPipeline

    xl = model if isinstance(model, StableDiffusionXLPipeline) else StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=toks[0], tokenizer_2=toks[1],
        unet=model.unet, scheduler=model.scheduler)
    with torch.no_grad():
        states, _, pooled, _ = xl.encode_prompt(list(prompts), device=tes[0].device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    h, w = image_size(model, latent_hw)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=states.dtype, device=states.device).repeat(len(prompts), 1)
    return Conditioning(states, pooled, time_ids)


def unconditional(model, cond: Conditioning, latent_hw=(64, 64)) -> Conditioning:
    """The unconditional branch of CFG for a batch like ``cond``: the empty prompt's encoding;
    for SDXL zeros, as diffusers' SDXL pipeline does for an empty negative prompt
    (``force_zeros_for_empty_prompt``)."""
    import torch

    if cond.pooled is not None:
        return Conditioning(torch.zeros_like(cond.states), torch.zeros_like(cond.pooled), cond.time_ids)
    return encode(model, [""] * len(cond), latent_hw)


def encode_last_states(text_encoder, tokenizer, prompts):
    """Last hidden states ``[B, 77, D]`` of one text encoder (SD1.x / SD2.x / toy conditioning)."""
    import torch

    ids = tokenizer(list(prompts), padding="max_length", max_length=min(tokenizer.model_max_length, 77),
                    truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids)[0]
