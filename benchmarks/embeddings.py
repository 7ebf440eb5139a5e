"""Benchmark: dinoprop.compute_embeddings vs FiftyOne's compute_embeddings.

Both embed the same real JPEGs (../shared/datasets/clothing-small) with the
same DINOv2-shaped model (random weights, saved to a temp dir with a DINOv2
image processor), on the same device, batch size and number of decoding
workers. FiftyOne runs its transformers integration
(``fiftyone.utils.transformers.convert_transformers_model``); dinoprop runs
its own pipeline. Runs are interleaved over several rounds (alternating who
goes first) and the median images/s of each is reported, with the model-only
rate (pre-decoded tensors) and the decode-only rate (DataLoader, no model)
to show where time goes. For ViT-S/B/L, dinoprop also embeds with a
DINOv3-shaped ViT/16 of the same size (random weights, 4 registers, RoPE):
the DINOv3 row beside DINOv2's.

Usage::

    python benchmarks/embeddings.py --quick
    python benchmarks/embeddings.py --output benchmarks/results/embeddings.md

The last line printed is JSON with the headline numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from embedding_common import (
    DINOV3_SIZES,
    VIT_SIZES,
    decode_rate,
    image_paths,
    machine,
    model_only_rate,
    save_random_dinov2,
    save_random_dinov3,
)
from private_db import use_private_database


def _fiftyone_model(model_dir: str, device: str):
    import fiftyone.utils.transformers as fout
    from transformers import AutoModel

    module = AutoModel.from_pretrained(model_dir).eval().to(device)
    return fout.convert_transformers_model(module)


def _run_fiftyone(dataset, model, batch_size, num_workers) -> None:
    field = "fiftyone_embedding"
    if dataset.has_sample_field(field):
        dataset.delete_sample_field(field)
    dataset.compute_embeddings(
        model, embeddings_field=field, batch_size=batch_size,
        num_workers=num_workers, progress=False,
    )


def _run_dinoprop(dataset, model, batch_size, num_workers, field="dinoprop_embedding",
                  flip_average=False) -> None:
    import dinoprop

    results = dinoprop.compute_embeddings(
        dataset, model=model, embeddings_field=field,
        batch_size=batch_size, num_workers=num_workers, overwrite=True,
        flip_average=flip_average, progress=False,
    )
    assert results.num_embedded == len(dataset) and results.num_failed == 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _measure(run, num_images) -> tuple:
    """``(images per wall-clock second, CPU milliseconds per image)``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    run()
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return num_images / wall, 1000 * cpu / num_images


def _agreement(dataset) -> float:
    """Mean cosine between dinoprop's and FiftyOne's vectors per image.

    Both are centred first: random weights give every image nearly the same
    raw vector, so only the per-image deviations show whether the two
    pipelines feed the model the same pixels.
    """
    import numpy as np

    vectors = []
    for field in ("dinoprop_embedding", "fiftyone_embedding"):
        x = np.stack(dataset.values(field)).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x -= x.mean(0)
        vectors.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return float((vectors[0] * vectors[1]).sum(1).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 48-image subset and 3 rounds (< 5 min on 2 CPU cores)")
    parser.add_argument("--images", type=int, default=None,
                        help="number of images (default: all 3,781; --quick: 48)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 3)")
    parser.add_argument("--size", choices=sorted(VIT_SIZES), default="small",
                        help="ViT size (default small = ViT-S/14)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size for both (default: dinoprop's for the device)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding workers for both (default: dinoprop's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--flip-average", action="store_true",
                        help="also time dinoprop with flip_average=True")
    parser.add_argument("--output", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)

    tmp = use_private_database("embbench-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import fiftyone as fo
    import torch

    from dinoprop.embeddings_data import default_num_workers
    from dinoprop.models import load_model, resolve_device

    device = resolve_device(args.device)
    load_before = os.getloadavg()[0]
    limit = args.images or (48 if args.quick else None)
    rounds = args.rounds or 3
    paths = image_paths(limit=limit)
    model_dir = os.path.join(tmp, "dinov2-%s-random" % args.size)
    save_random_dinov2(model_dir, args.size)
    model = load_model(model_dir, device=str(device))
    batch_size = args.batch_size or model.default_batch_size()
    num_workers = default_num_workers(device) if args.num_workers is None else args.num_workers
    fo_model = _fiftyone_model(model_dir, str(device))

    pipelines = {
        "dinoprop": lambda: _run_dinoprop(dataset, model, batch_size, num_workers),
        "fiftyone": lambda: _run_fiftyone(dataset, fo_model, batch_size, num_workers),
    }
    models = {"dinoprop": model}
    if model.dtype != torch.float32:  # default is reduced precision: show fp32 too
        models["dinoprop_fp32"] = load_model(model_dir, device=str(device), precision="fp32")
        pipelines["dinoprop_fp32"] = lambda: _run_dinoprop(
            dataset, models["dinoprop_fp32"], batch_size, num_workers,
            field="dinoprop_fp32_embedding")

    if args.size in DINOV3_SIZES:
        dinov3_dir = os.path.join(tmp, "dinov3-%s-random" % args.size)
        save_random_dinov3(dinov3_dir, args.size)
        models["dinoprop_dinov3"] = load_model(dinov3_dir, device=str(device))
        pipelines["dinoprop_dinov3"] = lambda: _run_dinoprop(
            dataset, models["dinoprop_dinov3"], batch_size, num_workers,
            field="dinoprop_dinov3_embedding")

    if args.flip_average:
        pipelines["dinoprop_flip"] = lambda: _run_dinoprop(
            dataset, model, batch_size, num_workers,
            field="dinoprop_flip_embedding", flip_average=True)

    # Persistent: FiftyOne's DataLoader workers connect to the database, and
    # a new client that believes it is alone deletes non-persistent datasets.
    dataset = fo.Dataset(persistent=True)
    try:
        dataset.add_samples([fo.Sample(filepath=p) for p in paths], progress=False)
        model_only_rate(model, paths, batch_size, repeats=1)  # warm-up, untimed
        rates = {name: [] for name in pipelines}
        cpu_ms = {name: [] for name in pipelines}
        names = list(pipelines)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                rate, cpu = _measure(pipelines[name], len(paths))
                rates[name].append(rate)
                cpu_ms[name].append(cpu)
                print("round %d %-14s %7.1f img/s %8.1f CPU ms/img"
                      % (r + 1, name, rate, cpu), flush=True)
        agreement = _agreement(dataset)
        model_only = {name: model_only_rate(m, paths, batch_size) for name, m in models.items()}
        decode = decode_rate(model, paths, batch_size, num_workers)
    finally:
        dataset.delete()
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, "dinov3-%s-random" % args.size), ignore_errors=True)

    result = {
        "device": str(device),
        "model": "DINOv2-%s-shaped ViT/14 (random weights)" % args.size,
        "images": len(paths),
        "rounds": rounds,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "precision": str(model.dtype).replace("torch.", ""),
        "model_only_img_s": round(model_only["dinoprop"], 2),
        "decode_img_s": round(decode, 2),
        "cosine_agreement": round(agreement, 4),
    }
    for name in pipelines:
        result["%s_img_s" % name] = round(statistics.median(rates[name]), 2)
        result["%s_cpu_ms" % name] = round(statistics.median(cpu_ms[name]), 1)
    result["ratio"] = round(result["dinoprop_img_s"] / result["fiftyone_img_s"], 3)
    if "dinoprop_dinov3" in pipelines:
        result["model_only_dinov3_img_s"] = round(model_only["dinoprop_dinov3"], 2)
    if "dinoprop_fp32" in pipelines:
        result["model_only_fp32_img_s"] = round(model_only["dinoprop_fp32"], 2)
        result["fp32_ratio"] = round(result["dinoprop_fp32_img_s"] / result["fiftyone_img_s"], 3)
    result["cpu_ratio"] = round(result["fiftyone_cpu_ms"] / result["dinoprop_cpu_ms"], 3)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    table = _markdown(result, rates, machine(device))
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    print(json.dumps({k: result[k] for k in (
        "device", "model", "precision", "dinoprop_img_s", "fiftyone_img_s", "ratio",
        "model_only_img_s", "decode_img_s", "cpu_ratio", "dinoprop_fp32_img_s",
        "fp32_ratio", "dinoprop_flip_img_s", "dinoprop_dinov3_img_s",
        "model_only_dinov3_img_s")
        if k in result}))
    return result


