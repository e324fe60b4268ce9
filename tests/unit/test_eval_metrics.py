"""The harness's counting (erasekit/eval/metrics.py) and prompt files (prompts.py), by hand-counted cases."""

import pytest

from erasekit.eval.metrics import Finding, asr, erase_rate, erase_rate_paired, mean_ssim, objects_kept, ssr, summarize
from erasekit.eval.prompts import PromptFileError, PromptRow, read_prompts, toy_prompt_rows, write_prompts_csv


def test_ssr_counts_prompts_with_an_unsafe_image_among_the_first_n_seeds():
    unsafe = [[False, True, False], [False, False, False], [True, False, False]]
    assert ssr(unsafe, 1) == pytest.approx(1 / 3)
    assert ssr(unsafe, 2) == pytest.approx(2 / 3)
    assert ssr(unsafe, 3) == pytest.approx(2 / 3)
    assert ssr(unsafe, 10) is None  # only 3 seeds drawn
    assert asr(x for r in unsafe for x in r) == pytest.approx(2 / 9)


def test_erase_rates():
    assert erase_rate([2, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(1 - 2 / 4)  # DAG: findings, all images
    assert erase_rate_paired([True, True, False, True], [True, False, True, False]) == pytest.approx(1 - 1 / 3)
    assert erase_rate([0, 0], [1, 0]) is None and erase_rate_paired([False], [True]) is None


def test_objects_kept_is_a_multiset_count():
    before = [["red square", "red square", "blue star"], ["bobo"]]
    after = [["red square", "blue star", "green ring"], []]
    assert objects_kept(before, after) == (2, 4)


def test_summarize_splits_unsafe_benign_and_categories():
    rows = [PromptRow(0, "a", ("sexual",)), PromptRow(1, "b", ("sexual", "violence")), PromptRow(2, "c", ("benign",))]
    base = [[Finding(True, 2, ("x",)), Finding(False)], [Finding(True, 1), Finding(True, 1)],
            [Finding(False, 0, ("y", "z")), Finding(False, 0, ("y",))]]
    erased = [[Finding(False, 0, ("x",)), Finding(False)], [Finding(True, 1), Finding(False)],
              [Finding(False, 0, ("y",)), Finding(True, 1, ("y",))]]
    r = summarize(rows, base, erased)
    assert r["unsafe_prompts"] == 2 and r["images"] == 4
    assert r["erase_rate"] == pytest.approx(1 - 1 / 4) and r["erase_rate_images"] == pytest.approx(1 - 1 / 3, abs=1e-4)
    assert r["asr"] == 0.25 and r["asr_base"] == 0.75
    assert r["ssr"] == {"1": 0.5} and r["ssr_base"] == {"1": 1.0}  # 2 seeds: SSR-1 only
    assert r["per_category"]["violence"]["asr"] == 0.5 and r["per_category"]["sexual"]["prompts"] == 2
    assert r["benign"] == {"prompts": 1, "objects_kept": pytest.approx(2 / 3, abs=1e-4), "asr": 0.5, "asr_base": 0.0}
    assert r["preservation_unsafe_prompts"] == 1.0


def test_ssim_is_one_for_identical_images_and_lower_for_changed_ones():
    np = pytest.importorskip("numpy")
    pytest.importorskip("skimage")
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[8:24, 8:24] = 0
    assert mean_ssim([(a, a)]) == pytest.approx(1.0)
    assert mean_ssim([(a, b)]) < 0.9


def test_prompt_files(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text('prompt,categories,hard,sd_seed,sd_guidance_scale\n"a cat, sitting","sexual, violence",1,42,7.5\n'
                   ',benign,0,,\nhello,benign,0,3,\n')
    rows = read_prompts(str(csv))
    assert [r.prompt for r in rows] == ["a cat, sitting", "hello"]  # an empty prompt cell is skipped
    assert rows[0].categories == ("sexual", "violence") and rows[0].seed == 42 and rows[0].guidance == 7.5
    assert rows[1].is_benign() and rows[1].guidance is None
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\na red circle\n\n  a blue star  \n")
    assert [r.prompt for r in read_prompts(str(txt))] == ["a red circle", "a blue star"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("", "has no prompts"), ("# only a comment\n", "has no prompts"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_bad_prompt_files_are_named(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(str(path))


def test_csv_without_prompt_column_and_bad_seed(tmp_path):
    (tmp_path / "a.csv").write_text("text,categories\nhi,x\n")
    with pytest.raises(PromptFileError, match="no 'prompt' column"):
        read_prompts(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("prompt,sd_seed\nhi,abc\n")
    with pytest.raises(PromptFileError, match="Line 2 .* sd_seed = 'abc'"):
        read_prompts(str(tmp_path / "b.csv"))


def test_toy_prompt_csv_round_trips(tmp_path):
    path = write_prompts_csv(str(tmp_path / "toy.csv"), toy_prompt_rows("red circle", 6, 3))
    rows = read_prompts(path)
    assert len(rows) == 9 and sum(r.is_benign() for r in rows) == 3
    assert all("red circle" in r.categories and "red circle" in r.prompt for r in rows if not r.is_benign())
    assert all("red circle" not in r.prompt for r in rows if r.is_benign())


def test_bench_dag_counts_through_the_harness():
    """bench dag's (erase_rate, preservation) on hand-made judgements: the paired ER over images and the
    other objects kept, objects only (a style target's backgrounds do not count there)."""
    import numpy as np

    from erasekit.bench.dag import erase_and_preservation
    from erasekit.toyworld.judge import Detection, Judgement
    from erasekit.toyworld.vocab import parse_concept

    def j(*labels, background="plain"):
        objs = [Detection(*label.split(), mask=np.ones((32, 32), bool), area=30) for label in labels]
        return Judgement(objs, background)

    red = parse_concept("red circle")
    plain = [j("red circle", "blue star"), j("red circle"), j("green ring", "green ring"), j("red circle")]
    guided = [j("blue star"), j("red circle"), j("green ring"), j("white circle")]
    # 3 images showed it, 1 still does; others before: blue star, 2 green rings -> 2 of 3 kept
    assert erase_and_preservation(red, plain, guided) == (round(1 - 1 / 3, 4), round(2 / 3, 4))
    stripes = parse_concept("striped background")
    plain = [j("red square", background="stripes"), j("blue star", background="dots")]
    guided = [j("red square", background="plain"), j("blue star", background="grid")]
    assert erase_and_preservation(stripes, plain, guided) == (1.0, 1.0)  # the lost dotted background is not counted


def test_importing_the_harness_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, erasekit.eval.__main__, erasekit.eval.harness, erasekit.eval.report, erasekit.eval.detectors;"
            "print([m for m in ('torch', 'nudenet', 'onnxruntime', 'cv2', 'skimage', 'diffusers', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_unchanged_allows_one_level_of_rounding_and_nothing_more():
    import numpy as np

    from erasekit.eval.metrics import unchanged

    a = np.random.default_rng(0).integers(1, 254, (8, 8, 3), dtype=np.uint8)
    b = a.copy()
    assert unchanged(a, b)
    b[0, 0, 0] += 1
    b[3, 2, 1] -= 1
    assert unchanged(a, b)  # the rounding another batch composition can cause
    b[5, 5, 2] += 2
    assert not unchanged(a, b) and not unchanged(a, a[:4])
