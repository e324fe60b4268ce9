"""The trainer page's "Convert a fine-tuned model" section (trainer/convert_page.py), driven through the
page's API with gradio_client as the buttons drive it: convert a fine-tuned toy UNet, merge the LoRA into a
checkpoint, and the refusals (a pickle with code, a name outside the output root, an existing file)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_convert import Payload, tuned_weights

from erasekit import checkpoints


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from gradio_client import Client

    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.app import TrainerApp

    tmp = tmp_path_factory.mktemp("convert-page")
    pipe = build_toy_pipeline(0, tiny=True)
    save_toy_pipeline(pipe, tmp / "toy")
    save_file(tuned_weights(pipe.unet), str(tmp / "ncd-unet.safetensors"))
    torch.save({"conv_in.weight": torch.zeros(1), "x": Payload()}, str(tmp / "evil.pt"))
    trainer = TrainerApp(tmp / "runs", base=str(tmp / "toy"), threads=1)
    demo = trainer.build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield {"client": Client(demo.local_url, verbose=False), "tmp": tmp, "root": tmp / "runs"}
    finally:
        demo.close()


def test_convert_then_merge_from_the_page(page):
    client, tmp = page["client"], page["tmp"]
    msg, path = client.predict(str(tmp / "ncd-unet.safetensors"), "", 3, "ncd", "red circle", "ncd-red-circle",
                               "output root", False, api_name="/convert_model")
    assert path == str(page["root"] / "ncd-red-circle.safetensors") and "at rank 3" in msg and "max 0.0000" in msg
    meta = checkpoints.read_header(path)[1]
    assert meta["erasekit.method"] == "ncd" and meta["erasekit.source_file"] == "ncd-unet.safetensors"
    msg, merged = client.predict(path, "", 1.0, "toy-no-red-circle", "output root", False, api_name="/merge_checkpoint")
    assert merged == str(page["root"] / "toy-no-red-circle.safetensors") and "erases: red circle" in msg
    assert any(k.startswith("model.diffusion_model.") for k in checkpoints.read_header(merged)[0])
    msg, again = client.predict(path, "", 1.0, "toy-no-red-circle", "output root", False, api_name="/merge_checkpoint")
    assert again == "" and "exists; tick 'Replace'" in msg


def test_refusals_on_the_page_are_one_sentence(page):
    client, tmp = page["client"], page["tmp"]
    msg, path = client.predict(str(tmp / "evil.pt"), "", 8, "", "", "evil", "output root", False, api_name="/convert_model")
    assert path == "" and "is a pickle that holds more than plain tensors" in msg
    msg, path = client.predict(str(tmp / "ncd-unet.safetensors"), "", 8, "", "", "../../escape", "output root", False,
                               api_name="/convert_model")
    assert path == str(page["root"] / "escape.safetensors")  # the name becomes a plain file name under the root
    msg, path = client.predict("", "", 8, "", "", "", "output root", False, api_name="/convert_model")
    assert path == "" and "No fine-tuned weights given" in msg