_LABELS = {
    "dinoprop": "dinoprop `compute_embeddings` (default `precision='auto'`: %s)",
    "fiftyone": "FiftyOne `compute_embeddings` (transformers integration, float32)",
    "dinoprop_fp32": "dinoprop, `precision='fp32'`",
    "dinoprop_flip": "dinoprop, `flip_average=True` (%s)",
    "dinoprop_dinov3": "dinoprop, DINOv3-shaped ViT/16 of the same size (4 registers; %s)",
}


def _markdown(result: dict, rates: dict, machine: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Embeddings benchmark",
        "",
        "%s; %s; %s; %d clothing-small JPEGs; batch size %d; %d decoding "
        "worker(s); %d interleaved rounds (order rotated each round), median."
        % (today, machine, result["model"], result["images"], result["batch_size"],
           result["num_workers"], result["rounds"]),
        "",
        "1-minute load average at start / end: %.1f / %.1f (above the core "
        "count means other processes shared the CPU, and wall-clock numbers "
        "are noisy; CPU time per image is the steadier comparison)."
        % tuple(result["load_average"]),
        "",
        "| pipeline | images/s (median) | per round | vs FiftyOne | CPU ms/image | CPU vs FiftyOne |",
        "|---|---|---|---|---|---|",
    ]
    for name in rates:
        lines.append("| %s | %.1f | %s | %.2fx | %.0f | %.2fx |" % (
            _LABELS[name].replace("%s", result["precision"]), result["%s_img_s" % name],
            ", ".join("%.1f" % r for r in rates[name]),
            result["%s_img_s" % name] / result["fiftyone_img_s"],
            result["%s_cpu_ms" % name],
            result["fiftyone_cpu_ms"] / result["%s_cpu_ms" % name]))
    lines.append("| model only (pre-decoded uint8 batch, %s) | %.1f | | | | |"
                 % (result["precision"], result["model_only_img_s"]))
    if "model_only_fp32_img_s" in result:
        lines.append("| model only, float32 | %.1f | | | | |"
                     % result["model_only_fp32_img_s"])
    if "model_only_dinov3_img_s" in result:
        lines.append("| model only, DINOv3-shaped ViT/16 (%s) | %.1f | | | | |"
                     % (result["precision"], result["model_only_dinov3_img_s"]))
    lines += [
        "| decode + resize only (DataLoader, no model) | %.1f | | | | |" % result["decode_img_s"],
        "",
        "Ratio dinoprop (default) / FiftyOne, wall clock: **%.2f**; by CPU "
        "time per image (less sensitive to other processes on a shared "
        "machine): **%.2f**. Mean cosine between the two pipelines' centred "
        "vectors for the same image: %.4f (same model; they differ in "
        "resampling arithmetic and, at reduced precision, rounding)."
        % (result["ratio"], result["cpu_ratio"], result["cosine_agreement"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
