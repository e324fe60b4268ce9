"""API-format ComfyUI graphs used by the tests and the demo."""

from __future__ import annotations


def attention_graph(model_name: str, prompt: str, words: str, size: int = 64, steps: int = 4,
                    sampler: str = "euler", seed: int = 0, cfg: float = 5.0) -> dict:
    """Load a diffusers model with the pack, sample with attention capture, save image + heatmap."""
    return {
        "1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "ErasekitCaptureAttention", "inputs": {"model": ["1", 0], "layers": "coarse"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "ErasekitAttentionHeatmap", "inputs": {
            "model": ["4", 0], "image": ["7", 0], "clip": ["1", 1], "prompt": prompt, "words": words,
            "step": "last step"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "erasekit_image"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 1], "filename_prefix": "erasekit_heatmap"}},
    }
