"""``compute_embeddings``: validate, select what is pending, run the
engine, write, record."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dinoprop.core import (
    DinopropError,
    check_field_name,
    check_int,
    check_vector_field,
    require_label_field,
    validate_samples,
)
from dinoprop.embeddings.runs import (
    _check_previous_run,
    _record_failed_run,
    _record_run,
    run_key_for,
)
from dinoprop.embeddings.engine import EmbeddingEngine, check_patch_mode
from dinoprop.embeddings.writer import DEFAULT_CHUNK_SIZE, _Runner

logger = logging.getLogger(__name__)

#: Where :func:`compute_embeddings` runs: this process, or a Ray cluster.
ENGINES = ("local", "ray")


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
        patch_mode: how boxes were embedded: ``"crops"`` or ``"tokens"``
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
        engine: ``"local"`` (this process) or ``"ray"``
        images_per_node: with ``engine="ray"``, the images embedded by
            the actors of each Ray node (by node ID)
        images_per_worker: with ``engine="ray"``, the images embedded by
            each actor (by actor ID)
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
    patch_mode: str = "crops"
    num_embedded: int = 0
    num_skipped: int = 0
    num_failed: int = 0
    failures: list = field(default_factory=list)
    failure_counts: dict = field(default_factory=dict)
    failure_examples: list = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    run_key: str = ""
    engine: str = "local"
    images_per_node: dict = field(default_factory=dict)
    images_per_worker: dict = field(default_factory=dict)

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
    patch_mode: str = "crops",
    image_size: int | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
    precision: str | None = None,
    gpu_decode: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    engine: str = "local",
    ray_address: str | None = None,
    num_gpus_per_worker: float | None = None,
) -> EmbeddingsResults:
    """Embeds every image (or every box) of a collection with a backbone.

    Samples that already hold an embedding from the same model and settings
    are skipped, so rerunning after an interruption resumes where it
    stopped. Results are committed to the database every ``chunk_size``
    samples or every :data:`FLUSH_SECONDS` (2 s), whichever comes first, so
    even ``kill -9`` loses at most a few seconds of work; on Ctrl-C or an
    error, everything computed is committed before the error propagates,
    and the run record's ``num_embedded`` counts only committed vectors.
    With ``engine="ray"`` the images are decoded and embedded on a Ray
    cluster whose actors write the vectors (see
    :mod:`dinoprop.embeddings.distributed`); the same resume rule applies.
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
            batch that fits the GPU memory the weights leave
            (:meth:`dinoprop.models.EmbeddingModel.default_batch_size`)
        num_workers: DataLoader decoding processes; default 1 on small CPU
            hosts, one per spare core on GPUs; 0 decodes in this process.
            With ``engine="ray"``: the embedding actors (default one per
            GPU of the cluster, else half its CPUs)
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
        patch_mode: how boxes are embedded: ``"crops"`` (each box cropped,
            squared and embedded on its own: a forward pass per box) or
            ``"tokens"`` (each image embedded once, whole and uncropped,
            and the patch tokens whose centres lie in a box averaged; a box
            smaller than a patch takes the nearest patch). Tokens cost one
            forward pass per image however many boxes it has; their vectors
            are the mean of patch tokens whatever ``pooling`` says
            (``"cls+mean"`` is refused)
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
        engine: ``"local"`` (this process) or ``"ray"`` (a Ray cluster:
            needs ``pip install 'fiftyone-dinoprop[scale]'`` on every node,
            whole images, ``model`` given by name or path, and a MongoDB
            every node reaches; ``device`` and ``gpu_decode`` do not apply)
        ray_address: with ``engine="ray"``, the cluster's address (e.g.
            ``"ray://head:10001"`` or ``"head:6379"``); None uses
            ``RAY_ADDRESS``, a cluster started on this machine, or a new
            local one
        num_gpus_per_worker: with ``engine="ray"``, the GPUs of each actor
            (fractions share a GPU); default 1 when the cluster has GPUs,
            else 0

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
    _check_patch_mode(patch_mode, patches_field, pooling)
    label_path = _check_target(samples, embeddings_field, patches_field)
    load_options = {"image_size": image_size, "trust_remote_code": trust_remote_code,
                    "compile": compile, "precision": precision}
    engine_options = {"batch_size": batch_size, "pooling": pooling,
                      "normalize": normalize, "flip_average": flip_average}
    if engine == "ray":
        from dinoprop.embeddings.distributed import RayEngine, RayRunner

        _check_ray_arguments(model, device, patches_field, gpu_decode, num_workers)
        embedder = RayEngine(model, load_options, ray_address, num_workers,
                             num_gpus_per_worker, engine_options)
        runner_cls = RayRunner
    else:
        _check_local_arguments(engine, ray_address, num_gpus_per_worker)
        embedder = _local_engine(model, device, load_options,
                                 dict(engine_options, patch_mode=patch_mode), num_workers,
                                 gpu_decode, patches_field)
        runner_cls = _Runner
    facts = embedder.describe()
    settings = {
        "model": facts["summary"]["model"],
        "fingerprint": facts["summary"]["fingerprint"],
        "pooling": facts["pooling"],
        "normalize": bool(normalize),
        "flip_average": bool(flip_average),
        "patches_field": patches_field,
        "patch_mode": patch_mode,
        "embeddings_field": embeddings_field,
        "dim": facts["dim"],
    }
    run_key = run_key_for(embeddings_field, patches_field)
    _check_previous_run(samples, run_key, settings, label_path or embeddings_field, overwrite)

    results = EmbeddingsResults(
        model=settings["model"],
        fingerprint=settings["fingerprint"],
        device=facts["summary"]["device"],
        dim=settings["dim"],
        pooling=settings["pooling"],
        normalize=settings["normalize"],
        flip_average=settings["flip_average"],
        embeddings_field=embeddings_field,
        patches_field=patches_field,
        patch_mode=patch_mode,
        run_key=run_key,
        engine=engine,
    )
    summary = facts["summary"]
    _record_run(samples, run_key, settings, summary, status="running")
    runner = runner_cls(samples, embedder, settings, results, skip_failures, chunk_size)
    try:
        if patches_field is None:
            runner.embed_images(overwrite, progress)
        else:
            runner.embed_patches(label_path, overwrite, progress)
    except BaseException:
        _finish(results, start)
        _record_failed_run(samples, run_key, settings, summary, results)
        raise
    _finish(results, start)
    _record_run(samples, run_key, settings, summary, status="completed", results=results)
    if results.num_failed:
        logger.warning("compute_embeddings: %s", results.failure_report())
    return results


