"""Compute DINOv2 (or other backbone) embeddings for a FiftyOne collection.

:func:`compute_embeddings` is the fast, resumable alternative to FiftyOne's
``compute_embeddings``: DataLoader workers decode and resize, the model runs
in bf16/fp16 on GPUs (fp32 on CPU) with SDPA attention, and vectors are
written to the database in bulk chunks. Every chunk is committed, and the
model fingerprint and settings are recorded as a FiftyOne run on the dataset,
so calling it again after a crash embeds only what is missing.

With ``patches_field``, every box of a Detections (or Polylines) field is
cropped and embedded, and its vector is stored on the label itself.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from dinoprop.core import (
    DinopropError,
    check_field_name,
    check_vector_field,
    progress_bar,
    require_label_field,
    validate_samples,
)

logger = logging.getLogger(__name__)

#: The run key prefix under which embeddings runs are recorded.
RUN_KEY_PREFIX = "dinoprop_embeddings_"

#: Default number of samples committed to the database per write.
DEFAULT_CHUNK_SIZE = 1024

#: Buffered results are also committed after this many seconds, so an
#: interruption (even ``kill -9``) loses at most about this much work plus
#: one batch. One bulk write every 2 s costs well under 1% of the run time.
FLUSH_SECONDS = 2.0

#: Failed images named in the warning and the result panel.
FAILURE_EXAMPLES = 5

#: Settings that must match for stored embeddings to be reused.
_FINGERPRINT_KEYS = ("fingerprint", "pooling", "normalize", "flip_average", "patches_field")

#: What runs recorded before a setting existed used for it.
_SETTING_DEFAULTS = {"flip_average": False}


@dataclass
class EmbeddingsResults:
    """What a :func:`compute_embeddings` call did.

    Attributes:
        model: the model name
        fingerprint: the hash of the model weights and preprocessing
        device: the device the model ran on
        dim: the length of each vector
        pooling: the pooling used (``cls``, ``mean`` or ``cls+mean``)
        normalize: whether vectors are L2-normalised
        flip_average: whether vectors average the image and its mirror image
        embeddings_field: the field (or label attribute) holding vectors
        patches_field: the label field whose boxes were embedded, if any
        num_embedded: images (or boxes) embedded and committed by this call
        num_skipped: images (or boxes) that already had an embedding from
            the same model and settings
        num_failed: images that could not be read or embedded
        failures: ``(sample_id, reason)`` for every failure; reasons read
            ``"<kind>: <detail>"``
        failure_counts: ``{kind: count}`` of the failures, e.g.
            ``{"file not found": 2, "extreme aspect ratio": 1}``
        failure_examples: ``"filepath (reason)"`` of the first few failures
        seconds: wall-clock duration of the call
        images_per_second: throughput over the embedded images
        run_key: the run recording this field's model and settings
    """

    model: str
    fingerprint: str
    device: str
    dim: int
    pooling: str
    normalize: bool
    embeddings_field: str
    flip_average: bool = False
    patches_field: str | None = None
    num_embedded: int = 0
    num_skipped: int = 0
    num_failed: int = 0
    failures: list = field(default_factory=list)
    failure_counts: dict = field(default_factory=dict)
    failure_examples: list = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    run_key: str = ""

    def summary(self) -> dict:
        """JSON-serialisable numbers for an App result panel."""
        summary = asdict(self)
        summary["failures"] = [list(f) for f in self.failures[:100]]
        summary["failure_report"] = self.failure_report() or "none"
        summary["seconds"] = round(self.seconds, 3)
        summary["images_per_second"] = round(self.images_per_second, 2)
        return summary

    def failure_report(self) -> str:
        """How many images failed, by reason, and the first few; "" if none.

        For example ``"2 images could not be embedded (1 file not found, 1
        unreadable image); first: a.jpg (file not found: a.jpg), b.jpg
        (unreadable image: ...)"``.
        """
        if not self.num_failed:
            return ""
        counts = ", ".join(
            "%d %s" % (n, kind)
            for kind, n in sorted(self.failure_counts.items(), key=lambda kv: -kv[1])
        )
        return "%d image%s could not be embedded (%s); first: %s" % (
            self.num_failed, "s" if self.num_failed > 1 else "", counts,
            ", ".join(self.failure_examples),
        )


def compute_embeddings(
    samples: Any,
    model: Any = "dinov2-small",
    embeddings_field: str = "dinoprop_embedding",
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: Any = None,
    skip_failures: bool = True,
    overwrite: bool = False,
    progress: Any = None,
    pooling: str = "cls",
    normalize: bool = True,
    flip_average: bool = False,
    patches_field: str | None = None,
    image_size: int | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
    precision: str | None = None,
    gpu_decode: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EmbeddingsResults:
    """Embeds every image (or every box) of a collection with a backbone.

    Samples that already hold an embedding from the same model and settings
    are skipped, so rerunning after an interruption resumes where it
    stopped. Results are committed to the database every ``chunk_size``
    samples or every :data:`FLUSH_SECONDS` (2 s), whichever comes first, so
    even ``kill -9`` loses at most a few seconds of work; on Ctrl-C or an
    error, everything computed is committed before the error propagates,
    and the run record's ``num_embedded`` counts only committed vectors.
    Images that cannot be embedded are reported: one logged warning with
    their count by reason and the first paths, and
    :attr:`EmbeddingsResults.failure_counts` / ``failures``.

    Args:
        samples: a FiftyOne dataset or view of images
        model: a model name (see :data:`dinoprop.models.MODEL_CHOICES`), a
            Hugging Face id, a local directory, a Meta ``.pth`` checkpoint,
            or an already loaded :class:`dinoprop.models.EmbeddingModel`
        embeddings_field: the sample field to store vectors in, or with
            ``patches_field`` the attribute set on each label
        batch_size: images per forward pass; default 16 on CPU and a
            model-sized batch on GPUs
        num_workers: DataLoader decoding processes; default 1 on small CPU
            hosts, one per spare core on GPUs; 0 decodes in this process
        device: None (CUDA, else MPS, else CPU) or e.g. ``"cuda:1"``
        skip_failures: whether images that cannot be embedded are skipped
            and reported (True) or raise on the first one (False): missing
            or unreadable files, images over ``PIL.Image.MAX_IMAGE_PIXELS``
            once decoded (JPEGs after draft downscaling) or decompression
            bombs, and aspect ratios over 20:1
            (:data:`dinoprop.models.MAX_ASPECT_RATIO`)
        overwrite: whether to recompute embeddings that already exist
        progress: None (FiftyOne's default), a bool, or a callable receiving
            the progress bar
        pooling: ``"cls"``, ``"mean"`` (patch tokens) or ``"cls+mean"``
        normalize: whether to L2-normalise the vectors
        flip_average: average each vector with the mirror image's
            (horizontal-flip test-time augmentation): twice the model
            compute, for vectors that do not depend on which way an object
            faces (its effect on propagation: benchmarks/README.md)
        patches_field: a Detections or Polylines field whose boxes to embed
        image_size: the model's input crop size (default 224)
        trust_remote_code: allow Hugging Face models to run their own code
        compile: ``torch.compile`` the model (CUDA only)
        precision: ``"auto"`` (bf16/fp16 on GPUs, bf16 on CPUs with native
            bf16 such as AVX512-BF16/AMX, else fp32), ``"fp32"`` (exact
            float32 everywhere), ``"bf16"`` or ``"fp16"``
        gpu_decode: decode JPEGs on the GPU with nvJPEG (CUDA only; workers
            then only read files, which helps when CPU decoding is the
            bottleneck)
        chunk_size: samples committed per database write

    Returns:
        an :class:`EmbeddingsResults`

    Raises:
        DinopropError: for invalid input (nothing is written), or with
            ``skip_failures=False`` on the first unreadable image (what was
            embedded is committed, and the run is recorded with status
            ``"failed"`` and what it committed; a rerun resumes)
    """
    from dinoprop import models as dm

    start = time.perf_counter()
    samples = _image_samples(samples)
    _check_arguments(batch_size, num_workers, chunk_size, embeddings_field)
    dm.check_pooling(pooling)
    label_path = _check_target(samples, embeddings_field, patches_field)
    if isinstance(model, dm.EmbeddingModel):
        backbone = model
        _check_loaded_image_size(backbone, image_size)
    else:
        backbone = dm.load_model(
            model, device=device, image_size=image_size,
            trust_remote_code=trust_remote_code, compile=compile, precision=precision,
        )
    settings = {
        "model": backbone.name,
        "fingerprint": backbone.fingerprint,
        "pooling": backbone.effective_pooling(pooling),
        "normalize": bool(normalize),
        "flip_average": bool(flip_average),
        "patches_field": patches_field,
        "embeddings_field": embeddings_field,
        "dim": backbone.output_dim(pooling),
    }
    if gpu_decode and (backbone.device.type != "cuda" or patches_field is not None):
        raise DinopropError(
            "gpu_decode=True needs a CUDA device and whole-image embeddings "
            "(not patches_field); this run uses %s" % backbone.device
        )
    run_key = run_key_for(embeddings_field, patches_field)
    _check_previous_run(samples, run_key, settings, label_path or embeddings_field, overwrite)

    results = EmbeddingsResults(
        model=backbone.name,
        fingerprint=backbone.fingerprint,
        device=str(backbone.device),
        dim=settings["dim"],
        pooling=settings["pooling"],
        normalize=settings["normalize"],
        flip_average=settings["flip_average"],
        embeddings_field=embeddings_field,
        patches_field=patches_field,
        run_key=run_key,
    )
    _record_run(samples, run_key, settings, backbone, status="running")
    batch_size = batch_size or _default_batch_size(backbone)
    num_workers = _default_workers(backbone) if num_workers is None else num_workers
    runner = _Runner(samples, backbone, settings, results, skip_failures, chunk_size, gpu_decode)
    try:
        if patches_field is None:
            runner.embed_images(overwrite, batch_size, num_workers, progress)
        else:
            runner.embed_patches(label_path, overwrite, batch_size, num_workers, progress)
    except BaseException:
        _record_failed_run(samples, run_key, settings, backbone, results, start)
        raise
    _finish(results, start)
    _record_run(samples, run_key, settings, backbone, status="completed", results=results)
    if results.num_failed:
        logger.warning("compute_embeddings: %s", results.failure_report())
    return results


def _finish(results: EmbeddingsResults, start: float) -> None:
    results.seconds = time.perf_counter() - start
    results.images_per_second = results.num_embedded / max(results.seconds, 1e-9)


def _record_failed_run(samples, run_key, settings, backbone, results, start) -> None:
    """Records an interrupted run as ``failed`` with what it committed.

    The vectors already written stay (a rerun resumes from them); the run
    record says the field is incomplete instead of staying ``running``.
    Errors while recording are logged, so the original error is raised.
    """
    try:
        _finish(results, start)
        _record_run(samples, run_key, settings, backbone, status="failed", results=results)
    except Exception:  # the database may be what failed
        logger.warning("Could not record the failed embeddings run '%s'", run_key, exc_info=True)


def run_key_for(embeddings_field: str, patches_field: str | None = None) -> str:
    """The run key recording the model and settings of an embeddings field."""
    target = embeddings_field if patches_field is None else "%s_%s" % (patches_field, embeddings_field)
    return RUN_KEY_PREFIX + re.sub(r"\W", "_", target)


def get_embeddings_run(samples: Any, embeddings_field: str, patches_field: str | None = None) -> dict | None:
    """The recorded settings of the embeddings in a field, or None.

    Returns:
        a dict with ``model``, ``fingerprint``, ``pooling``, ``normalize``,
        ``dim``, ``status`` and more, or None if no run was recorded
    """
    run_key = run_key_for(embeddings_field, patches_field)
    if not samples.has_run(run_key):
        return None
    return dict(samples.get_run_info(run_key).config.serialize())


# --- validation -------------------------------------------------------------


def _image_samples(samples: Any) -> Any:
    validate_samples(samples)
    if samples.media_type == "group":
        if "image" not in samples.group_media_types.values():
            raise DinopropError(
                "Grouped dataset '%s' has no image slices (slices: %s)"
                % (samples._root_dataset.name, samples.group_media_types)
            )
        samples = samples.select_group_slices(media_type="image")
        validate_samples(samples)
    return samples


def _check_arguments(batch_size, num_workers, chunk_size, embeddings_field) -> None:
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("chunk_size", chunk_size, 1),
    ):
        if value is None and name != "chunk_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DinopropError(
                "%s must be an integer >= %d; got %r" % (name, minimum, value)
            )
    check_field_name(embeddings_field, "embeddings_field")


def _check_loaded_image_size(backbone: Any, image_size: int | None) -> None:
    """Refuses an ``image_size`` that an already loaded model would ignore."""
    from dinoprop.models import Preprocessing

    if image_size is None:
        return
    crop = Preprocessing.for_size(image_size).crop_size
    if crop != backbone.preprocessing.crop_size:
        raise DinopropError(
            "image_size=%d differs from the loaded model's %d; load the model "
            "with load_model(..., image_size=%d), or leave image_size unset"
            % (crop, backbone.preprocessing.crop_size, crop)
        )


def _check_target(samples: Any, embeddings_field: str, patches_field: str | None) -> str | None:
    """Validates where vectors go; returns the label attribute path, if any."""
    if patches_field is None:
        check_vector_field(samples, embeddings_field)
        return None
    import fiftyone.core.labels as fol

    label_cls = require_label_field(samples, patches_field, (fol.Detections, fol.Polylines))
    list_field = label_cls._LABEL_LIST_FIELD
    if "." in embeddings_field:
        raise DinopropError(
            "With patches_field, embeddings_field names an attribute of each "
            "label and cannot contain '.'; got %r" % embeddings_field
        )
    path = "%s.%s.%s" % (patches_field, list_field, embeddings_field)
    check_vector_field(samples, path)
    return path


def _check_previous_run(samples, run_key, settings, target, overwrite) -> None:
    """Refuses to mix vectors from different models/settings in one field."""
    previous = None
    if samples.has_run(run_key):
        previous = samples.get_run_info(run_key).config.serialize()
    if previous is not None and all(
        recorded_setting(previous, k) == settings[k] for k in _FINGERPRINT_KEYS
    ):
        return
    if not _has_any_value(samples._dataset, target):
        return
    if overwrite:
        outside = samples._dataset.count(target) - samples.count(target)
        if outside > 0:
            raise DinopropError(
                "overwrite=True with other settings would leave %d vectors "
                "outside this view from the old ones in '%s', and the field "
                "would mix two embedding spaces; run it on the whole "
                "dataset, or choose another embeddings_field" % (outside, target)
            )
        return
    if previous is None:
        origin = "vectors from an unknown source (not recorded by dinoprop)"
    else:
        changed = [k for k in _FINGERPRINT_KEYS if recorded_setting(previous, k) != settings[k]]
        origin = "vectors from model '%s' with other settings (%s)" % (
            previous.get("model"), ", ".join(changed),
        )
    raise DinopropError(
        "Field '%s' already holds %s; pass overwrite=True to recompute them "
        "with '%s', or choose another embeddings_field" % (target, origin, settings["model"])
    )


def recorded_setting(run: dict, key: str) -> Any:
    """A setting of a recorded embeddings run (:func:`get_embeddings_run`),
    or its default for runs recorded before the setting existed."""
    return run.get(key, _SETTING_DEFAULTS.get(key))


def _has_any_value(dataset: Any, path: str) -> bool:
    """Whether any sample (or label) of the dataset has a value at ``path``."""
    if dataset.get_field(path) is None and "." not in path:
        return False
    return dataset.count(path) > 0


def _default_batch_size(backbone) -> int:
    from dinoprop.embeddings_data import default_batch_size

    return default_batch_size(backbone.device, backbone.hidden_dim)


def _default_workers(backbone) -> int:
    from dinoprop.embeddings_data import default_num_workers

    return default_num_workers(backbone.device)


# --- run records ------------------------------------------------------------


def _record_run(samples, run_key, settings, backbone, status, results=None) -> None:
    """Records the field's model fingerprint and settings as a FiftyOne run."""
    from dinoprop.models import model_summary

    dataset = samples._dataset
    config = dataset.init_run(**{**model_summary(backbone), **settings, "status": status})
    if status == "running":
        dataset.register_run(run_key, config, overwrite=True, cleanup=False)
        return
    dataset.update_run_config(run_key, config)
    summary = {k: v for k, v in results.summary().items() if k != "run_key"}
    dataset.save_run_results(run_key, dataset.init_run_results(run_key, **summary))


# --- the embedding loop -----------------------------------------------------


def _write_chunk(dataset: Any, path: str, values: dict, label_values: bool) -> None:
    """Commits one chunk of vectors with a single bulk write."""
    if label_values:
        dataset.set_label_values(path, values)
    else:
        dataset.set_values(path, values, key_field="id")


class _Runner:
    """Drives one embeddings call: loader → model → buffered bulk writes."""

    def __init__(self, samples, backbone, settings, results, skip_failures, chunk_size, gpu_decode):
        self.gpu_decode = gpu_decode
        self.samples = samples
        self.dataset = samples._dataset
        self.backbone = backbone
        self.settings = settings
        self.results = results
        self.skip_failures = skip_failures
        self.chunk_size = chunk_size
        self._buffer: dict = {}
        self._last_flush = time.monotonic()

    def embed_images(self, overwrite, batch_size, num_workers, progress) -> None:
        from dinoprop.embeddings_data import EncodedItems, ImageItems

        field_name = self.settings["embeddings_field"]
        todo = self.samples if overwrite else self.samples.exists(field_name, False)
        ids, filepaths = todo.values(["id", "filepath"]) if len(todo) else ([], [])
        self.results.num_skipped = len(self.samples) - len(ids)
        if not ids:
            return
        self._declare_vector_field(field_name)
        if self.gpu_decode:
            items = EncodedItems(filepaths, self.backbone.preprocessing)
        else:
            items = ImageItems(filepaths, self.backbone.preprocessing)
        self._run(items, ids, batch_size, num_workers, progress, field_name, ids, False)

    def embed_patches(self, path, overwrite, batch_size, num_workers, progress) -> None:
        from dinoprop.embeddings_data import PatchItems

        sample_ids, filepaths, boxes, label_ids, skipped = _collect_boxes(
            self.samples, self.settings["patches_field"], path, overwrite
        )
        self.results.num_skipped = skipped
        if not sample_ids:
            return
        self._declare_vector_field(path)
        min_pixels = max(self.backbone.patch_size, 16)
        items = PatchItems(filepaths, boxes, self.backbone.preprocessing, min_pixels)
        self._run(items, sample_ids, batch_size, num_workers, progress, path, label_ids, True)

    def _run(self, items, sample_ids, batch_size, num_workers, progress, path, keys, labels):
        from dinoprop.embeddings_data import collate_encoded, make_loader

        collate_fn = collate_encoded if self.gpu_decode and not labels else None
        loader = make_loader(items, batch_size, num_workers, self.backbone.device, collate_fn)
        with progress_bar(len(items), progress=progress, iters_str="images") as pb:
            try:
                for batch in loader:
                    pb.update(self._embed_batch(batch, items, sample_ids, batch_size, keys, labels))
                    self._maybe_flush(path, labels)
            except BaseException:  # Ctrl-C or an error: keep what was computed
                self._flush_after_error(path, labels)
                raise
        self._flush(path, labels)

    def _embed_batch(self, batch, items, sample_ids, batch_size, keys, labels) -> int:
        """Embeds one loader batch into the buffer; returns the images it held."""
        from dinoprop.embeddings_data import decode_on_device

        indices, tensors, counts, failures = batch
        if self.gpu_decode and not labels:
            indices, tensors, more = decode_on_device(
                indices, tensors, items.filepaths, self.backbone.preprocessing, self.backbone.device
            )
            failures, counts = failures + more, [1] * len(indices)
        self._record_failures(failures, sample_ids, items.filepaths)
        if indices:
            options = {k: self.settings[k] for k in ("pooling", "normalize", "flip_average")}
            vectors = _embed_in_batches(self.backbone.embed, tensors, batch_size, options)
            self._buffer_vectors(indices, counts, vectors, keys, labels)
        return len(indices) + len(failures)

    def _buffer_vectors(self, indices, counts, vectors, keys, labels) -> None:
        offset = 0
        for index, count in zip(indices, counts):
            if labels:
                for label_id, vector in zip(keys[index], vectors[offset : offset + count]):
                    self._buffer[label_id] = vector
            else:
                self._buffer[keys[index]] = vectors[offset]
            offset += count

    def _record_failures(self, failures, sample_ids, filepaths) -> None:
        from dinoprop.embeddings_data import failure_kind

        results = self.results
        for index, reason in failures:
            failure = (sample_ids[index], reason)
            results.failures.append(failure)
            results.num_failed += 1
            kind = failure_kind(reason)
            results.failure_counts[kind] = results.failure_counts.get(kind, 0) + 1
            if len(results.failure_examples) < FAILURE_EXAMPLES:
                results.failure_examples.append("%s (%s)" % (filepaths[index], reason))
            if not self.skip_failures:
                raise DinopropError(
                    "Cannot embed sample %s: %s (pass skip_failures=True to "
                    "skip such samples)" % failure
                )

    def _maybe_flush(self, path, labels) -> None:
        due = time.monotonic() - self._last_flush > FLUSH_SECONDS
        if len(self._buffer) >= self.chunk_size or (self._buffer and due):
            self._flush(path, labels)

    def _flush(self, path, labels) -> None:
        """Commits the buffered vectors; ``num_embedded`` counts committed ones."""
        if self._buffer:
            _write_chunk(self.dataset, path, self._buffer, labels)
            self.results.num_embedded += len(self._buffer)
            self._buffer = {}
        self._last_flush = time.monotonic()

    def _flush_after_error(self, path, labels) -> None:
        """Commits what was computed before an error, which is then re-raised."""
        try:
            self._flush(path, labels)
        except Exception:  # the database may be what failed
            logger.warning(
                "Could not commit the %d vectors computed before the error",
                len(self._buffer), exc_info=True,
            )

    def _declare_vector_field(self, field_name) -> None:
        import fiftyone as fo

        if self.dataset.get_field(field_name) is None:
            self.dataset.add_sample_field(
                field_name, fo.VectorField,
                description="dinoprop %s embeddings (%s pooling)"
                % (self.settings["model"], self.settings["pooling"]),
            )


def _embed_in_batches(embed: Callable, tensors, batch_size, options: dict) -> np.ndarray:
    """Embeds ``tensors`` in slices of at most ``batch_size`` (box crops);
    ``options`` are :meth:`EmbeddingModel.embed`'s keyword arguments."""
    if len(tensors) <= batch_size:
        return embed(tensors, **options)
    return np.concatenate([
        embed(tensors[i : i + batch_size], **options)
        for i in range(0, len(tensors), batch_size)
    ])


def _collect_boxes(samples, patches_field, path, overwrite):
    """The boxes still to embed, grouped by sample."""
    import fiftyone.core.labels as fol

    list_field = path.split(".")[1]
    label_cls = samples.get_field(patches_field).document_type
    prefix = "%s.%s." % (patches_field, list_field)
    geometry = prefix + ("bounding_box" if label_cls is fol.Detections else "points")
    attr = path
    ids, filepaths, label_ids, shapes, existing = samples.values(
        ["id", "filepath", prefix + "id", geometry, attr]
    )
    out = ([], [], [], [])
    skipped = 0
    for sid, filepath, lids, geoms, vecs in zip(ids, filepaths, label_ids, shapes, existing):
        todo = [
            (lid, _as_box(g)) for lid, g, v in zip(lids or [], geoms or [], vecs or [])
            if (overwrite or v is None) and _as_box(g) is not None
        ]
        skipped += len(lids or []) - len(todo)
        if todo:
            out[0].append(sid)
            out[1].append(filepath)
            out[2].append([b for _, b in todo])
            out[3].append([lid for lid, _ in todo])
    return out[0], out[1], out[2], out[3], skipped


def _as_box(geometry):
    """A relative ``[x, y, w, h]`` box from a bounding box or polyline points."""
    if not geometry:
        return None
    if isinstance(geometry[0], (int, float)):
        return list(geometry) if len(geometry) == 4 else None
    points = [p for shape in geometry for p in shape]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
