"""What the extension costs in the real Automatic1111 (one JSON line; ``python -m erasekit.bench a1111`` runs it).

startup: the web UI's own "Startup time" line, alternately without the extension (an empty folder linked in
its place) and with it; dag: txt2img wall time with Detect-and-Guide on and nothing detected (a guideline whose
gate the random model never reaches) against the extension off, interleaved, on the tiny SD1 checkpoint.
"""

import argparse
import json
import os
import re
import statistics
import tempfile
import time

from tools import webui


def _startup_seconds(server) -> float:
    found = re.findall(r"Startup time: ([0-9.]+)s", server.log_tail(200_000))
    return float(found[-1]) if found else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args(argv)
    webui.setup("a1111")
    empty = tempfile.mkdtemp(prefix="erasekit-no-extension-")
    without, with_ext = [], []
    for _ in range(a.repeats):  # interleaved, so drifts in machine load hit both alike
        for folder, out in ((empty, without), (webui.REPO, with_ext)):
            with webui.serve("a1111", extension_dir=folder) as server:
                out.append(_startup_seconds(server))
    import torch

    from erasekit.dag.guideline import GuidelineEmbedding

    payload = {"prompt": "a red circle", "seed": 1, "steps": a.steps, "width": a.size, "height": a.size,
               "batch_size": 2, "cfg_scale": 5.0, "sampler_name": "Euler a"}
    times = {"off": [], "on": []}
    with webui.serve("a1111") as server:
        folder = os.path.join(server.data_dir, "models", "guideline")
        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(0)
        GuidelineEmbedding(torch.randn(2, 32), torch.randn(32), "red circle", "sd_v1", gate=0.9999).save(
            os.path.join(folder, "never.safetensors"))
        on = dict(payload, alwayson_scripts={"detect-and-guide (erasekit)": {"args": [
            True, "never.safetensors", "", "DAG", 1.0, 0.1, 0.5, 0.01, "medium", 0.0, "stop", False]}})
        server.txt2img(payload), server.txt2img(on)  # warm-up
        for _ in range(a.repeats * 2):
            for key, body in (("off", payload), ("on", on)):
                t0 = time.perf_counter()
                server.txt2img(body)
                times[key].append(time.perf_counter() - t0)
    base, ext = statistics.median(without), statistics.median(with_ext)
    off, on_ = statistics.median(times["off"]), statistics.median(times["on"])
    print(json.dumps({"bench": "a1111", "repeats": a.repeats, "startup_seconds_without": round(base, 2),
                      "startup_seconds_with": round(ext, 2), "startup_added_seconds": round(ext - base, 2),
                      "sampler": f"Euler a, {a.steps} steps, {a.size}px, batch 2, tiny SD1",
                      "txt2img_seconds_off": round(off, 3), "txt2img_seconds_dag_nothing_detected": round(on_, 3),
                      "dag_time_ratio_nothing_detected": round(on_ / off, 4)}))


if __name__ == "__main__":
    main()
