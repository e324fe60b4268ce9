"""The method registry (erasekit.erase.methods) and how the trainer's settings reach a method."""

import pytest

from erasekit.erase import methods
from erasekit.errors import ErasekitError
from trainer.arguments import build_parser
from trainer.runner import resolve


def parse(*argv):
    return build_parser().parse_args(["train", "--target", "red circle", "--out", "/tmp/x", *argv])


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ErasekitError, match="Unknown erasure method 'esd'; choose one of inpo"):
        methods.get("esd")


def test_preset_splits_train_and_method_settings():
    train, method = methods.get("inpo").preset("object", toy=True)
    assert {"steps", "rank", "lr", "targets"} <= set(train)
    assert "eta" in method and "steps" not in method
    objective = methods.get("inpo").objective(methods.get("inpo").config(**method))
    assert objective.name == "inpo" and objective.config.lambda_prior == method["lambda_prior"]


def test_method_flags_reach_the_method_table():
    tables = resolve(parse("--eta", "2.5", "--steps", "7"), "object", toy=True)
    assert tables["method"]["eta"] == 2.5 and tables["train"]["steps"] == 7


def test_a_flag_of_another_method_is_refused(monkeypatch):
    other = methods.Method("other", "another method", "inpo", "InpoConfig", "InpoObjective",
                           flags=(methods.Flag("omega", float, "another method's setting"),))
    monkeypatch.setitem(methods.METHODS, "other", other)
    args = parse("--method", "inpo")
    args.omega = 3.0  # as if the parser had the flag (it is built from METHODS at import)
    with pytest.raises(ErasekitError, match="--omega is a setting of OTHER, not of INPO"):
        resolve(args, "object")
