"""Plain words for the trainer page: a help line under every setting (Gradio's ``info=``), the
simple strength presets over INPO's raw numbers, and the warning for a concept type the base model
cannot draw. Keyed by the field keys of :data:`trainer.fields.FIELDS`; a method that adds settings
adds its lines here (what a number does, in words a user knows; measured figures go to docs/)."""

from __future__ import annotations

HELP = {
    "base": "The model to erase from: a diffusers folder or a .safetensors checkpoint on this machine.",
    "concept_type": "What kind of thing to erase; picking one fills in an example and the settings that suit it.",
    "target": "The words for the concept, as you would write them in a prompt.",
    "anchor": "What the concept should turn into. Kept with the settings; INPO itself does not use it.",
    "preserve": "Things the model must still draw afterwards, one per line: near the concept (a red square for "
                "a red circle) and unrelated. Suggest fills them in on the toy model.",
    "run_name": "The folder this run writes into (data, checkpoints, the LoRA). A new name starts a new run.",
    "forget_images": "How many pictures of the concept the model draws to learn what to erase.",
    "images_per_concept": "Pictures drawn of each concept to keep; more keeps them safer but takes longer.",
    "neighbours": "How many concepts close to the target are suggested to keep (the toy model knows them).",
    "unrelated": "How many unrelated concepts are suggested to keep.",
    "data_steps": "Sampling steps for each data picture: more is cleaner and slower.",
    "guideline": "Only for masks from a guideline embedding: the .safetensors file Detect-and-Guide detects with.",
    "method": "INPO, NCD and ResAlign each train a LoRA that removes the concept (NCD learns from a safe redrawing "
              "of each picture; ResAlign makes the erasure last when others fine-tune the model later); DAG guideline "
              "tokens train the detector Detect-and-Guide uses at generation time (seconds to train).",
    "preset": "The paper's settings for this kind of concept (INPO, Table 6). Picking one fills in the numbers "
              "below; the toy model gets its own tuning on top.",
    "steps": "How long to train. Each step looks at one batch of concept pictures and one of pictures to keep.",
    "lr": "How big each training step's change is. Lower it if the loss turns into NaN.",
    "rank": "The LoRA's size: higher can erase harder concepts, and makes a bigger file.",
    "alpha": "Scales the LoRA's effect; 0 means the same as the rank (the usual choice).",
    "batch_size": "Pictures per step; more is steadier and needs more memory.",
    "eta": "Erasure strength: how hard each step pushes the concept away (eta). The paper uses 1, and 3 for styles.",
    "gamma": "How sharply a picture stops counting once it is erased (gamma); rarely needs changing.",
    "tau": "How far the concept must be pushed before a picture counts as erased (tau, the margin); it is the "
           "line on the erasure plot.",
    "lambda_prior": "How strongly the concepts to keep are protected (lambda_prior). Higher keeps more of them "
                    "and may erase less.",
    "sample_every": "Draw preview pictures every this many steps, so you can watch the concept go (0 = never).",
    "sample_steps": "Sampling steps of each preview picture.",
    "checkpoint_every": "Save progress every this many steps; Stop and Resume continue from the last save.",
    "seed": "Fixes the random choices, so the same settings give the same run.",
    "stop_when_erased": "End once the concept is gone; later steps mostly wear down what must be kept. Every 25 "
                        "steps (100 off the toy model) the model draws 16 pictures of the concept and a detector judges them (the toy "
                        "judge on the toy model, NudeNet for nudity); for other concepts the method's own rule "
                        "decides (INPO: Delta S above tau on a quarter of the last 20 steps). Resume: ticked turns "
                        "it on; unticked keeps the run's own setting.",
    # NCD
    "beta": "NCD: how sharply the model's pictures are compared with the base model's (beta); larger settles the "
            "comparison sooner. The paper's code uses 2000.",
    "lambda_pair": "NCD: how much the safe picture must come out ahead of each harmful one (lambda, 0.5).",
    "pair_reduce": "NCD: add up the three harmful pictures' pair terms (the paper) or average them (its code: a third "
                   "of the weight).",
    "harm_weights": "NCD-HA: weigh the harmful pictures by how harmful they are, most harmful first, e.g. "
                    "1.2,1.0,0.8; empty treats them alike.",
    "nca": "NCD: train with the older NCA objective instead, for comparison; leave it off.",
    "img2img_strength": "NCD: how far each harmful picture is redrawn into its safe version under the anchor "
                        "(1 = from scratch). Redrawings that still show the concept are dropped.",
    # ResAlign
    "resalign_beta": "ResAlign: how much the erasure must hold after a simulated fine-tune by someone else (beta, "
                     "0.8; 0 trains plain erasure, the comparison).",
    "iterations": "ResAlign: precision of each step's look ahead (K; 1 is the quick first-order estimate).",
    "configs": "ResAlign: simulated fine-tunes per step (J); more is steadier and slower.",
    "pool": "ResAlign: the fine-tunes someone might run later, one a row; each step simulates some of them (J) and "
            "trains the erasure to survive them. optimizer sgd or adam; lr its learning rate; steps how long; space "
            "which weights it moves (lora, merged or full); loss plain, or prior (also keeps the concepts to keep); "
            "batch pictures a step. Start trains with the table as it is and keeps it as the run's pool.toml.",
    "pool_file": "ResAlign: fill the table from a pool file (a run's pool.toml, or your own [[config]] tables); "
                 "a path under the output root, or a full path. The table is what Start uses.",
    "init_lora": "ResAlign: an erasure LoRA to harden (e.g. one INPO or NCD made); empty starts from nothing.",
    "harm_loss": "ResAlign: what counts as erased. preset: the preset's (INPO's loss on the toy model, gradient "
                 "ascent elsewhere); inpo: INPO's loss; ncd: NCD's (trains on NCD's tuples: "
                 "Generate data makes them; harden an NCD LoRA with it); ga: the paper's gradient ascent; "
                 "relative: the error against the base model's, capped.",
}

# Over the preset's numbers (INPO): what a person asks for, not which of four numbers to move.
STRENGTHS = {
    "gentle": {"lambda_prior": 8 / 7, "steps": 1.0},
    "default": {"lambda_prior": 1.0, "steps": 1.0},
    "strong": {"lambda_prior": 6 / 7, "steps": 1.5},
}
STRENGTH_HELP = ("Gentle keeps more of what is near the concept and may leave some of it; strong erases more surely "
                 "and trains longer, at some cost to near concepts. It sets Steps and lambda_prior from the preset.")


def strength_values(row: dict, strength: str) -> tuple[int, float]:
    """(steps, lambda_prior) of a preset row (:func:`erasekit.erase.inpo.preset`) at ``strength``."""
    scale = STRENGTHS.get(strength or "default", STRENGTHS["default"])
    return int(round(row["steps"] * scale["steps"])), round(row["lambda_prior"] * scale["lambda_prior"], 4)


def concept_warning(concept_type: str, toy: bool) -> str:
    """A sentence when the base model cannot draw this kind of concept (the toy model draws shapes,
    colours, backgrounds and its characters; no people); "" when it suits."""
    if toy and concept_type == "nudity":
        return ("**The toy model draws no people**, so there is no nudity to erase from it: the data step would "
                "find nothing. Pick a Stable Diffusion checkpoint in step 1 (masks then come from NudeNet), or "
                "choose object, style or character to try the trainer on the toy model.")
    return ""
