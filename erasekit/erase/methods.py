"""The erasure methods the trainer offers, one :class:`Method` each: what the CLI's ``--method``,
the trainer page's method list, the benchmarks and a run's ``config.toml`` table ``[<name>]`` name.

A method is a module of :mod:`erasekit.erase` with
- a config dataclass (its settings, the ``[<name>]`` table) and an :class:`~.objective.Objective`;
- ``preset(name_or_kind, toy=False) -> dict``: the settings of a concept type (object, character,
  style, nsfw); keys that are :class:`~.engine.TrainConfig` fields (steps, lr, rank, targets) go to
  ``[train]``, the rest to the method's table;
- optionally ``build_data(components, target, data_config, log=None, progress=None, method_config=None)``:
  the method's training data (default: :func:`~.data.build_erase_data`, the forget / preserve sets), with
  ``progress(images done, images to draw)`` as they are drawn (``method_config``: the run's method settings,
  where they choose the data: ResAlign's NCD harm loss trains on NCD's tuples), and a ``data_config_class``
  (a :class:`~.data.DataConfig` subclass with the method's own data settings, the ``[data]`` table).

Modules are imported only when a method is used, so listing the methods costs no torch import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

from ..errors import ErasekitError


@dataclass(frozen=True)
class Flag:
    """A method setting the CLI takes as ``--<flag>`` (the page shows the same key)."""

    flag: str  # "lambda-prior": --lambda-prior, key lambda_prior in the method's table
    kind: type
    help: str

    @property
    def key(self) -> str:
        return self.flag.replace("-", "_")


@dataclass(frozen=True)
class Method:
    name: str  # --method, the [<name>] table, the LoRA's ss_erasekit_method
    label: str  # one line for menus
    module: str  # the module under erasekit.erase
    config_class: str
    objective_class: str
    flags: tuple = ()
    data_config_class: str = ""  # default: data.DataConfig

    def _module(self):
        return importlib.import_module(f"{__package__}.{self.module}")

    @property
    def config(self) -> type:
        return getattr(self._module(), self.config_class)

    @property
    def data_config(self) -> type:
        """The ``[data]`` table's class: the method's own, or :class:`~.data.DataConfig`."""
        if not self.data_config_class:
            from .data import DataConfig

            return DataConfig
        return getattr(self._module(), self.data_config_class)

    def objective(self, config=None):
        """The method's Objective, with ``config`` (default: the config class's defaults)."""
        return getattr(self._module(), self.objective_class)(config if config is not None else self.config())

    def preset(self, name_or_kind: str, toy: bool = False) -> tuple[dict, dict]:
        """``(train settings, method settings)`` of a preset or concept kind; ``toy``: the toy
        model's tuning on top."""
        from .engine import TrainConfig

        row = dict(self._module().preset(name_or_kind, toy=toy))
        train_keys = {f.name for f in fields(TrainConfig)}
        return {k: v for k, v in row.items() if k in train_keys}, {k: v for k, v in row.items() if k not in train_keys}

    def build_data(self, components, target, data_config, log=None, progress=None, method_config=None):
        """The method's training data (loaded from ``data_config.cache`` where it was made from the same
        inputs); ``progress(done, total)``: images drawn so far of those to draw (not called for a cache);
        ``method_config``: the run's settings of this method (default: its defaults)."""
        build = getattr(self._module(), "build_data", None)
        if build is None:
            from .data import build_erase_data

            return build_erase_data(components, target, data_config, log=log or print, progress=progress)
        return build(components, target, data_config, log=log, progress=progress, method_config=method_config)


