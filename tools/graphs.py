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


def dag_graph(model_name: str, prompt: str, guideline: str, safety_text: str = "", size: int = 128, steps: int = 20,
              sampler: str = "euler_ancestral", seed: int = 0, cfg: float = 5.0, mode: str = "DAG",
              negative: str = "", strength: float = 1.0) -> dict:
    """Side by side: the same prompt and seed sampled plainly and with Detect-and-Guide, plus the
    detection-map overlay. Outputs: "9" plain image, "19" guided image, "21" detection overlay."""
    g = {
        "1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "plain"}},
        "11": {"class_type": "ErasekitLoadGuideline", "inputs": {"embedding_name": guideline}},
        "12": {"class_type": "ErasekitDetectAndGuide", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "guideline": ["11", 0], "safety_text": safety_text, "mode": mode,
            "strength": strength, "warmup": 0.1, "unsafe_threshold": 0.5, "edit_threshold": 0.01, "sld_preset": "medium",
            "sega_mask": 0.0, "if_detection_fails": "stop"}},
        "16": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "guided"}},
        "20": {"class_type": "ErasekitDetectionMaps", "inputs": {"model": ["12", 0], "image": ["17", 0],
                                                                 "which": "max over steps"}},
        "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 1], "filename_prefix": "detection"}},
    }
    return g


def single_dag_graph(model_name: str, prompt: str, guideline: str, size: int = 128, steps: int = 25,
                     sampler: str = "euler_ancestral", seed: int = 0, cfg: float = 3.0, strength: float = 1.0) -> dict:
    """The graph a user builds: loader -> Detect-and-Guide -> KSampler -> image, plus the detection map."""
    g = dag_graph(model_name, prompt, guideline, size=size, steps=steps, sampler=sampler, seed=seed, cfg=cfg,
                  strength=strength)
    for plain in ("6", "7", "9"):
        del g[plain]
    return g


def lora_before_after_graph(model_name: str, lora_name: str, prompt: str, seed: int = 0, steps: int = 25,
                            cfg: float = 3.0, sampler: str = "euler_ancestral") -> dict:
    """Before / after an erasure LoRA, same prompt and seed: two branches over one loader with
    Load Erasure LoRA at strength 0 (the base model; SaveImage "9") and 1 (SaveImage "19")."""
    g = {"1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}}
    for strength, base in ((0.0, 0), (1.0, 10)):
        def n(i, base=base):
            return str(base + i)

        g[n(30)] = {"class_type": "ErasekitLoadErasureLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": strength,
            "strength_clip": strength}}
        g[n(2)] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": [n(30), 1]}}
        g[n(3)] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [n(30), 1]}}
        g[n(6)] = {"class_type": "KSampler", "inputs": {
            "model": [n(30), 0], "positive": [n(2), 0], "negative": [n(3), 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}}
        g[n(7)] = {"class_type": "VAEDecode", "inputs": {"samples": [n(6), 0], "vae": ["1", 2]}}
        g[n(9)] = {"class_type": "SaveImage", "inputs": {"images": [n(7), 0], "filename_prefix": f"s{strength:g}"}}
    return g
