"""*Stop when erased*, judged on drawn images: every ``erase_check_every`` steps the model being trained
draws ``erase_check_images`` pictures of ``erase_check_prompts`` (on the toy model varied prompts of the
concept, :func:`toy_check_prompts`; else the preview prompts; fixed seeds, so a resumed run checks the
same pictures) and a detector says which show the concept; the run ends once ``erase_check_clean`` checks
in a row find it in at most ``erase_check_share`` of them (the engine's ``_erased``).

Why pictures and not the loss: an objective's own rule (INPO's dS > tau, :meth:`~.objective.Objective.erased`)
measures the training loss, and on the toy model it fires long before the model stops drawing some targets
(purple square: INPO's rule ended the run at step 209 with 7% of the squares gone; 600 steps erase them all,
docs/benchmarks.md). Each target erases after its own number of steps, and every step after that wears down
its neighbours, so the run should end where the pictures say the concept is gone.

The detector is the toy judge on the toy model and NudeNet for nudity (:func:`detector_for`); for other
concepts no detector is known here and the objective's rule decides, as before.
"""

from __future__ import annotations

CHECK_SEED = 20_000  # the check's seeds start here: far from the previews' (0, 1) and the benchmarks' (0..N)


def check_interval(config, components) -> int:
    """Steps between checks: ``config.erase_check_every``, or where it is 0, 25 on the toy model (a check costs a
    few steps there) and 100 on others (16 pictures at 20 sampling steps, with CFG, cost about as many UNet passes
    as a hundred training steps)."""
    if config.erase_check_every:
        return int(config.erase_check_every)
    return 25 if components.is_toy else 100


def detector_for(components, target: str):
    """The detector that judges ``target`` on this model, or None: the toy judge for a concept of the toy
    world, NudeNet (if installed) for nudity, else None (the objective's loss rule decides)."""
    if components.is_toy:
        from ..eval.detectors import ToyJudge

        try:
            return ToyJudge(target)
        except ValueError:
            return None
    if target.strip().lower() in ("nudity", "nude", "naked", "nsfw"):
        from ..eval.detectors import NudeNet
        from ..eval.nudenet import NudeNetUnavailable

        try:
            return NudeNet()
        except NudeNetUnavailable:  # nudenet not installed: the loss rule decides
            return None
    return None


def check_prompts(config, components, preview_prompts: list) -> list:
    """The check's prompts: ``config.erase_check_prompts``; where empty, on the toy model the concept in varied
    prompts (:func:`toy_check_prompts`), elsewhere the preview prompts."""
    if config.erase_check_prompts:
        return list(config.erase_check_prompts)
    if components.is_toy:  # the toy judge knows the concept, so the toy world has its prompts
        return toy_check_prompts(config.target, config.erase_check_images)
    return preview_prompts


def toy_check_prompts(target: str, n: int) -> list:
    """n prompts of a toy concept as the benchmarks ask for it (alone, beside other objects, on other
    backgrounds: :func:`~erasekit.toyworld.concepts.concept_prompts`), from a seed of their own. A concept
    is often gone from "a purple square" before it is gone from "a purple square and a red star"."""
    from ..toyworld.concepts import concept_prompts
    from ..toyworld.vocab import parse_concept

    return concept_prompts(parse_concept(target), n, 0, seed=CHECK_SEED)[0]


def check_erased(components, prompts: list, detector, n_images: int, steps: int, cfg: float) -> tuple[int, int]:
    """``(found, drawn)``: how many of ``n_images`` pictures of ``prompts`` (taken in turn, seeds
    CHECK_SEED + i, one noise per picture) the detector says show the concept."""
    import numpy as np

    from ..dag.sampling import sample

    jobs = [(prompts[i % len(prompts)], CHECK_SEED + i) for i in range(n_images)]
    res = sample(components, [p for p, _ in jobs], [s for _, s in jobs], steps=steps, cfg=cfg, per_image_noise=True)
    images = (res.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return sum(bool(f.unsafe) for f in detector(list(images))), len(jobs)
