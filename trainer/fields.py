"""The trainer page's settings: one declaration of each field (key, label, default), shared by the
page's layout (:mod:`trainer.page`) and its handlers (:mod:`trainer.app`)."""

from __future__ import annotations

import inspect

from .pool import DEFAULT_TABLE
from .runner import DEFAULT_BASE

CONCEPT_TYPES = ("object", "style", "character", "nudity")
PRESET_OF_TYPE = {"object": "object", "style": "style", "character": "character", "nudity": "nsfw"}
EXAMPLES = {  # target, anchor (what the concept turns into) on the toy model
    "object": ("red circle", "green circle"), "style": ("striped background", "plain background"),
    "character": ("bobo", "a blue circle"), "nudity": ("nudity", "dressed"),
}
METHODS = (("INPO: an erasure LoRA", "inpo"),
           ("NCD: an erasure LoRA (a safe picture preferred over three harmful ones)", "ncd"),
           ("ResAlign: an erasure LoRA that survives later fine-tuning (hardens INPO's with Harden this LoRA)", "resalign"),
           ("DAG guideline tokens: an embedding for Detect-and-Guide", "guideline"))
GUIDELINE_STEPS_PER_IMAGE = 100  # DAG Table 4: 100 x the number of unsafe images
UPLOAD_MB = 50  # the most one uploaded file may weigh (the page refuses more; Gradio's max_file_size too)

# (key, label, default): the settings fields, in the order of the handlers' parameters
FIELDS = [
    ("base", "Base model", str(DEFAULT_BASE)), ("concept_type", "Concept type", "object"),
    ("target", "Concept to erase", "red circle"), ("anchor", "Anchor / safe concept", "green circle"),
    ("preserve", "Concepts to preserve (one a line)", ""), ("run_name", "Run name", "erase-red-circle"),
    ("forget_images", "Forget images", 16), ("images_per_concept", "Images per preserved concept", 25),
    ("neighbours", "Neighbouring concepts", 4), ("unrelated", "Unrelated concepts", 4),
    ("data_steps", "Sampling steps (data)", 25), ("mask_from", "Masks", "auto"),
    ("guideline", "Guideline embedding for masks (.safetensors)", ""),
    ("method", "Method", "inpo"), ("preset", "Preset", "object"), ("steps", "Steps", 300), ("lr", "Learning rate", 1e-4),
    ("rank", "LoRA rank", 4), ("alpha", "LoRA alpha (0 = rank)", 0.0), ("batch_size", "Batch size", 1),
    ("eta", "eta (erasure strength)", 1.0), ("gamma", "gamma", 3.0), ("tau", "tau (margin)", 0.1),
    ("lambda_prior", "lambda_prior (preservation)", 0.6), ("sample_every", "Preview every N steps (0 = off)", 50),
    ("sample_steps", "Preview sampling steps", 20), ("checkpoint_every", "Checkpoint every N steps", 50),
    ("seed", "Seed", 0), ("stop_when_erased", "Stop when erased (Steps is then the most)", False),
    # NCD's own settings (shown when the method is NCD)
    ("beta", "beta (NCD reward scale)", 2000.0), ("lambda_pair", "lambda (NCD pair loss)", 0.5),
    ("pair_reduce", "Pair loss over the harmful images", "sum"), ("harm_weights", "Harm weights (NCD-HA)", ""),
    ("nca", "NCA objective (ablation)", False), ("img2img_strength", "img2img strength (safe pictures)", 0.9),
    # ResAlign's own settings (shown when the method is ResAlign); its beta is another quantity than NCD's
    ("resalign_beta", "beta (ResAlign: harm after a simulated fine-tune)", 0.8),
    ("iterations", "ResAlign K (1 = first order)", 3), ("configs", "ResAlign J (fine-tunes per step)", 1),
    ("pool", "ResAlign pool: the simulated fine-tunes, one a row", DEFAULT_TABLE),
    ("init_lora", "Harden this LoRA (.safetensors; empty = start fresh)", ""),
    ("harm_loss", "ResAlign harm loss", "preset"),
]
HARM_LOSSES = ("preset", "inpo", "ncd", "ga", "relative")  # "preset": the preset's (not sent); erasekit.erase.harm_losses
METHOD_FIELDS = {  # the fields only one method reads: passed as its flags, shown with it
    "inpo": ("eta", "gamma", "tau", "lambda_prior"),
    "ncd": ("beta", "lambda_pair", "pair_reduce", "harm_weights", "nca", "img2img_strength", "anchor", "lambda_prior"),
    "resalign": ("resalign_beta", "iterations", "configs", "pool", "init_lora", "harm_loss"),
}
FLAG_OF = {"resalign_beta": "beta"}  # a page field whose CLI flag has another name (both methods have a --beta)
FIELD_OF_SETTING = {("resalign", "beta"): "resalign_beta"}  # ... and the way back, from a run's [resalign] table
KEYS = [k for k, _, _ in FIELDS]
INT_KEYS = {"forget_images", "images_per_concept", "neighbours", "unrelated", "data_steps", "steps", "rank", "batch_size",
            "sample_every", "sample_steps", "checkpoint_every", "seed", "iterations", "configs"}


def with_signature(fn, names, defaults=None, extra=()):
    """``fn(*values)`` with named parameters (what gradio_client shows and accepts as keywords)."""

    def wrapper(*values):
        return fn(*values)

    wrapper.__name__ = getattr(fn, "__name__", "handler")
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=(defaults or {}).get(n, inspect.Parameter.empty)) for n in list(names) + list(extra)]
    wrapper.__signature__ = inspect.Signature(params)
    return wrapper
