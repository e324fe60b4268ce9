"""ResAlign and NCD on the trainer page without a browser: the pool table (read by the core's rules,
refused in one sentence under Start, written as the run's pool.toml, kept by saved settings, filled
from a pool file or a run's settings), the signal plot's frames and notes of ResAlign and NCD, and
the upload summary in NCD's terms (pairs)."""

import math

import pandas as pd
import pytest

from erasekit.erase.resalign import DEFAULT_POOL, InnerConfig, pool_rows, read_pool, write_pool
from erasekit.errors import ErasekitError


@pytest.fixture
def app(tmp_path):
    from trainer.app import TrainerApp

    return TrainerApp(tmp_path / "runs")


def values(app, **kw):
    """The page's field values in KEYS order (the app's defaults, with ``kw``)."""
    from trainer.fields import KEYS

    return [kw.get(k, app.defaults[k]) for k in KEYS]


def edited_table(**cells):
    """The default table as the page sends it (a DataFrame of text cells, as a person types them),
    its first row's ``cells`` changed."""
    from trainer.pool import COLUMNS, DEFAULT_TABLE

    frame = pd.DataFrame([[str(v) for v in row] for row in DEFAULT_TABLE["data"]], columns=COLUMNS)
    for k, v in cells.items():
        frame.loc[0, k] = v
    return frame


# ----------------------------------------------------------------------------- the pool table


def test_core_pool_rows_name_the_bad_row_in_one_sentence():
    assert pool_rows([{"optimizer": "adam", "lr": 1e-3, "steps": 3}]) == [InnerConfig("adam", 1e-3, 3)]
    for row, words in (({"optimizer": "adamw"}, "row 2, has optimizer = 'adamw'; it must be one of sgd, adam."),
                       ({"steps": 0}, "row 2, has steps = 0; it must be a whole number, at least 1."),
                       ({"steps": 2.5}, "steps = 2.5; it must be a whole number"),
                       ({"lr": "fast"}, "lr = 'fast'; it must be a number above 0."),
                       ({"lr": math.nan}, "lr = nan"),
                       ({"space": None}, "row 2, has no space; fill it in or remove the row."),
                       ({"epochs": 3}, "unknown keys ['epochs']")):
        with pytest.raises(ErasekitError) as err:
            pool_rows([{"steps": 1}, {"optimizer": "sgd", **row}], "The table")
        assert str(err.value).startswith("The table") and words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ErasekitError, match="has no rows"):
        pool_rows([], "The table")


def test_the_table_reads_typed_cells_and_refuses_a_bad_row_in_the_pages_words():
    from trainer.pool import COLUMNS, DEFAULT_TABLE, pool_from_table, table_rows

    assert DEFAULT_TABLE["headers"] == COLUMNS == ["optimizer", "lr", "steps", "space", "loss", "batch"]
    assert pool_from_table(DEFAULT_TABLE) == read_pool("")  # the page's default is the built-in pool
    pool = pool_from_table(edited_table(steps="3", lr=" 1e-4 "))
    assert pool[0] == InnerConfig("adam", 1e-4, 3, "full", "plain", 2) and len(pool) == len(DEFAULT_POOL)
    blank = pd.concat([edited_table(), pd.DataFrame([[None] * 6], columns=COLUMNS)])
    assert len(table_rows(blank)) == len(DEFAULT_POOL)  # an added, untouched row is no fine-tune
    assert table_rows([["sgd", 0.01, 5.0, "lora", "plain", 2]]) == [
        {"optimizer": "sgd", "lr": 0.01, "steps": 5, "space": "lora", "loss": "plain", "batch": 2}]
    with pytest.raises(ErasekitError) as err:
        pool_from_table(edited_table(steps="three"))
    assert str(err.value) == ("The ResAlign pool table (step 4, Advanced settings), row 1, has steps = 'three'; it "
                              "must be a whole number, at least 1.")


def test_start_refuses_a_bad_row_under_start_and_nothing_starts(app):
    from trainer import jobs

    before = len(jobs.JOBS)
    msg, job_id = app.start_training(*values(app, method="resalign", run_name="ra", pool=edited_table(space="everything")))
    assert msg.startswith("**Error:** The ResAlign pool table") and "space = 'everything'" in msg and job_id == 0
    assert "--" not in msg and len(jobs.JOBS) == before and not (app.root / "ra").exists()
    # another method does not read the table: a bad row there is not its business
    s = app.settings(values(app, method="inpo", pool=edited_table(space="everything")))
    assert s["pool"] is None and "pool_rows" not in s


