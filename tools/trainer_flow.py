"""The trainer app's whole flow on the bundled toy model, timed: what a person does in the browser.

    python -m tools.trainer_flow --out out/trainer-flow [--comfyui-prompts 20]
    python -m tools.trainer_flow --browser --screenshots docs/trainer   # clicks in headless Chromium

Starts the Gradio app (127.0.0.1, a free port) on ``models/toy`` with the page's default settings
(the INPO preset for an object, "red circle"), and drives it through its own API with
``gradio_client``, as the page's buttons do: generate data -> train -> check -> export. Prints one
JSON line: seconds per step and in all, the check's judge counts, the exported LoRA's path and,
with ``--comfyui-prompts N``, what real ComfyUI draws with that LoRA (tools/erase_check_comfy.py).
With ``--browser`` the same flow is clicked in headless Chromium instead (tools/browser.py), with
every field left at the page's default, and a screenshot of each step is saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from tools import REPO

FLOW_FIELDS = ("base", "run_name", "target", "preserve", "forget_images", "images_per_concept", "neighbours",
               "unrelated", "data_steps", "steps", "lr", "rank", "batch_size", "sample_every", "sample_steps",
               "checkpoint_every")


def _wait(client, job_id, timeout=1800):
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(job_id=job_id, api_name="/job_status")
        if st["state"] not in ("queued", "running"):
            return st
        time.sleep(1.0)
    raise RuntimeError(f"job {job_id} did not finish in {timeout} s")


def run_flow(out: str, threads: int = 2, **overrides) -> dict:
    import torch
    from gradio_client import Client

    from trainer.app import TrainerApp

    torch.set_num_threads(threads)
    app = TrainerApp(os.path.join(out, "runs"), base=os.path.join(REPO, "models", "toy"), threads=threads)
    demo = app.build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False)
    d = {**app.defaults, **overrides}
    d["preserve"] = d["preserve"] or "\n".join(app._suggested(d["target"]))
    fields = {k: d[k] for k in FLOW_FIELDS}
    seconds, result = {}, {"settings": {k: v for k, v in fields.items() if k != "base"}}
    t_all = time.time()
    try:
        for step, api in (("data", "/generate_data"), ("train", "/start_training")):
            t0 = time.time()
            _, job = client.predict(**fields, api_name=api)
            st = _wait(client, job)
            if st["state"] != "done":
                raise RuntimeError(f"{step} ended '{st['state']}': {st.get('message')}")
            seconds[step] = round(time.time() - t0, 1)
        t0 = time.time()
        _, job = client.predict(run_name=fields["run_name"], seeds=4, steps=25, api_name="/check")
        if _wait(client, job)["state"] != "done":
            raise RuntimeError("the check did not finish")
        seconds["check"] = round(time.time() - t0, 1)
        page = client.predict(run_name=fields["run_name"], api_name="/refresh")
        result["check_counts"] = page[8]["data"] if isinstance(page[8], dict) else page[8]
        t0 = time.time()
        _, path = client.predict(run_name=fields["run_name"], lora_name="erase-red-circle", description="Erases red circles.",
                                 license="mit", destination="output root", folder="loras", api_name="/export")
        seconds["export"] = round(time.time() - t0, 1)
        result["lora"] = path
    finally:
        demo.close()
    seconds["total"] = round(time.time() - t_all, 1)
    result["seconds"] = seconds
    return result


def run_browser_flow(out: str, screenshots: str, threads: int = 2) -> dict:
    """Click through the page at its defaults in headless Chromium; screenshots ``<screenshots>/<step>.png``."""
    import torch

    from tools import browser as b
    from trainer.app import TrainerApp

    torch.set_num_threads(threads)
    comfy_base = os.path.join(out, "comfyui-base")  # as `make trainer`: exports go to a ComfyUI models/loras
    os.makedirs(os.path.join(comfy_base, "models", "loras"), exist_ok=True)
    app = TrainerApp(os.path.join(out, "runs"), comfyui=comfy_base, base=os.path.join(REPO, "models", "toy"),
                     threads=threads)
    demo = app.build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    driver = b.start()
    seconds, shots = {}, []

    def shot(name, elem_id=None):
        shots.append(b.shot(driver, os.path.join(screenshots, f"{name}.png"), elem_id))

    t_all = time.time()
    try:
        driver.get(demo.local_url)
        b.until(lambda: "Erasekit toy model" in b.text(driver, "arch"), 90, "the page")
        b.field(driver, "f-target", 120)  # the fields are drawn (a loaded CPU draws them seconds after the title)
        b.until(lambda: b.text(driver, "job-status").startswith("No job running"), 60, "the page's first poll")
        shot("1-start")
        t0 = time.time()
        b.click(driver, "generate-data")
        b.until(lambda: "forget images of" in b.text(driver, "data-summary"), 900, "the data")
        seconds["data"] = round(time.time() - t0, 1)
        b.until(lambda: driver.find_elements("css selector", "#data-gallery img"), 30, "the gallery")
        shot("2-data", "data-gallery")
        t0 = time.time()
        b.click(driver, "start")
        b.until(lambda: "Running: training" in b.text(driver, "job-status") and "/" in b.text(driver, "job-status"),
                120, "the training")
        time.sleep(8)
        shot("3-training", "loss-plot")
        b.until(lambda: "Done: training" in b.text(driver, "job-status"), 1800, "the end of training")
        seconds["train"] = round(time.time() - t0, 1)
        time.sleep(1.5)
        shot("4-trained", "loss-plot")
        t0 = time.time()
        b.click(driver, "check")
        b.until(lambda: driver.find_elements("css selector", "#check-grid img")
                and "neighbour" in b.text(driver, "check-counts"), 600, "the check")
        seconds["check"] = round(time.time() - t0, 1)
        counts = b.text(driver, "check-counts")
        shot("5-check", "check-grid")
        t0 = time.time()
        b.click(driver, "export")
        path = b.until(lambda: b.field(driver, "export-path").get_attribute("value"), 120, "the exported path")
        seconds["export"] = round(time.time() - t0, 1)
        shot("6-export", "export-msg")
    finally:
        driver.quit()
        demo.close()
    seconds["total"] = round(time.time() - t_all, 1)
    return {"browser": "headless chromium", "seconds": seconds, "lora": path, "check_counts": counts.splitlines(),
            "screenshots": shots}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "out", "trainer-flow"))
    ap.add_argument("--comfyui-prompts", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="override the page's learning rate")
    ap.add_argument("--browser", action="store_true", help="click through the page in headless Chromium")
    ap.add_argument("--screenshots", default=None, help="with --browser: the folder for the screenshots")
    a = ap.parse_args(argv)
    # the flow starts from an empty runs folder: a run left by an earlier flow would make Start refuse
    # ("already holds a run") and the flow would measure nothing
    shutil.rmtree(os.path.join(a.out, "runs"), ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    if a.browser:
        r = run_browser_flow(a.out, a.screenshots or os.path.join(a.out, "screenshots"))
    else:
        r = run_flow(a.out, **({"lr": a.lr} if a.lr else {}))
    if a.comfyui_prompts:
        from erasekit.fresh_process import json_from

        r.update(json_from(["-m", "tools.erase_check_comfy", os.path.abspath(r["lora"]),
                            "--prompts", str(a.comfyui_prompts), "--json"], "the ComfyUI check", cwd=REPO))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
