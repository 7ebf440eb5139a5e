"""What the embedding benchmarks share: random DINOv2- and DINOv3-shaped
models, the clothing photos, and the model-only and decode-only rates.

Nothing here imports FiftyOne, so ``gpu_check.py`` can use it on a bare
CUDA machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLOTHING = REPO_ROOT.parent / "shared" / "datasets" / "clothing-small"

#: ViT sizes: (hidden size, layers, heads), as in DINOv2's ViT-S/B/L/g.
VIT_SIZES = {
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "giant": (1536, 40, 24),
}


def save_random_dinov2(directory: str, size: str) -> None:
    """Saves a random DINOv2-shaped ViT/14 of ``size`` and its image
    processor, the way Hugging Face does (dinoprop loads it like a real
    checkpoint)."""
    from transformers import Dinov2Config, Dinov2Model

    hidden, layers, heads = VIT_SIZES[size]
    _save_random(directory, Dinov2Model, Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=14, image_size=518, use_swiglu_ffn=size == "giant",
    ))


#: DINOv3 ViT/16 sizes: (hidden size, layers, heads), as in ViT-S/B/L/16.
DINOV3_SIZES = {"small": VIT_SIZES["small"], "base": VIT_SIZES["base"], "large": VIT_SIZES["large"]}


def save_random_dinov3(directory: str, size: str) -> None:
    """Saves a random DINOv3-shaped ViT/16 of ``size`` (4 register tokens,
    RoPE, layer scale) and its image processor, the way Hugging Face does."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    hidden, layers, heads = DINOV3_SIZES[size]
    _save_random(directory, DINOv3ViTModel, DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, patch_size=16, num_register_tokens=4,
    ))


def _save_random(directory: str, model_cls, config) -> None:
    """Saves a seeded random ``model_cls(config)`` and the image processor
    dinoprop's preprocessing matches."""
    import torch

    from dinoprop.models import dinov2_image_processor

    torch.manual_seed(0)
    model_cls(config).save_pretrained(directory)
    dinov2_image_processor().save_pretrained(directory)


def image_paths(root: Path | str = CLOTHING, limit: int | None = None) -> list:
    """The JPEGs under ``root`` (sorted), spread evenly when ``limit``."""
    paths = sorted(str(p) for p in Path(root).rglob("*.jpg"))
    if not paths:
        sys.exit("No images found under %s" % root)
    if limit:
        step = max(1, len(paths) // limit)
        paths = paths[::step][:limit]
    return paths


def sync(device) -> None:
    """Waits for the device's queued work (CUDA), so timings are real."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only_rate(model, paths, batch_size, repeats=2) -> float:
    """Images/s of the model alone on one pre-decoded batch already in
    (pinned) memory: the ceiling of any input pipeline."""
    import torch

    from dinoprop.models import open_image, preprocess_image

    images = [preprocess_image(open_image(p, model.preprocessing), model.preprocessing)
              for p in paths[:batch_size]]
    while len(images) < batch_size:
        images += images[: batch_size - len(images)]
    batch = torch.stack(images)
    if model.device.type == "cuda":
        batch = batch.pin_memory()
    model.embed(batch)  # warm-up
    sync(model.device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.embed(batch)
    sync(model.device)
    return repeats * len(batch) / (time.perf_counter() - start)


def decode_rate(model, paths, batch_size, num_workers) -> float:
    """Images/s of the CPU input pipeline alone (decode, resize, crop)."""
    from dinoprop.embeddings_data import ImageItems, make_loader

    loader = make_loader(ImageItems(paths, model.preprocessing), batch_size,
                         num_workers, model.device)
    start = time.perf_counter()
    count = sum(len(indices) for indices, *_ in loader)
    return count / (time.perf_counter() - start)


def machine(device) -> str:
    """The hardware in words, for the tables."""
    import torch

    if device.type == "cuda":
        return "%s, %d CPU cores" % (torch.cuda.get_device_name(device), os.cpu_count())
    return "%d-core CPU, no GPU" % len(os.sched_getaffinity(0))