def test_start_writes_the_table_as_the_runs_pool_toml_and_passes_its_path(app, tmp_path):
    from dataclasses import asdict

    from trainer.pool import pool_from_table
    from trainer.work import train_argv, with_pool_file

    s = app.settings(values(app, method="resalign", run_name="ra", pool=edited_table(steps="3")))
    assert "--pool" not in train_argv(s, tmp_path / "ra")  # the data step: no pool flag (the table is no path)
    s["pool_rows"] = [asdict(c) for c in pool_from_table(s["pool_table"])]  # what start_training adds
    run = tmp_path / "ra"
    run.mkdir()
    argv = train_argv(with_pool_file(s, run), run)
    assert argv[argv.index("--pool") + 1] == str(run / "pool.toml")
    assert read_pool(str(run / "pool.toml"))[0].steps == 3 and len(read_pool(str(run / "pool.toml"))) == len(DEFAULT_POOL)
    inpo = app.settings(values(app, method="inpo"))
    assert with_pool_file(inpo, run) is inpo and "--pool" not in train_argv(inpo, run)


def test_saved_settings_keep_the_table_and_a_runs_settings_fill_it(app, tmp_path):
    from trainer.fields import KEYS
    from trainer.pool import payload

    assert app.save_settings("mine.toml", *values(app, method="resalign", pool=edited_table(steps="3", batch="4")))\
        .startswith("Settings saved")
    from erasekit.erase.state import read_config

    assert read_config(app.root / "mine.toml")["app"]["pool"][0] == {"optimizer": "adam", "lr": 3e-4, "steps": 3,
                                                                     "space": "full", "loss": "plain", "batch": 4}
    loaded = dict(zip(KEYS, app.load_settings("mine.toml")))
    assert loaded["method"] == "resalign" and loaded["pool"]["data"][0] == ["adam", 3e-4, 3, "full", "plain", 4]
    assert loaded["pool"]["data"][1:] == payload(DEFAULT_POOL)["data"][1:]
    # a bad row is not saved (Load settings could not read it back)
    assert "row 1, has steps = 0" in app.save_settings("bad.toml", *values(app, pool=edited_table(steps="0")))
    assert not (app.root / "bad.toml").exists()
    # a run's config.toml names its pool.toml: Load settings shows that file's rows in the table
    run = app.root / "ran"
    run.mkdir(parents=True)
    write_pool(run / "pool.toml", [InnerConfig("sgd", 0.05, 7, "merged", "prior", 1)])
    (run / "config.toml").write_text(f'[train]\nmethod = "resalign"\nsteps = 2\n[resalign]\npool = "{run / "pool.toml"}"\n'
                                     "configs = 1\n")
    loaded = dict(zip(KEYS + ["message"], app.load_settings("ran/config.toml")))
    assert loaded["pool"]["data"] == [["sgd", 0.05, 7, "merged", "prior", 1]] and loaded["configs"] == 1
    (run / "pool.toml").unlink()
    msg = app.load_settings("ran/config.toml")[-1]
    assert msg.startswith("**Error:** The setting 'pool'") and "does not exist" in msg


def test_load_pool_file_fills_the_table(app):
    app.root.joinpath("pools").mkdir()
    write_pool(app.root / "pools" / "mine.toml", [InnerConfig("adam", 1e-3, 4, "lora", "plain", 2)] * 2)
    table, msg = app.load_pool_file("pools/mine.toml")
    assert table["data"] == [["adam", 1e-3, 4, "lora", "plain", 2]] * 2 and "2 simulated fine-tunes" in msg
    (app.root / "pools" / "bad.toml").write_text('[[config]]\noptimizer = "rmsprop"\n')
    _, msg = app.load_pool_file("pools/bad.toml")
    assert msg.startswith("**Error:**") and "optimizer = 'rmsprop'" in msg
    _, msg = app.load_pool_file("pools/none.toml")
    assert "does not exist" in msg


# ----------------------------------------------------------------------------- the signal plot


def test_resalign_signal_is_harm_before_and_after_the_fine_tune_with_the_guard_count():
    from trainer.plots import SIGNAL_COLOURS, signal_frame

    rows = [{"step": 1, "loss": 1.0, "harm": 0.9, "harm_star": 1.2, "hyper_norm": 0.5, "guard": 0.0, "fallback": 0.0},
            {"step": 2, "loss": 0.8, "harm": 0.7, "harm_star": 1.0, "hyper_norm": 0.4, "guard": 2.0, "fallback": 1.0},
            {"step": 3, "loss": 0.6, "harm": 0.5, "harm_star": 0.6, "hyper_norm": 0.25, "guard": 0.0, "fallback": 0.0}]
    frame, note = signal_frame(rows, "resalign", {"beta": 0.8})
    assert set(frame["series"]) == {"harm now", "harm now, smoothed", "harm after a simulated fine-tune",
                                    "harm after a simulated fine-tune, smoothed"}
    assert list(frame[frame["series"] == "harm now"]["value"]) == [0.9, 0.7, 0.5]
    assert list(frame[frame["series"] == "harm after a simulated fine-tune"]["value"]) == [1.2, 1.0, 0.6]
    assert list(frame[frame["series"] == "harm now"]["step"]) == [1, 2, 3]
    assert set(frame["series"]) <= set(SIGNAL_COLOURS) and "Delta S" not in note
    assert "Erased looks like both lines falling" in note
    assert "Outer step 3: harm 0.5, after the simulated fine-tune 0.6, hypergradient norm 0.25." in note
    assert "guard stepped in 2 times on 1 of 3 steps (1 fell back to the first-order estimate)" in note
    calm = [{**r, "guard": 0.0, "fallback": 0.0} for r in rows]
    assert "stepped in 0 times on 0 of 3 steps: none needed." in signal_frame(calm, "resalign", {})[1]
    # beta = 0 (the plain control): no fine-tune is simulated, only harm now is drawn
    plain, note = signal_frame([{"step": 1, "harm": 0.9, "retain": 0.1}], "resalign", {"beta": 0.0})
    assert set(plain["series"]) == {"harm now", "harm now, smoothed"} and "Outer step 1: harm 0.9." in note


