"""One sampling under Detect-and-Guide (or SLD / SEGA): the per-step state every host drives.

A host (the ComfyUI / Forge patch, the diffusers sampler) only moves tensors: each step it hands in
the predictions it has and, in DAG mode, this step's guideline CAMs from its conditional pass, plus
a function that runs the safety pass for some images of the batch. The session does the rest:

1. detection: the CAMs -> A-hat with the detector's hold across steps (Sec. 3.1, ``detect.py``);
2. warm-up, and which images get the safety pass (the detected ones only, ``guidance.py``);
3. DAG's Eq. 4 (or SLD / SEGA) on those images; the others stay plain CFG, bit for bit;
4. the step count of the whole sampling, also when one sampling is split over several sampler calls
   (ComfyUI's two KSamplerAdvanced: the second starts where the first stopped);
5. what was seen (every step's A-hat, their running max for a live preview, counts).

It fails closed: a non-finite detection map or guided prediction raises :class:`GuidanceError`
(never "nothing detected", which would sample unguided). With ``on_failure="guide_whole_image"``
an image whose map is not finite is guided over the whole image instead (SEGA's whole-image
edit, the peer without a region) and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ErasekitError
from .guidance import Guidance, sega_combine

ON_FAILURE = ("stop", "guide_whole_image")


class GuidanceError(ErasekitError):
    """Detection or guidance could not be computed (non-finite values): the sampling must stop."""


@dataclass
class SessionLog:
    """What one sampling saw; kept for the hosts' outputs (detection maps, counts)."""

    maps: list = field(default_factory=list)  # per step: A-hat [B, h, w] (CPU)
    scores: list = field(default_factory=list)  # per step: [B] peak(A) / gate (CPU)
    seen: object = None  # running max of A-hat: an erased object stays visible where it was
    guided_steps: int = 0  # steps where the guidance changed the prediction
    extra_passes: int = 0  # safety-condition passes run
    whole_image_rows: int = 0  # images guided whole because their map was not finite


class DagSession:
    """The state machine of one sampling; ``start`` before each sampler call, ``step`` each step.

    Args:
        guidance: the mode and its settings (:class:`~erasekit.dag.guidance.Guidance`).
        embeddings: guideline embeddings (DAG mode, or to watch detection under plain CFG).
        keep_maps: keep every step's A-hat and scores in ``log`` (the ComfyUI node always does).
        on_failure: "stop" (raise :class:`GuidanceError`) or "guide_whole_image".
    """

    def __init__(self, guidance: Guidance, embeddings=(), keep_maps: bool = True, on_failure: str = "stop"):
        from .detect import Detector

        if on_failure not in ON_FAILURE:
            raise ValueError(f"unknown on_failure '{on_failure}'; choose one of {', '.join(ON_FAILURE)}")
        self.guidance = guidance
        self.detector = Detector(embeddings, guidance.dag.hold) if embeddings else None
        self.keep_maps = keep_maps
        self.on_failure = on_failure
        self.steps_before = 0  # steps of earlier calls of a split sampling
        self.segment_steps = 0  # steps of this call
        self._ends_at = None  # where the last call stopped: (noise level, latent shape)
        self.log = SessionLog()

    def start(self, steps: int, first_sigma: float | None = None, last_sigma: float | None = None,
              shape: tuple | None = None) -> bool:
        """Begin a sampler call of ``steps`` steps. It continues the previous call (keeping the hold,
        the maps and the step count) when it starts at the noise level and latent shape where that
        call stopped; anything else starts afresh. Returns whether it continued."""
        go_on = first_sigma is not None and first_sigma > 0 and self._ends_at == (first_sigma, shape)
        if go_on:
            self.steps_before += self.segment_steps
        else:
            self.steps_before = 0
            self.log = SessionLog()
            self.guidance.reset()
            if self.detector is not None:
                self.detector.reset()
        self.segment_steps = steps
        self._ends_at = (last_sigma, shape) if last_sigma is not None else None
        return go_on

    @property
    def n_steps(self) -> int:
        """Steps of the whole sampling, earlier calls of a split one included."""
        return self.steps_before + max(self.segment_steps, 1)

    def detect(self, per_concept_layer_maps, latent_hw, timestep: float | None = None):
        """A-hat ``[B, H, W]`` of this step from ``[concept][layer] -> [B, h, w]`` CAMs, and the rows
        whose maps are not finite (those raise unless ``on_failure`` guides them whole)."""
        import torch

        finite = [torch.isfinite(m).flatten(1).all(1) for layers in per_concept_layer_maps for m in layers]
        bad = ~torch.stack(finite).all(0)  # [B]: a NaN / inf anywhere in an image's maps
        if bad.any() and self.on_failure == "stop":
            raise GuidanceError(f"Detect-and-Guide could not compute the detection map of image(s) "
                                f"{bad.nonzero().flatten().tolist()} (non-finite attention values), so it stopped instead of "
                                "sampling unguided; check the guideline embedding and the model, or choose "
                                "'guide whole image' for failed detections.")
        a_hat, scores = self.detector(per_concept_layer_maps, latent_hw, timestep)
        if bad.any():
            a_hat = torch.where(bad[:, None, None].to(a_hat.device), torch.zeros_like(a_hat), a_hat)
        if self.keep_maps:
            self.log.maps.append(a_hat.cpu())
            self.log.scores.append(scores.cpu())
        same = self.log.seen is not None and self.log.seen.shape == a_hat.shape
        self.log.seen = torch.maximum(self.log.seen, a_hat) if same else a_hat
        return a_hat, [int(i) for i in bad.nonzero().flatten()]

    def step(self, i: int, pred_cfg, pred_u, pred_p, safety_pass, cond_scale: float, a_hat=None, failed=(),
             sigma=-1.0):
        """The guided prediction of step ``i`` of this call (see :meth:`Guidance.apply` for the
        predictions, ``safety_pass(rows)`` and ``sigma``); ``failed``: rows to guide whole."""
        import torch

        def counted(rows):
            self.log.extra_passes += 1
            return safety_pass(rows)

        step = self.steps_before + i
        out, guided = self.guidance.apply(pred_cfg, pred_u, pred_p, counted, step, self.n_steps, cond_scale,
                                          a_hat=a_hat, sigma=sigma)
        if failed:
            out = out.clone() if out is pred_cfg else out
            rows = list(failed)
            out[rows] = sega_combine(pred_cfg[rows], pred_u[rows], counted(rows), cond_scale, self.guidance.sega)
            self.log.whole_image_rows += len(rows)
            guided = True
        if guided and not torch.isfinite(out).all():
            raise GuidanceError("Detect-and-Guide's safety guidance gave non-finite values (the safety pass or the "
                                "model returned NaN / inf), so it stopped instead of sampling unguided; check the model, "
                                "the safety prompt and the sampler settings.")
        self.log.guided_steps += int(guided)
        return out