METHODS = {
    "inpo": Method(
        "inpo", "INPO: an erasure LoRA (negative preference against the base model)", "inpo", "InpoConfig",
        "InpoObjective", flags=(
            Flag("eta", float, "INPO Eq. 13/15: erasure strength (preset: 1, style 3)"),
            Flag("gamma", float, "INPO Eq. 14: sharpness of the adaptive scaling (preset 3)"),
            Flag("tau", float, "INPO Eq. 14: target margin of dS (preset 0.1)"),
            Flag("lambda-prior", float, "INPO Alg. 1: weight of the prior preservation loss, Eq. 16 (preset 0.6)"),
            Flag("lambda-anchor", float, "beyond the paper: Eq. 16 on the forget images under preserved prompts (0: off)"),
        )),
    "ncd": Method(
        "ncd", "NCD: an erasure LoRA (noise contrast: a safe picture preferred over three harmful ones)", "ncd",
        "NcdConfig", "NcdObjective", data_config_class="NcdDataConfig", flags=(
            Flag("beta", float, "NCD Eq. 10: reward scale of the implicit rewards (the official code: 2000 for SD1.5)"),
            Flag("score-temperature", float, "NCD Eq. 11: alpha, temperature of the score weights' softmax (0.1)"),
            Flag("lambda-pair", float, "NCD Eq. 18: lambda, weight of the pairwise loss (0.5)"),
            Flag("pair-reduce", str, "NCD Eq. 18: sum (the paper) or mean (the official code) over the harmful images"),
            Flag("harm-weights", str, "NCD-HA Eq. 19-20: weights of the harmful images, most harmful first, e.g. "
                                      "1.2,1.0,0.8 (Tab. 8); empty: plain NCD"),
            Flag("nca", bool, "the NCA objective (Eq. 15) instead of NCD's (the gradient-reversal ablation)"),
            Flag("lambda-prior", float, "beyond the NCD paper: INPO's prior preservation loss on preserve images (0: off)"),
            Flag("lambda-safe", float, "beyond the NCD paper: weight of the denoising loss on the safe picture under "
                                       "the harmful prompt (0: off)"),
        )),
    "resalign": Method(
        "resalign", "ResAlign: an erasure LoRA trained to survive later fine-tuning (implicit hypergradient)",
        "resalign", "ResAlignConfig", "ResAlignObjective", flags=(
            Flag("beta", float, "ResAlign Eq. 3: weight of the harm after a simulated fine-tune (0.8; 0: plain control)"),
            Flag("alpha-r", float, "ResAlign Eq. 3: weight of the preservation term R at the start (1.6; toy 1000)"),
            Flag("alpha-r-end", float, "ResAlign: R's weight after the sigmoid ramp of the second half (2.0; toy 1000)"),
            Flag("harm-loss", str, "ResAlign: the harm loss, ga (the paper), inpo (INPO Eq. 15) or relative (error vs the base model's, capped)"),
            Flag("harm-cap", float, "ResAlign: with --harm-loss relative, the most (e - e0) / e0 counts (5)"),
            Flag("text-retain", float, "ResAlign (beyond the paper): weight of the cross-attention keys' and values' "
                 "change on benign prompts (0: off; needs a LoRA on the cross-attention)"),
            Flag("net-of-damage", bool, "ResAlign (beyond the paper): the harm after a simulated fine-tune net of its "
                 "damage to the preserve images (a fine-tune that blurs everything is no kept erasure)"),
            Flag("moreau-gamma", float, "ResAlign Eq. 5: the Moreau envelope's gamma (1)"),
            Flag("iterations", int, "ResAlign Alg. 1: K Richardson iterations (5; 1 = first order)"),
            Flag("configs", int, "ResAlign Alg. 2: J simulated fine-tunes per step (3)"),
            Flag("pool", str, "ResAlign: a TOML file of [[config]] fine-tunes (default: the built-in pool)"),
            Flag("finetune-images", int, "ResAlign: images in the simulated fine-tuning set (32)"),
            Flag("finetune-dir", str, "ResAlign: a folder of fine-tuning images (needed off the toy model)"),
            Flag("init-lora", str, "ResAlign: harden this erasure LoRA (start from its weights)"),
        )),
}


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is one sentence listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ErasekitError(f"Unknown erasure method '{name}'; choose one of {', '.join(METHODS)}.") from None


def all_flags() -> dict:
    """``{flag: Flag}`` over every method (a flag several methods share is declared once per method,
    with the same type)."""
    out = {}
    for method in METHODS.values():
        for f in method.flags:
            prev = out.get(f.flag)  # a shared flag's --help gives what each method means by it
            out[f.flag] = f if prev is None else Flag(f.flag, prev.kind, f"{prev.help}; {f.help}")
    return out


def methods_with_flag(flag: str) -> list:
    return [m.name for m in METHODS.values() if any(f.flag == flag for f in m.flags)]