def test_ncd_signal_is_its_implicit_accuracy_and_sigma_r0_not_delta_s():
    from trainer.plots import SIGNAL_COLOURS, signal_axis, signal_frame

    rows = [{"step": i, "loss": 1.0, "implicit_acc": a, "sigma_r0": s}
            for i, (a, s) in enumerate(((0.0, 0.5), (0.5, 0.6), (1.0, 0.75)), 1)]
    frame, note = signal_frame(rows, "ncd", {"beta": 2000.0})
    series = set(frame["series"])
    assert {"implicit accuracy (safe picture ahead)", "sigma(r_0) (the safe picture's reward)"} < series
    assert list(frame[frame["series"] == "sigma(r_0) (the safe picture's reward)"]["value"]) == [0.5, 0.6, 0.75]
    line = frame[frame["series"] == "0.5 (sigma(r_0) at the start)"]
    assert list(line["value"]) == [0.5, 0.5] and list(line["step"]) == [1, 3]
    assert series <= set(SIGNAL_COLOURS) and not any("Delta S" in s for s in series) and "Delta S" not in note
    assert "implicit accuracy climbing to 1" in note and "Last step: implicit accuracy 1, sigma(r_0) 0.75." in note
    assert signal_axis("ncd") != signal_axis("inpo") == "Delta S"
    empty, waiting = signal_frame([{"step": 1, "loss": 1.0}], "ncd", {})  # no NCD terms yet
    assert empty.empty and waiting.startswith("Erased looks like the implicit accuracy")


# ----------------------------------------------------------------------------- uploads for NCD


def test_the_upload_summary_counts_ncd_pairs_when_ncd_is_chosen(app, tmp_path):
    from PIL import Image

    files = []
    for name in ("a.png", "a_safe.png", "b.png", "b_safe.png", "b_2.png", "c.png", "a.txt"):
        path = tmp_path / name
        if name.endswith(".png"):
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_text("a red circle")
        files.append(str(path))
    ncd = app.upload_images("up", files, "ncd")
    assert ncd == ("2 uploaded NCD pairs (a picture of the concept beside its safe version, name_safe.png; 1 more "
                   "pictures of the concept as name_2 / name_3) replace NCD's generated tuples of run 'up'; 1 picture "
                   "without a name_safe.png (c) is left out."), ncd
    assert "forget" not in ncd
    inpo = app.upload_summary("up", "inpo")  # the method changed on the page: the same files in INPO's terms
    assert inpo.startswith("6 uploaded images (0 with a mask") and "forget set" in inpo
    lone = app.upload_images("lone", [files[0]], "ncd")
    assert lone.startswith("**No NCD pair** among the 1 uploaded images") and "name_safe.png" in lone
    assert app.upload_summary("nothing-here", "ncd") == ""


def test_the_page_plots_the_signal_of_the_method_the_run_was_made_with(tmp_path):
    """A run's config.toml names its method by its own table ([ncd], [resalign]); the page's signal
    plot and note follow it (not INPO's Delta S for every LoRA run)."""
    import json

    from trainer.view import _plots, run_method

    rows = {"resalign": {"harm": 0.8, "harm_star": 0.9, "hyper_norm": 0.1, "guard": 1.0, "fallback": 0.0},
            "ncd": {"implicit_acc": 0.5, "sigma_r0": 0.6}, "inpo": {"delta_s": 0.2}}
    series = {"resalign": "harm now", "ncd": "implicit accuracy (safe picture ahead)",
              "inpo": "Delta S (how much less likely the concept became)"}
    for method, terms in rows.items():
        run = tmp_path / method
        run.mkdir()
        (run / "config.toml").write_text(f'[train]\nsteps = 2\n[{method}]\nbeta = 0.8\n[data]\nforget_images = 2\n')
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0, **terms}) + "\n" for i in (1, 2)))
        out = _plots({}, run)
        assert series[method] in set(out["signal"]["value"]["series"]), method
        assert out["signal"]["y_title"] == {"resalign": "harm loss (lower: more erased)", "ncd": "share / probability",
                                            "inpo": "Delta S"}[method]
        assert ("Delta S" in out["signal_note"]) == (method == "inpo"), method
    assert run_method({"train": {"method": "guideline"}}) == "guideline" and run_method({}) == "inpo"
