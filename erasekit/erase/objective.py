"""What an erasure method sees of the training engine (:mod:`erasekit.erase.engine`): the
:class:`Objective` it implements, the :class:`StepContext` of each micro-step (noise, timesteps,
targets, text inputs) and :func:`join_parts`, which puts a batch's parts into one UNet call."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ErasekitError


def join_parts(parts) -> dict:
    """One UNet batch from several parts (forget, preserve, ...): their latents and conditioning
    (``embeds``, ``ids`` and, for SDXL, ``pooled`` and ``time_ids``) concatenated in order."""
    import torch

    keys = [k for k in ("latents", "embeds", "ids", "pooled", "time_ids") if all(k in p for p in parts)]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


@dataclass
class StepContext:
    """What an objective gets besides the batch, for one micro-step."""

    step: int  # optimizer steps already done
    generator: object  # torch.Generator (CPU), seeded by (seed, step, micro-step, process)
    noise_scheduler: object  # diffusers DDPMScheduler with the base model's betas
    device: object
    trainable: dict  # {name: Parameter}: what the optimizer updates
    text_encoder: object = None  # the trained text encoder, when it is trained
    base_unet: object = None  # the UNet unwrapped from accelerate (for torch.func.functional_call)

    def noise_and_timesteps(self, latents):
        """Gaussian noise like ``latents`` [B, ...] and timesteps [B], uniform over the schedule."""
        import torch

        noise = torch.randn(latents.shape, generator=self.generator).to(self.device, latents.dtype)
        n = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, n, (latents.shape[0],), generator=self.generator).to(self.device)
        return noise, t

    def add_noise(self, latents, noise, t):
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, shapes as ``latents``."""
        return self.noise_scheduler.add_noise(latents, noise, t)

    def target(self, latents, noise, t):
        """What the UNet predicts: eps (epsilon models) or v (v-prediction models)."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise ErasekitError(f"The base model predicts '{kind}', but erasure training supports epsilon and v-prediction models only.")

    @staticmethod
    def double_backward():
        """A context in which the UNet has second derivatives (Hessian-vector products with
        ``create_graph=True``): PyTorch's flash and memory-efficient attention kernels have none
        (measured: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
        not implemented"), its math kernel has; gradient checkpointing works inside it."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    def text(self, part):
        """Text conditioning [B, L, D] of the model being trained: the cached base embeddings, or
        ``part["ids"]`` through the text encoder when it is trained (the reference always uses
        ``part["embeds"]``, which are the base encoder's own output)."""
        return part["embeds"] if self.text_encoder is None else self.text_encoder(part["ids"])[0]

    def unet_inputs(self, part, reference: bool = False) -> dict:
        """Keyword arguments of a UNet call on ``part``: its text states (:meth:`text`; for the
        reference the cached base ones) and, where the part carries them, SDXL's pooled embedding
        and size ids."""
        from ..dag.conditioning import Conditioning

        states = part["embeds"] if reference else self.text(part)
        return Conditioning(states, part.get("pooled"), part.get("time_ids")).unet_kwargs()


class Objective:
    """An erasure method's loss. Subclasses set ``name`` and ``config`` (a dataclass, written
    to ``config.toml`` as ``[<name>]``) and implement :meth:`loss`."""

    name = "objective"
    config = None

    def setup(self, data, components, train_config, trainable: dict) -> None:
        """Called once before the optimizer is made (and before a resume loads its checkpoint): a
        method's own checks and data (ResAlign's fine-tuning set), or an initial value of the
        ``trainable`` weights. Default: nothing."""

    def erased(self, history: list) -> bool:
        """Whether the concept counts as erased, judged from the loss terms of every step so far
        (``history``: one dict a step, newest last). With ``stop_when_erased`` the run ends there,
        which saves the steps that would only wear down what must be kept. Default: never."""
        return False

    def loss(self, batch: dict, unet, reference_ctx, ctx: StepContext) -> dict:
        """Named loss terms (scalar tensors) of one micro-batch; ``"loss"`` is minimised.

        batch: ``{"forget": part, "preserve": part}`` (see ``EraseData.sample``), each part with
            ``latents`` [B, C, h, w], ``embeds`` [B, L, D], ``ids`` [B, L], for the forget
            set ``masks`` [B, 1, h, w] in [0, 1], and for SDXL ``pooled`` and ``time_ids``
            (:meth:`StepContext.unet_inputs` turns a part into the UNet's keyword arguments).
        unet: the model being trained (maybe wrapped by accelerate): ``unet(x_t, t,
            encoder_hidden_states=c).sample``.
        reference_ctx: ``with reference_ctx() as ref: ref(x_t, t, encoder_hidden_states=c)`` runs
            the frozen base model, without gradients.
        """
        raise NotImplementedError
