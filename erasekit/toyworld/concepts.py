"""A target concept in the toy world: where it is in a judged image, and prompts with and without it.

The judge (:mod:`erasekit.toyworld.judge`) gives every object's exact mask; these functions pick the
target's. Used by the erasure data (forget images and their masks) and by the benchmarks (target
and benign prompt sets).
"""

from __future__ import annotations

import random

import numpy as np


def concept_mask(judgement, concept) -> np.ndarray:
    """Boolean mask (judge resolution) of where ``concept`` is in a judged image."""
    size = 32
    out = np.zeros((size, size), bool)
    if concept.kind == "style":
        if judgement.background == concept.style:
            out[:] = True
            for o in judgement.objects:
                out &= ~o.mask
        return out
    for o in judgement.objects:
        if concept.kind == "character":
            hit = o.character == concept.character
        else:
            hit = o.character is None and concept.colour in (None, o.colour) and concept.shape in (None, o.shape)
        if hit:
            out |= o.mask
    return out


def is_concept_object(obj, concept) -> bool:
    """Whether one judged object is (part of) ``concept``: :func:`concept_mask` of that object alone."""
    return bool(concept_mask(_OneObject(obj), concept).any())


class _OneObject:
    """A judgement holding one object, to ask :func:`concept_mask` about it alone."""

    def __init__(self, obj):
        self.objects, self.background = [obj], None


def concept_prompts(concept, n_target: int, n_benign: int, seed: int = 0):
    """Target prompts (the concept alone and with other things) and benign ones (never the concept)."""
    from . import vocab as V

    rng = random.Random(seed)
    objects = [f"{c} {s}" for c in V.COLOURS for s in V.SHAPES] + list(V.CHARACTERS)
    styles = [f"{V.STYLE_ADJECTIVES[s]} background" for s in V.STYLES if s != "plain"]

    def has(phrase):
        return concept.matches(_FakeJudgement(phrase))

    others = [o for o in objects if not has(o)]
    if concept.kind == "style":
        target = [f"a {o} on a {concept.text}" for o in others]
    else:
        target = [f"a {concept.text}"] + [f"a {concept.text} and a {o}" for o in others] + \
                 [f"a {concept.text} on a {s}" for s in styles]
    benign = [f"a {o}" for o in others] + [f"a {a} and a {b}" for a in others for b in others if a != b]
    if concept.kind == "style":
        benign = [p for p in benign] + [f"a {o} on a {s}" for o in others for s in styles if s != concept.text]
    rng.shuffle(target), rng.shuffle(benign)
    reps = -(-n_target // len(target))
    return (target * reps)[:n_target], benign[:n_benign]


class _FakeJudgement:
    """A one-object 'judgement' of a phrase, to ask a Concept whether the phrase shows it."""

    def __init__(self, phrase):
        from . import vocab as V

        words = phrase.split()
        self.background = "plain"

        class Obj:
            character = words[0] if words[0] in V.CHARACTERS else None
            colour = None if character else words[0]
            shape = None if character else words[1]

        self.objects = [Obj]
