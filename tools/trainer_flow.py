"""The trainer app's whole flow on the bundled toy model, timed: what a person does in the browser.

    python tools/trainer_flow.py --out out/trainer-flow [--comfyui-prompts 20]

Starts the Gradio app (127.0.0.1, a free port) on ``models/toy`` with the page's default settings
(the INPO preset for an object, "red circle"), and drives it through its own API with
``gradio_client``, as the page's buttons do: generate data -> train -> check -> export. Prints one
JSON line: seconds per step and in all, the check's judge counts, the exported LoRA's path and,
with ``--comfyui-prompts N``, what real ComfyUI draws with that LoRA (tools/erase_check_comfy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "out", "trainer-flow"))
    ap.add_argument("--comfyui-prompts", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="override the page's learning rate")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    r = run_flow(a.out, **({"lr": a.lr} if a.lr else {}))
    if a.comfyui_prompts:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "erase_check_comfy.py"), r["lora"],
                               "--prompts", str(a.comfyui_prompts), "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        r.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
