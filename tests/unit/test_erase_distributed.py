"""The erasure engine under `accelerate launch` with two processes (on the CPU: gloo): one process
writes the run folder, and a Stop or a non-finite loss on one process stops both at the same step."""

import json
import os

MULTI_PROCESS_SCRIPT = '''
import json, os, sys, torch
sys.path.insert(0, sys.argv[2])
from erasekit.erase.data import EraseData, toy_scene_set
from erasekit.erase.engine import TrainConfig, train
from erasekit.erase.inpo import InpoObjective
from erasekit.errors import ErasekitError
from erasekit import models
from erasekit.toyworld.model import build_toy_pipeline

torch.set_num_threads(1)
rank, out = int(os.environ["RANK"]), sys.argv[1]
pipe = build_toy_pipeline(0, tiny=True)
comps = lambda: models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)
data = EraseData("red circle", toy_scene_set(comps(), [("red", "circle")], 2, seed=0),
                 toy_scene_set(comps(), [("blue", "square")], 2, seed=100, masks=False), ["blue square"])

asked = []  # Stop pressed on rank 1 only


class NanOnRank1(InpoObjective):
    def loss(self, batch, unet, reference_ctx, ctx):
        out = super().loss(batch, unet, reference_ctx, ctx)
        if rank == 1 and ctx.step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

def config(name, **kw):
    return TrainConfig(**{"out": f"{out}/{name}", "target": "red circle", "steps": 3, "lr": 5e-3, "checkpoint_every": 2,
                          "tensorboard": False, **kw})

train(config("ok"), InpoObjective(), data, comps())
pipe = build_toy_pipeline(0, tiny=True)  # a fresh model: the first run left its adapter on this one
try:
    train(config("nan", export=False), NanOnRank1(), data, comps())
    said = "went on"
except ErasekitError as err:
    said = str(err)
pipe = build_toy_pipeline(0, tiny=True)
stopped = train(config("stop", steps=6, checkpoint_every=100), InpoObjective(), data, comps(),
                progress=lambda step, total, terms: step == 3 and rank == 1 and asked.append(1), cancel=lambda: bool(asked))
open(f"{out}/rank{rank}.txt", "w").write(json.dumps([said, stopped.status, stopped.step]))
'''


def test_accelerate_launch_with_two_processes(tmp_path):
    """`accelerate launch --multi_gpu` with two processes (on the CPU here: gloo): one metrics line per
    step and one LoRA; a loss that is not finite on one process only, and a Stop on one process only, stop
    both at the same step (the other one went on, to wait in the next all-reduce)."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "launched.py"
    script.write_text(MULTI_PROCESS_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with socket.socket() as free:  # a port no earlier run may still hold (torchrun's default is fixed)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path), repo]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # what `--cpu` sets; `--cpu` itself launches one process
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(tmp_path / "ok" / "metrics.jsonl")] == [1, 2, 3]
    assert os.path.isfile(tmp_path / "ok" / "erase-red-circle-inpo.safetensors")
    for rank in (0, 1):
        said, status, step = json.loads((tmp_path / f"rank{rank}.txt").read_text())
        assert "step 3" in said and "not a finite number" in said and "checkpoint-000002" in said, (rank, said)
        assert (status, step) == ("cancelled", 3), rank  # a Stop on one process stops both, at the same step
