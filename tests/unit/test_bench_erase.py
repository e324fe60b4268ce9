"""The erase benchmark's counting, on hand-made judge rows, and its CLI's NCD-only data flags."""

from erasekit.bench.erase import erase_counts, requested_labels


def test_requested_labels_reads_bench_prompts():
    assert requested_labels("a red circle") == ["red circle"]
    assert requested_labels("a red square and an orange star on a striped background") == ["red square", "orange star"]
    assert requested_labels("a bobo and a blue ring") == ["bobo", "blue ring"]
    assert requested_labels("a red square on a dotted background", background=True) == ["red square", "dotted background"]
    assert requested_labels("a red square", background=True) == ["red square"]


def test_erase_counts_by_hand():
    prompts = {"target": ["a red circle and a blue square", "a red circle"],
               "benign": ["a green star and a blue square", "a blue square"]}
    # rows: (target found, non-target labels found)
    before = {"target": [(True, ["blue square"]), (False, [])],
              "benign": [(False, ["green star", "blue square"]), (False, ["blue square", "white ring"])]}
    after = {"target": [(False, ["blue square"]), (True, [])],
             "benign": [(False, ["green star"]), (False, ["blue square", "blue square"])]}
    n = erase_counts({k: (before[k], after[k]) for k in before}, prompts, neighbours={"blue square"})
    # one target image showed it before, none of those after (the second image only after: ignored)
    assert (n["drawn_before"], n["still"]) == (1, 0)
    # same-seed: 5 objects before (1 + 0 + 2 + 2), kept 1 + 1 + 1
    assert (n["kept"], n["total"]) == (3, 5)
    # asked for and found: before 1 + 2 + 1 = 4 (the white ring was not asked for), after 1 + 1 + 1 = 3
    assert (n["asked_before"], n["asked_after"]) == (4, 3)
    assert n["asked_by_kind"] == {"neighbour": [3, 2], "unrelated": [1, 1]}  # blue squares / the green star


def test_a_style_erasure_keeps_count_of_the_other_styles():
    prompts = {"target": ["a red square on a striped background"], "benign": ["a blue star on a dotted background"]}
    before = {"target": [(True, ["red square"])], "benign": [(False, ["blue star", "dotted background"])]}
    after = {"target": [(False, ["red square", "grid background"])], "benign": [(False, ["blue star"])]}
    n = erase_counts({k: (before[k], after[k]) for k in before}, prompts, neighbours={"dotted background"},
                     backgrounds=True)
    assert (n["drawn_before"], n["still"]) == (1, 0)
    assert n["asked_by_kind"] == {"neighbour": [1, 0], "unrelated": [2, 2]}  # the dotted background was lost


def test_ncd_data_flags_are_refused_for_another_method(capsys):
    """--img2img-strength and --anchor are NCD's data settings: the CLI stops before any work for INPO."""
    import pytest

    from erasekit.bench.__main__ import main

    for flag, value in (("--img2img-strength", "0.8"), ("--anchor", "green circle")):
        with pytest.raises(SystemExit) as err:
            main(["erase", "--method", "inpo", flag, value])
        assert err.value.code == 2 and f"{flag} is a setting of ncd's data" in capsys.readouterr().err
