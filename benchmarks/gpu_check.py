"""The one-shot GPU check: dinoprop's CUDA paths, tested and timed in one run.

A GPU machine is lent to this project only now and then, for minutes, and
it starts bare: python3 with torch, transformers, numpy and Pillow, but no
FiftyOne, MongoDB or faiss, and no network. This script needs nothing else:
it runs dinoprop's storage-free engine
(:func:`dinoprop.embeddings.embed_files`) on real JPEGs carried with the
working tree, with random-weight DINOv2- and DINOv3-shaped models built on
the spot.

Usage::

    # here, once: copy a subset of the clothing photos (git-ignored folder)
    .venv/bin/python benchmarks/gpu_check.py --prepare benchmarks/gpu_payload
    # on the GPU machine (carry benchmarks/gpu_payload), at most 8 minutes
    PYTHONPATH=plugin python3 benchmarks/gpu_check.py --images benchmarks/gpu_payload \\
        --output "$OUT/gpu_check.md"
    # here, without a GPU, to keep it working (under 5 minutes)
    .venv/bin/python benchmarks/gpu_check.py --images benchmarks/gpu_payload --device cpu --quick

Part 1, checks (each PASS, FAIL or SKIP with its numbers): reduced
precision against float32, nvJPEG decoding against CPU decoding (and the
odd files: PNG, grayscale, CMYK, corrupt), ``torch.compile``, flip
averaging, object patches, and the automatic batch size of ViT-L at 224
(no out-of-memory). Vectors are compared after centring on the reference
set's mean: random weights give every image a similar raw vector, so only
the per-image deviations show whether two paths see the same pixels.

Part 2, speed per model shape (DINOv2 ViT-S/14, B/14, L/14 and DINOv3
ViT-S/16; ``--quick``: the two ViT-S):
the engine end to end (CPU decoding workers, and nvJPEG on CUDA), a plain
Hugging Face pipeline (``AutoImageProcessor`` in DataLoader workers, the
model batched, float32 as FiftyOne's transformers integration runs it,
and bf16/fp16 to show what precision alone buys), the model alone on a
pre-decoded batch on the device, and where the engine's time goes
(waiting for decoded batches, the model; how long the first batch took,
the workers' start included, and the rate after it, which a long run
approaches). The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding_common import (  # noqa: E402
    CLOTHING,
    decode_rate,
    image_paths,
    machine,
    model_only_rate,
    save_random_dinov2,
    save_random_dinov3,
    sync,
)

#: The model shapes timed, by the names the JSON uses: their builders.
SHAPES = {
    "dinov2-small": functools.partial(save_random_dinov2, size="small"),
    "dinov2-base": functools.partial(save_random_dinov2, size="base"),
    "dinov2-large": functools.partial(save_random_dinov2, size="large"),
    "dinov3-small": functools.partial(save_random_dinov3, size="small"),
}

#: The shapes ``--quick`` times.
QUICK_SHAPES = ("dinov2-small", "dinov3-small")

#: Images copied by ``--prepare`` (about 28 KB each, 42 MB in all: inside what a
#: device call can carry).
PAYLOAD_IMAGES = 1500

#: Images per check (``--quick``: a quarter).
CHECK_IMAGES = 64


# --- preparing the payload ------------------------------------------------------


def prepare(directory: Path, count: int) -> None:
    """Copies ``count`` clothing JPEGs and a few odd files into ``directory``."""
    from PIL import Image

    images = directory / "images"
    odd = directory / "odd"
    for folder in (images, odd):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    paths = image_paths(CLOTHING, limit=count)
    for i, path in enumerate(paths):
        shutil.copyfile(path, images / ("%05d.jpg" % i))
    with Image.open(paths[0]) as source:
        rgb = source.convert("RGB")
    rgb.convert("RGBA").save(odd / "rgba.png")
    rgb.convert("L").save(odd / "gray.jpg")
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    (odd / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print("Wrote %d images and %d odd files to %s (%.1f MB)"
          % (len(paths), len(list(odd.iterdir())), directory, size / 1e6))


# --- running the engine ---------------------------------------------------------


def embed_all(paths, model, boxes=None, **options) -> tuple:
    """Every vector of :func:`embed_files` in input order.

    Returns:
        ``(vectors, failures, stats)``: a ``rows x dim`` array (one row per
        image, or per box with ``boxes``; NaN rows for failed images), the
        ``{index: reason}`` failures, and the engine's timing stats plus
        ``steady_img_s``: images/s from the first batch's end to the last's
        (the rate without the workers' start, which a long run approaches)
    """
    from dinoprop.embeddings import EmbeddingEngine

    engine = EmbeddingEngine(model, **options)
    rows = [len(b) for b in boxes] if boxes is not None else [1] * len(paths)
    starts = np.concatenate([[0], np.cumsum(rows)])
    vectors = np.full((int(starts[-1]), model.output_dim(options.get("pooling", "cls"))),
                      np.nan, np.float32)
    failures = {}
    done = []  # (seconds, images) at the end of each batch
    for batch in engine.run(paths, boxes=boxes):
        done.append((time.perf_counter(), len(batch.indices)))
        offset = 0
        for index, count in zip(batch.indices, batch.counts):
            vectors[starts[index] : starts[index] + count] = batch.vectors[offset : offset + count]
            offset += count
        failures.update(batch.failures)
    stats = dict(engine.stats, steady_img_s=0.0)
    if len(done) > 1 and done[-1][0] > done[0][0]:
        stats["steady_img_s"] = round(sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0]), 1)
    return vectors, failures, stats


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """Per-row cosine of two vector sets after centring on the reference's
    mean; rows that failed in either are left out."""
    keep = np.isfinite(reference).all(1) & np.isfinite(other).all(1)
    mean = reference[keep].mean(0)
    a, b = reference[keep] - mean, other[keep] - mean
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cosines = (a * b).sum(1)
    return {"min_cosine": round(float(cosines.min()), 5),
            "mean_cosine": round(float(cosines.mean()), 5), "rows": int(keep.sum())}


# --- part 1: checks ---------------------------------------------------------------


class Checks:
    """Runs each check, catching everything, and keeps a row per check."""

    def __init__(self, device, model_dir, paths, odd_paths):
        from dinoprop.models import load_model

        self.device = device
        self.cuda = device.type == "cuda"
        self.model_dir = model_dir
        self.paths = paths
        self.odd_paths = odd_paths
        self.load = lambda **kw: load_model(model_dir, **kw)
        self.reference = self.load(device="cpu", precision="fp32")
        self.cpu_vectors, self.cpu_failures, _ = embed_all(paths, self.reference, num_workers=2)
        self.rows = []

    def run(self, name, check, needs_cuda=False) -> None:
        start = time.perf_counter()
        if needs_cuda and not self.cuda:
            row = {"status": "SKIP", "detail": "needs CUDA"}
        else:
            try:
                row = check()
            except Exception as e:  # a failed check is a result, not a crash
                row = {"status": "FAIL", "detail": "%s: %s" % (type(e).__name__, e),
                       "traceback": traceback.format_exc(limit=4)}
        row.update(name=name, seconds=round(time.perf_counter() - start, 1))
        print("check %-18s %-4s %s" % (name, row["status"], row.get("detail", "")), flush=True)
        self.rows.append(row)

    def _compare(self, vectors, threshold, failures=None, **extra) -> dict:
        numbers = agreement(self.cpu_vectors, vectors)
        ok = numbers["min_cosine"] >= threshold and numbers["rows"] == len(self.paths)
        if failures:
            ok = False
            numbers["failures"] = dict(list(failures.items())[:3])
        numbers.update(extra)
        return {"status": "PASS" if ok else "FAIL",
                "detail": "min cosine %.4f (needs >= %g), mean %.4f over %d images%s"
                % (numbers["min_cosine"], threshold, numbers["mean_cosine"], numbers["rows"],
                   "" if not failures else ", failures: %s" % numbers["failures"]),
                **numbers}

    def reduced_precision(self) -> dict:
        import torch

        precision = "auto" if self.cuda else "bf16"
        model = self.load(device=str(self.device), precision=precision)
        vectors, failures, _ = embed_all(self.paths, model)
        dtype = str(model.dtype).replace("torch.", "")
        if self.cuda and model.dtype == torch.float32:
            return {"status": "FAIL", "detail": "precision='auto' stayed float32 on CUDA"}
        return self._compare(vectors, 0.98, failures, dtype=dtype)

    def gpu_decode(self) -> dict:
        model = self.load(device=str(self.device), precision="fp32")
        vectors, failures, _ = embed_all(self.paths, model, gpu_decode=True)
        row = self._compare(vectors, 0.99, failures)
        # the odd files: the GPU path must fall back or fail exactly as the CPU path
        _, cpu_odd, _ = embed_all(self.odd_paths, self.reference, num_workers=0)
        _, gpu_odd, _ = embed_all(self.odd_paths, model, gpu_decode=True)
        odd = {"cpu_failed": sorted(cpu_odd), "gpu_failed": sorted(gpu_odd)}
        if sorted(cpu_odd) != sorted(gpu_odd):
            row["status"] = "FAIL"
        row["detail"] += "; odd files failing on CPU %s, on GPU %s" % (
            [Path(self.odd_paths[i]).name for i in sorted(cpu_odd)],
            [Path(self.odd_paths[i]).name for i in sorted(gpu_odd)])
        row.update(odd)
        return row

    def compiled(self) -> dict:
        model = self.load(device=str(self.device), precision="fp32", compile=True)
        start = time.perf_counter()
        vectors, failures, _ = embed_all(self.paths, model)
        return self._compare(vectors, 0.999, failures,
                             compile_and_run_seconds=round(time.perf_counter() - start, 1))

    def flip_average(self) -> dict:
        cpu, _, _ = embed_all(self.paths, self.reference, num_workers=2, flip_average=True)
        model = self.load(device=str(self.device), precision="fp32")
        vectors, failures, _ = embed_all(self.paths, model, flip_average=True)
        numbers = agreement(cpu, vectors)
        unflipped = agreement(cpu, self.cpu_vectors)  # what a flip that did nothing gives
        threshold = 0.999
        ok = (numbers["min_cosine"] >= threshold > unflipped["mean_cosine"]
              and not failures and numbers["rows"] == len(self.paths))
        return {"status": "PASS" if ok else "FAIL",
                "detail": "min cosine to CPU flip-averaged %.4f (needs >= %g); unflipped "
                "vectors reach only %.4f" % (numbers["min_cosine"], threshold,
                                             unflipped["mean_cosine"]),
                **numbers}

    def patches(self) -> dict:
        paths = self.paths[:8]
        boxes = [[[0.1, 0.1, 0.5, 0.5], [0.9, 0.9, 0.01, 0.01], [0.0, 0.0, 1.0, 1.0]]] * len(paths)
        cpu, cpu_failures, _ = embed_all(paths, self.reference, boxes=boxes, num_workers=0)
        model = self.load(device=str(self.device), precision="fp32")
        vectors, failures, _ = embed_all(paths, model, boxes=boxes)
        numbers = agreement(cpu, vectors)
        ok = not failures and not cpu_failures and numbers["rows"] == 3 * len(paths) \
            and numbers["min_cosine"] >= 0.99
        return {"status": "PASS" if ok else "FAIL",
                "detail": "%d boxes (one tiny) on %d images: min cosine to CPU %.4f (needs >= 0.99)"
                % (numbers["rows"], len(paths), numbers["min_cosine"]), **numbers}

    def auto_batch_size(self, large_dir) -> dict:
        import torch

        from dinoprop.models import load_model

        model = load_model(large_dir, device=str(self.device))
        batch = model.default_batch_size()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        paths = (self.paths * (1 + 2 * batch // len(self.paths)))[: 2 * batch]
        vectors, failures, stats = embed_all(paths, model)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        ok = not failures and np.isfinite(vectors).all()
        return {"status": "PASS" if ok else "FAIL", "batch_size": batch,
                "peak_gpu_gib": peak and round(peak, 2),
                "detail": "ViT-%s default batch %d, %s, %.0f images/s"
                % ("L/14" if model.hidden_dim == 1024 else "S/14", batch,
                   "peak %.1f GiB" % peak if peak else "CPU", stats["images_per_second"])}


# --- part 2: speed ------------------------------------------------------------------


def hf_pipeline_rate(model_dir, device, paths, batch_size, num_workers, dtype) -> float:
    """Images/s of a plain Hugging Face pipeline: the image processor in
    DataLoader workers, the model batched on ``device`` in ``dtype``."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval().to(device=device, dtype=dtype)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as f:
                image = f.convert("RGB")
            return processor(images=image, return_tensors="pt")["pixel_values"][0]

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size,
                                         num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    start, count = time.perf_counter(), 0
    with torch.inference_mode():
        for pixels in loader:
            out = model(pixel_values=pixels.to(device, dtype, non_blocking=True))
            out.last_hidden_state[:, 0].float().cpu()
            count += len(pixels)
    sync(device)
    return count / (time.perf_counter() - start)


def time_shape(name, build, device, paths, tmp, quick) -> dict:
    """The speed rows of one model shape, saved by ``build(directory)``."""
    import torch

    from dinoprop.embeddings_data import default_num_workers
    from dinoprop.models import load_model

    model_dir = os.path.join(tmp, name)
    if not os.path.isdir(model_dir):
        build(model_dir)
    model = load_model(model_dir, device=str(device))
    batch = model.default_batch_size()
    workers = default_num_workers(device)
    embed_all(paths[: 2 * batch], model)  # warm-up (cuDNN, allocator, workers)
    row = {"batch_size": batch, "num_workers": workers,
           "precision": str(model.dtype).replace("torch.", "")}
    _, _, stats = embed_all(paths, model)
    row["engine_cpu_decode_img_s"] = stats["images_per_second"]
    row["engine_wait_share"] = stats["wait_share"]
    row["engine_first_batch_s"] = round(stats["first_batch_seconds"], 2)
    row["engine_steady_img_s"] = stats["steady_img_s"]
    if device.type == "cuda":
        _, _, stats = embed_all(paths, model, gpu_decode=True)
        row["engine_gpu_decode_img_s"] = stats["images_per_second"]
        row["engine_gpu_decode_wait_share"] = stats["wait_share"]
        row["engine_gpu_decode_first_batch_s"] = round(stats["first_batch_seconds"], 2)
        row["engine_steady_img_s"] = max(row["engine_steady_img_s"], stats["steady_img_s"])
    row["engine_img_s"] = max(row["engine_cpu_decode_img_s"], row.get("engine_gpu_decode_img_s", 0))
    hf_paths = paths[: max(batch, len(paths) // 3)]
    row["hf_pipeline_img_s"] = round(hf_pipeline_rate(model_dir, device, hf_paths, batch, workers,
                                                      torch.float32), 1)
    if model.dtype != torch.float32:
        row["hf_pipeline_reduced_img_s"] = round(
            hf_pipeline_rate(model_dir, device, hf_paths, batch, workers, model.dtype), 1)
    row["model_only_img_s"] = round(model_only_rate(model, paths, batch, repeats=2 if quick else 5), 1)
    row["decode_only_img_s"] = round(decode_rate(model, paths, batch, workers), 1)
    row["ratio_vs_hf_pipeline"] = round(row["engine_img_s"] / row["hf_pipeline_img_s"], 2)
    print("speed %-13s %s" % (name, json.dumps(row)), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --- the report ---------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [
        "# GPU check",
        "",
        "Measured %s on %s; torch %s; `gpu_check.py%s`."
        % (result["date"], result["machine"], result["torch"], " --quick" if result["quick"] else ""),
        "",
        "| check | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    for row in result["checks"]:
        lines.append("| %s | %s | %s | %s |" % (row["name"], row["status"], row["seconds"],
                                               row.get("detail", "").replace("|", "/")))
    lines += [
        "",
        "Images/s on %d real JPEGs (random-weight DINOv2 and DINOv3 shapes):" % result["images"],
        "",
        "| model | batch | precision | engine, CPU decode | engine, nvJPEG | plain HF pipeline "
        "(fp32) | plain HF pipeline (reduced) | model alone | CPU decode alone | engine / HF "
        "| engine time waiting for input | first batch after (s) | engine after the first batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["speed"].items():
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | **%.2fx** | %s | %s | %s |" % (
            name, row["batch_size"], row["precision"], row["engine_cpu_decode_img_s"],
            row.get("engine_gpu_decode_img_s", "-"), row["hf_pipeline_img_s"],
            row.get("hf_pipeline_reduced_img_s", "-"), row["model_only_img_s"],
            row["decode_only_img_s"], row["ratio_vs_hf_pipeline"],
            "%.0f%% (CPU decode)%s" % (100 * row["engine_wait_share"],
                                       "" if "engine_gpu_decode_wait_share" not in row
                                       else ", %.0f%% (nvJPEG)" % (100 * row["engine_gpu_decode_wait_share"])),
            " / ".join(str(row[k]) for k in ("engine_first_batch_s", "engine_gpu_decode_first_batch_s")
                       if k in row),
            row["engine_steady_img_s"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="write the image payload here and stop")
    parser.add_argument("--count", type=int, default=PAYLOAD_IMAGES, help="images to prepare")
    parser.add_argument("--images", type=Path, help="a payload written by --prepare")
    parser.add_argument("--device", default=None, help="cuda (default when present), cpu, ...")
    parser.add_argument("--quick", action="store_true", help="ViT-S only, fewer images")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--output", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.count)
        return {}
    if not args.images:
        parser.error("--images DIR (written by --prepare) is required")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dinoprop.models import resolve_device

    device = resolve_device(args.device)
    paths = image_paths(args.images / "images")
    odd_paths = sorted(str(p) for p in (args.images / "odd").iterdir())
    per_check = CHECK_IMAGES // 4 if args.quick else CHECK_IMAGES
    speed_paths = paths[:96] if args.quick and device.type != "cuda" else paths * (
        1 if args.quick else 4)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": machine(device),
        "torch": torch.__version__,
        "quick": args.quick,
        "images": len(speed_paths),
        "checks": [],
        "speed": {},
    }
    try:
        if not args.skip_checks:
            small = os.path.join(tmp, "dinov2-small")
            save_random_dinov2(small, "small")
            checks = Checks(device, small, paths[:per_check], odd_paths)
            checks.run("reduced_precision", checks.reduced_precision)
            checks.run("gpu_decode", checks.gpu_decode, needs_cuda=True)
            checks.run("torch_compile", checks.compiled, needs_cuda=True)
            checks.run("flip_average", checks.flip_average)
            checks.run("object_patches", checks.patches)
            large = small
            if device.type == "cuda":
                large = os.path.join(tmp, "dinov2-large")
                save_random_dinov2(large, "large")
            checks.run("auto_batch_size", lambda: checks.auto_batch_size(large))
            result["checks"] = checks.rows
        if not args.skip_speed:
            shapes = {n: SHAPES[n] for n in QUICK_SHAPES} if args.quick else SHAPES
            for name, build in shapes.items():
                try:
                    result["speed"][name] = time_shape(name, build, device, speed_paths, tmp,
                                                       args.quick)
                except Exception as e:  # keep the other shapes' numbers
                    print("speed %s FAILED: %s" % (name, traceback.format_exc(limit=4)), flush=True)
                    result["speed_errors"] = {**result.get("speed_errors", {}), name: str(e)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    report = markdown(result)
    print(report)
    if args.output:
        args.output.write_text(report)
    summary = {
        "device": result["device"],
        "machine": result["machine"],
        "seconds": result["seconds"],
        "checks": {row["name"]: row["status"] for row in result["checks"]},
    }
    for key in ("engine_img_s", "engine_steady_img_s", "hf_pipeline_img_s", "model_only_img_s"):
        summary[key] = {name: row[key] for name, row in result["speed"].items()}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
