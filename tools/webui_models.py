"""Checkpoints for the Automatic1111 / Forge tests, built by ``tools/webui.py`` in a web UI's venv
with A1111's own ``ldm`` classes (``repositories/stable-diffusion-stability-ai`` on PYTHONPATH) from
its ``configs/v1-inference.yaml``, with a fixed seed:

    tiny  an SD1-layout LDM checkpoint with widths of 32 (about 15 M parameters) and, beside it, its
          ``.yaml`` (a copy of v1-inference.yaml) whose text encoder is a tiny CLIP folder (a random
          CLIPTextModel of width 32 with SD1's tokenizer files); for A1111
    sd15  a full-size random SD1.5 in fp16 (Forge's model detector accepts only SD1.5's real widths)

The layers LDM initialises to zero (each UNet block's output projection, the UNet's last conv) get a
random initialisation instead, so that the prompt, the attention and the guidance scale change the
output (with zeros the UNet predicts exactly 0 whatever its inputs); normalisation biases get small
random values (see ``untrained_to_random``).

Run: ``python tools/webui_models.py tiny|sd15 --out X.safetensors --a1111 DIR --tokenizer DIR``.
"""

import argparse
import os
import shutil
import sys

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "projection_dim": 32}


def clip_folder(path, tokenizer_dir, tiny, seed):
    """A CLIP text-encoder folder: SD1's config (tiny: widths of 32) and tokenizer files; the tiny one
    with random weights (the full-size one is only read for its config and tokenizer)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    config = CLIPTextConfig.from_pretrained(tokenizer_dir)
    if tiny:
        for k, v in TINY_CLIP.items():
            setattr(config, k, v)
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(path)
    else:
        config.save_pretrained(path)


def untrained_to_random(model):
    """Trained-looking where initialisation is degenerate: the layers LDM zeroes get the default random
    initialisation, and the normalisations' biases small random values (with zero biases every
    LayerNorm row averages exactly 0, so the text encoder's output does too, and A1111's / Forge's
    emphasis, which rescales by the ratio of two such means, divides 0 by 0 in Forge's fp16 text
    encoder)."""
    import torch

    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            m.reset_parameters()
            n += 1
        elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and getattr(m, "bias", None) is not None:
            m.bias.normal_(0.0, 0.1)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("tiny", "sd15"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--a1111", required=True, help="A1111's source tree (configs/v1-inference.yaml)")
    ap.add_argument("--tokenizer", required=True, help="openai/clip-vit-large-patch14's config + tokenizer files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    tiny = args.what == "tiny"
    stem = os.path.splitext(os.path.abspath(args.out))[0]
    clip_dir = stem + "-clip"
    clip_folder(clip_dir, args.tokenizer, tiny, args.seed)

    cfg = OmegaConf.load(os.path.join(args.a1111, "configs", "v1-inference.yaml"))
    p = cfg.model.params
    p.cond_stage_config.params = {"version": clip_dir}
    if tiny:
        p.unet_config.params.model_channels = 32
        p.unet_config.params.context_dim = 32
        p.first_stage_config.params.ddconfig.ch = 32
        OmegaConf.save(cfg, stem + ".yaml")  # A1111 reads the config beside the checkpoint
    else:  # random text-encoder weights of the config's shape, instead of a download
        real = transformers.CLIPTextModel.from_pretrained
        transformers.CLIPTextModel.from_pretrained = classmethod(
            lambda cls, path, *a, **kw: cls(transformers.CLIPTextConfig.from_pretrained(path)))

    torch.manual_seed(args.seed)
    with torch.no_grad():
        model = instantiate_from_config(cfg.model)
        n = untrained_to_random(model)
    if not tiny:
        transformers.CLIPTextModel.from_pretrained = real
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    if pos not in sd:  # a buffer newer transformers do not save; SD1 checkpoints have it
        sd[pos] = torch.arange(77, dtype=torch.int64)[None]
    if not tiny:  # the network weights in fp16, as SD1.5's released fp16 files
        sd = {k: v.half() if v.is_floating_point() and k.split(".")[0] in
              ("model", "first_stage_model", "cond_stage_model") else v for k, v in sd.items()}
    tmp = args.out + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "erasekit": f"random {args.what}, seed {args.seed}"})
    os.replace(tmp, args.out)
    params = sum(v.numel() for k, v in sd.items() if k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model"))
    print(f"{args.out}: {params / 1e6:.1f} M parameters, {len(sd)} tensors, {n} zero-initialised layers made random",
          file=sys.stderr)


if __name__ == "__main__":
    main()