def _local_engine(model, device, load_options, engine_options, num_workers, gpu_decode,
                  patches_field) -> EmbeddingEngine:
    """The engine of a run in this process."""
    from dinoprop import models as dm

    if isinstance(model, dm.EmbeddingModel):
        backbone = model
        _check_loaded_image_size(backbone, load_options["image_size"])
    else:
        backbone = dm.load_model(model, device=device, **load_options)
    if gpu_decode and (backbone.device.type != "cuda" or patches_field is not None):
        raise DinopropError(
            "gpu_decode=True needs a CUDA device and whole-image embeddings "
            "(not patches_field); this run uses %s" % backbone.device
        )
    return EmbeddingEngine(backbone, num_workers=num_workers, gpu_decode=gpu_decode,
                           **engine_options)


def _check_local_arguments(engine, ray_address, num_gpus_per_worker) -> None:
    if engine not in ENGINES:
        raise DinopropError("engine must be one of %s; got %r" % (list(ENGINES), engine))
    if ray_address is not None or num_gpus_per_worker is not None:
        raise DinopropError(
            "ray_address and num_gpus_per_worker apply to engine='ray' only; "
            "pass engine='ray' to embed on a Ray cluster"
        )


def _check_ray_arguments(model, device, patches_field, gpu_decode, num_workers) -> None:
    """Refuses what the Ray engine does not do, before connecting."""
    from dinoprop.models import EmbeddingModel

    if num_workers == 0:
        raise DinopropError(
            "With engine='ray', num_workers counts the embedding actors: pass "
            "at least 1, or None for one per GPU of the cluster"
        )

    if isinstance(model, EmbeddingModel):
        raise DinopropError(
            "engine='ray' loads the model on every worker: pass its name or "
            "path (model=%r), not a loaded EmbeddingModel" % model.name
        )
    refused = [name for name, value in (("device", device), ("patches_field", patches_field),
                                        ("gpu_decode", gpu_decode)) if value]
    if refused:
        raise DinopropError(
            "engine='ray' embeds whole images on the workers' own devices "
            "(num_gpus_per_worker) and does not take %s; leave %s unset or "
            "use engine='local'" % (", ".join(refused), " and ".join(refused))
        )


def _finish(results: EmbeddingsResults, start: float) -> None:
    results.seconds = time.perf_counter() - start
    results.images_per_second = results.num_embedded / max(results.seconds, 1e-9)


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
    if batch_size is not None:
        check_int(batch_size, "batch_size")
    if num_workers is not None:
        check_int(num_workers, "num_workers", minimum=0)
    check_int(chunk_size, "chunk_size")
    check_field_name(embeddings_field, "embeddings_field")


def _check_patch_mode(patch_mode: str, patches_field: str | None, pooling: str) -> None:
    check_patch_mode(patch_mode)
    if patch_mode != "tokens":
        return
    if patches_field is None:
        raise DinopropError(
            "patch_mode='tokens' embeds the boxes of patches_field; pass "
            "patches_field, or leave patch_mode unset for whole images"
        )
    if pooling == "cls+mean":
        raise DinopropError(
            "patch_mode='tokens' averages the patch tokens under each box, so "
            "pooling='cls+mean' cannot apply; use patch_mode='crops' for it"
        )


def _check_loaded_image_size(backbone: Any, image_size: int | None) -> None:
    """Refuses an ``image_size`` that an already loaded model would ignore."""
    from dinoprop.models import Preprocessing, fit_to_patches

    if image_size is None:
        return
    crop = Preprocessing.for_size(image_size).crop_size
    if backbone.has_tokens:  # as load_model would round it
        crop = fit_to_patches(crop, backbone.patch_size, backbone.name)
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
