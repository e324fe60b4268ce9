"""The erase benchmark's counting, on hand-made judge rows, and its CLI's NCD-only data flags."""

import pytest

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


@pytest.mark.slow  # trains a LoRA (2 steps, but the data is drawn first): minutes on a loaded machine
def test_bench_erase_draws_and_judges_through_the_harness(tmp_path, monkeypatch, one_thread):
    """Every image the bench counts comes from the harness's draw_and_judge (a pass-through spy records it), prompt i
    with seed i, and the bench's figures are recomputed from what that returned (bundled toy model, 2 training
    steps, 3 + 3 prompts, 2 SSR prompts)."""
    from erasekit.bench.erase import _rates, _rows, bench_erase, erase_counts, ssr_asr
    from erasekit.eval import draw
    from erasekit.toyworld.vocab import parse_concept

    seen = []
    real = draw.draw_and_judge

    def spy(comps, jobs, steps, detector, **kw):
        out = real(comps, jobs, steps, detector, **kw)
        seen.append((list(jobs), out))
        return out

    monkeypatch.setattr(draw, "draw_and_judge", spy)
    r = bench_erase("inpo", "red circle", n_prompts=3, steps=2, forget_images=2, images_per_concept=2, neighbours=1,
                    ssr_prompts=2, cost=False, out_dir=str(tmp_path), log=lambda m: None)
    # base: target, benign, SSR; erased: target, benign, SSR
    assert len(seen) == 6
    assert [j[1] for j in seen[0][0]] == [0, 1, 2] and all(j[2] == 3.0 for jobs, _ in seen for j in jobs)
    assert len(seen[2][0]) == 2 * 10 and [j[0] for j in seen[2][0]] == [j[0] for j in seen[5][0]]
    before = {"target": _rows(seen[0][1][1]), "benign": _rows(seen[1][1][1])}
    after = {"target": _rows(seen[3][1][1]), "benign": _rows(seen[4][1][1])}
    prompts = {"target": [j[0] for j in seen[0][0]], "benign": [j[0] for j in seen[1][0]]}
    n = erase_counts({k: (before[k], after[k]) for k in prompts}, prompts,
                     {c.text for c in parse_concept("red circle").neighbours()})
    rates = _rates(n)
    assert (r["erase_rate"], r["preservation"]) == (rates["erase_rate"], rates["preservation"])
    assert r["targets_drawn_before"] == round(n["drawn_before"] / 3, 4)
    hits = [f.unsafe for f in seen[5][1][1]]
    assert r["asr"] == ssr_asr([hits[:10], hits[10:]])["asr"] and r["ssr_seeds"] == [j[1] for j in seen[5][0][:10]]
    assert "preservation_benign_same_seed" in r and "per-image noise" in r["sampler"]


def test_ncd_data_flags_are_refused_for_another_method(capsys):
    """--img2img-strength and --anchor are NCD's data settings: the CLI stops before any work for INPO."""
    import pytest

    from erasekit.bench.__main__ import main

    for flag, value in (("--img2img-strength", "0.8"), ("--anchor", "green circle")):
        with pytest.raises(SystemExit) as err:
            main(["erase", "--method", "inpo", flag, value])
        assert err.value.code == 2 and f"{flag} is a setting of ncd's data" in capsys.readouterr().err
