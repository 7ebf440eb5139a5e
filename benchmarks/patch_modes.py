"""Benchmark: object embeddings from box crops vs from patch tokens.

A detection-style dataset: mosaics of 2 x 2 CIFAR-10 test images
(../shared/datasets/cifar10-test, each upscaled to 112 px, so a mosaic is
224 x 224), one box per tile labeled with its class. Each model embeds every
box twice with ``dinoprop.compute_embeddings(patches_field=...)``:
``patch_mode="crops"`` (one forward pass per box) and ``patch_mode="tokens"``
(one forward pass per image, the tokens under each box pooled). Then
``propagate_labels`` spreads a few labeled boxes per class to the others,
and the accuracy on the unlabeled boxes is measured.

Models: efficientnet-lite0 (real ImageNet weights, the offline backbone; at
224 its feature map is 7 x 7, at 448 14 x 14), whose accuracy means
something, and a DINOv3 ViT-S/16-shaped model with random weights, for
speed only.

Usage::

    python benchmarks/patch_modes.py --quick
    python benchmarks/patch_modes.py --output benchmarks/results/patch_modes.md

The last line printed is JSON with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
from embedding_common import REPO_ROOT, machine, save_random_dinov3
from private_db import use_private_database

CIFAR = REPO_ROOT.parent / "shared" / "datasets" / "cifar10-test"
TILE = 112
MODES = ("crops", "tokens")


def write_mosaics(directory: Path, count: int, seed: int = 0) -> list:
    """``count`` 2 x 2 mosaics of random CIFAR-10 test images.

    Returns:
        per mosaic, ``(path, [(class, [x, y, w, h]), ...])``
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = sorted(CIFAR.rglob("*.jpg"))
    directory.mkdir(parents=True, exist_ok=True)
    mosaics = []
    for m in range(count):
        canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
        objects = []
        for tile, pick in enumerate(rng.choice(len(files), size=4, replace=False)):
            row, col = divmod(tile, 2)
            with Image.open(files[pick]) as im:
                canvas.paste(im.convert("RGB").resize((TILE, TILE), Image.BICUBIC),
                             (col * TILE, row * TILE))
            objects.append((files[pick].parent.name, [col / 2, row / 2, 0.5, 0.5]))
        path = directory / ("mosaic_%04d.jpg" % m)
        canvas.save(path, quality=92)
        mosaics.append((str(path), objects))
    return mosaics


def build_dataset(mosaics: list, seeds_per_class: int, seed: int = 0):
    """``objects``: the boxes, ``seeds_per_class`` of each class labeled;
    ``truth``: every box labeled (same ids)."""
    import fiftyone as fo

    rng = np.random.default_rng(seed)
    classes = sorted({c for _, objects in mosaics for c, _ in objects})
    boxes = [(i, j, c) for i, (_, objects) in enumerate(mosaics) for j, (c, _) in enumerate(objects)]
    seeds = set()
    for cls in classes:
        of_class = [(i, j) for i, j, c in boxes if c == cls]
        for k in rng.choice(len(of_class), size=min(seeds_per_class, len(of_class)), replace=False):
            seeds.add(of_class[k])
    samples = []
    for i, (path, objects) in enumerate(mosaics):
        dets, truth = [], []
        for j, (cls, box) in enumerate(objects):
            det = fo.Detection(label=cls if (i, j) in seeds else None, bounding_box=box)
            dets.append(det)
            truth.append(fo.Detection(label=cls, bounding_box=box))
            truth[-1]._id = det._id
        samples.append(fo.Sample(filepath=path, objects=fo.Detections(detections=dets),
                                 truth=fo.Detections(detections=truth)))
    dataset = fo.Dataset()
    dataset.add_samples(samples, progress=False)
    return dataset


def run_mode(dataset, model, mode: str) -> dict:
    """Embeds every box in ``mode`` and propagates the seed labels."""
    import dinoprop

    field = "emb_" + mode
    start = time.perf_counter()
    results = dinoprop.compute_embeddings(
        dataset, model=model, patches_field="objects", embeddings_field=field,
        patch_mode=mode, overwrite=True, progress=False,
    )
    seconds = time.perf_counter() - start
    boxes = results.num_embedded
    propagation = dinoprop.propagate_labels(
        dataset, "objects", embeddings=field, output_field="objects_" + mode,
        overwrite=True, progress=False,
    )
    evaluation = propagation.evaluate(gt_field="truth")
    return {
        "images_per_s": round(len(dataset) / seconds, 1),
        "boxes_per_s": round(boxes / seconds, 1),
        "seconds": round(seconds, 1),
        "accuracy": round(evaluation["accuracy"], 4) if evaluation else None,
        "num_evaluated": evaluation["num_evaluated"] if evaluation else 0,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 mosaics (400 boxes)")
    parser.add_argument("--mosaics", type=int, default=None, help="default 500; --quick: 100")
    parser.add_argument("--seeds-per-class", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu, cuda, ...")
    parser.add_argument("--output", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)

    tmp = use_private_database("patchbench-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dinoprop.models import EFFICIENTNET_LITE0, load_model, resolve_device

    device = resolve_device(args.device)
    count = args.mosaics or (100 if args.quick else 500)
    mosaics = write_mosaics(Path(tmp) / "mosaics", count)
    dinov3_dir = os.path.join(tmp, "dinov3-small-random")
    save_random_dinov3(dinov3_dir, "small")
    models = {
        "efficientnet-lite0 (real weights), 224 px": (EFFICIENTNET_LITE0, 224),
        "efficientnet-lite0 (real weights), 448 px": (EFFICIENTNET_LITE0, 448),
        "DINOv3 ViT-S/16-shaped (random weights), 224 px": (dinov3_dir, 224),
    }
    dataset = build_dataset(mosaics, args.seeds_per_class)
    rows = {}
    try:
        for label, (name, size) in models.items():
            model = load_model(name, device=str(device), image_size=size)
            for mode in MODES:
                rows["%s | %s" % (label, mode)] = row = run_mode(dataset, model, mode)
                print("%-50s %-6s %s" % (label, mode, json.dumps(row)), flush=True)
    finally:
        dataset.delete()
    result = {"device": str(device), "mosaics": count, "boxes": 4 * count,
              "seeds_per_class": args.seeds_per_class, "rows": rows}
    table = markdown(result, machine(device))
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    print(json.dumps(result))
    return result


def markdown(result: dict, machine_name: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Object embeddings: box crops vs patch tokens",
        "",
        "%s; %s; %d mosaics of 2 x 2 CIFAR-10 test images (224 x 224, %d boxes); "
        "%d labeled boxes per class as seeds, `propagate_labels` (auto) to the "
        "others; accuracy on the unlabeled boxes."
        % (today, machine_name, result["mosaics"], result["boxes"], result["seeds_per_class"]),
        "",
        "| model | `patch_mode` | images/s | boxes/s | propagation accuracy |",
        "|---|---|---|---|---|",
    ]
    for key, row in result["rows"].items():
        model, mode = key.split(" | ")
        accuracy = "" if row["accuracy"] is None else "%.1f%%" % (100 * row["accuracy"])
        if model.startswith("DINOv3"):
            accuracy += " (random weights: speed only)"
        lines.append("| %s | %s | %.1f | %.1f | %s |"
                     % (model, mode, row["images_per_s"], row["boxes_per_s"], accuracy))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
