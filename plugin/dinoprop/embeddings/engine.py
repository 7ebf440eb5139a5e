"""The storage-free embedding engine: image files in, vectors out.

Decode, batch, run the model, pool and normalise, with no FiftyOne and no
database: :func:`dinoprop.compute_embeddings` is a thin layer over it
(which samples are pending, where the vectors are written, the run record),
``benchmarks/gpu_check.py`` runs it on a bare GPU machine, and scale-out
workers can run it anywhere. Importing this module imports neither
FiftyOne nor torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from dinoprop.core import DinopropError, check_int


#: How boxes are embedded: ``"crops"``, a forward pass per box crop, or
#: ``"tokens"``, one forward pass per image and the patch tokens under each
#: box pooled (:meth:`dinoprop.models.EmbeddingModel.embed_boxes`).
PATCH_MODES = ("crops", "tokens")


def check_patch_mode(patch_mode: str) -> None:
    """Raises a DinopropError unless ``patch_mode`` is one of :data:`PATCH_MODES`."""
    if patch_mode not in PATCH_MODES:
        raise DinopropError(
            "Unknown patch_mode %r; choose one of %s" % (patch_mode, list(PATCH_MODES))
        )


@dataclass
class EmbeddedBatch:
    """What one loader batch produced.

    Attributes:
        indices: the positions (in the ``paths`` given to the engine) of the
            files embedded in this batch, in order
        counts: how many vectors each of them has (1 per image; with boxes,
            one per box)
        vectors: a ``sum(counts) x dim`` float32 array, the vectors of
            ``indices`` one after another
        failures: ``(position, reason)`` of the files of this batch that
            could not be read or embedded
    """

    indices: list
    counts: list
    vectors: Optional[np.ndarray]
    failures: list = field(default_factory=list)


class EmbeddingEngine:
    """Embeds image files (or boxes in them) with a loaded backbone.

    DataLoader workers decode, resize and centre-crop (or, with
    ``gpu_decode``, only read files that nvJPEG then decodes on the GPU);
    the model runs in its precision; vectors are pooled and optionally L2
    normalised. Unreadable files are reported per batch, never raised.

    DataLoader workers decode chunks of at most
    :data:`dinoprop.embeddings_data.DECODE_CHUNK` images, gathered into
    model batches of ``batch_size``, so that all workers share each batch.

    Args:
        model: a :class:`dinoprop.models.EmbeddingModel`
        batch_size: images per forward pass; default 16 on CPU and a
            batch that fits the GPU memory the weights leave
            (:meth:`dinoprop.models.EmbeddingModel.default_batch_size`)
        num_workers: DataLoader decoding processes; default 1 on small
            CPU hosts, one per spare core on GPUs; 0 decodes in this process
        pooling: ``"cls"``, ``"mean"`` (patch tokens) or ``"cls+mean"``
        normalize: whether vectors are scaled to unit L2 norm
        flip_average: whether each vector averages the image's and its
            mirror image's
        gpu_decode: decode JPEGs on the GPU with nvJPEG (CUDA, whole
            images only)
        patch_mode: how :meth:`run` embeds boxes: ``"crops"`` (each box
            cropped, squared and embedded on its own) or ``"tokens"`` (each
            image embedded once, whole, and the patch tokens under each box
            averaged; ``pooling`` then applies to crops only)

    Attributes:
        stats: after (or during) :meth:`run`: ``images`` and ``vectors``
            embedded, ``failed``, ``seconds``, ``wait_seconds`` (waiting for
            decoded batches), ``model_seconds`` (decoding on the GPU, the
            transfer and the model), ``images_per_second`` and
            ``wait_share`` (``wait_seconds / seconds``: near 1 when decoding
            is the bottleneck, near 0 when the model is) and
            ``first_batch_seconds`` (until the first batch was decoded:
            starting the workers and decoding that batch's chunks)
    """

    def __init__(
        self,
        model: Any,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        pooling: str = "cls",
        normalize: bool = True,
        flip_average: bool = False,
        gpu_decode: bool = False,
        patch_mode: str = "crops",
    ):
        from dinoprop.embeddings_data import default_num_workers
        from dinoprop.models import check_pooling

        check_pooling(pooling)
        check_patch_mode(patch_mode)
        for name, value in (("batch_size", batch_size), ("num_workers", num_workers)):
            if value is not None:
                check_int(value, name, minimum=1 if name == "batch_size" else 0)
        if gpu_decode and model.device.type != "cuda":
            raise DinopropError(
                "gpu_decode=True needs a CUDA device; this model runs on %s" % model.device
            )
        self.model = model
        self.batch_size = batch_size or model.default_batch_size()
        self.num_workers = default_num_workers(model.device) if num_workers is None else num_workers
        self.options = {"pooling": pooling, "normalize": bool(normalize),
                        "flip_average": bool(flip_average)}
        self.gpu_decode = bool(gpu_decode)
        self.patch_mode = patch_mode
        self.stats = _empty_stats()

    def run(
        self, paths: Sequence[str], boxes: Optional[Sequence[Sequence[Sequence[float]]]] = None
    ) -> Iterator[EmbeddedBatch]:
        """Embeds ``paths`` (or, with ``boxes``, the boxes of each file).

        Args:
            paths: image file paths
            boxes: optional, per file, a list of relative ``[x, y, w, h]``
                boxes to embed instead of the whole image: each box cropped
                (squared, padded to at least the patch size), or with
                ``patch_mode="tokens"`` its patch tokens pooled

        Yields:
            an :class:`EmbeddedBatch` per loader batch, in input order
        """
        from dinoprop.embeddings_data import (
            EncodedItems,
            ImageItems,
            PatchItems,
            WholeImageItems,
            collate_encoded,
            gather_chunks,
            make_loader,
        )

        model = self.model
        encoded = self.gpu_decode
        if boxes is not None:
            if encoded:
                raise DinopropError("gpu_decode=True embeds whole images, not boxes")
            if len(boxes) != len(paths):
                raise DinopropError(
                    "boxes must hold one list per path; got %d for %d paths"
                    % (len(boxes), len(paths))
                )
            if self.patch_mode == "tokens":
                items = WholeImageItems(paths, model.preprocessing)
            else:
                min_pixels = max(model.patch_size, 16)
                items = PatchItems(paths, boxes, model.preprocessing, min_pixels)
        elif encoded:
            items = EncodedItems(paths, model.preprocessing)
        else:
            items = ImageItems(paths, model.preprocessing)
        loader = make_loader(
            items, self.batch_size, self.num_workers, model.device,
            collate_encoded if encoded else None, pin_memory=not encoded,
        )
        self.stats = _empty_stats()
        start = waited = time.perf_counter()
        for indices, tensors, counts, failures in gather_chunks(
            loader, self.batch_size, model.device
        ):
            ready = time.perf_counter()
            self.stats["wait_seconds"] += ready - waited
            if not self.stats["first_batch_seconds"]:
                self.stats["first_batch_seconds"] = ready - start
            if boxes is not None and self.patch_mode == "tokens":
                batch = self._embed_box_tokens(indices, tensors, failures, boxes)
            else:
                batch = self._embed_batch(items, indices, tensors, counts, failures)
            waited = time.perf_counter()
            self.stats["model_seconds"] += waited - ready
            self._count(batch, waited - start)
            yield batch
            waited = time.perf_counter()  # the caller's time is not ours

    def _embed_batch(self, items, indices, tensors, counts, failures) -> EmbeddedBatch:
        from dinoprop.embeddings_data import decode_on_device

        if self.gpu_decode:
            indices, tensors, more = decode_on_device(
                indices, tensors, items.filepaths, self.model.preprocessing, self.model.device
            )
            failures, counts = failures + more, [1] * len(indices)
        vectors = self.embed_images(tensors) if indices else None
        return EmbeddedBatch(list(indices), list(counts), vectors, list(failures))

    def _embed_box_tokens(self, indices, tensors, failures, boxes) -> EmbeddedBatch:
        """One forward pass for the batch's images, a vector per box."""
        image_boxes = [boxes[i] for i in indices]
        vectors = None
        if indices:
            vectors = self.model.embed_boxes(
                tensors, image_boxes, normalize=self.options["normalize"],
                flip_average=self.options["flip_average"],
            )
        return EmbeddedBatch(list(indices), [len(b) for b in image_boxes], vectors, list(failures))

    def embed_images(self, images: Any) -> np.ndarray:
        """Embeds already decoded images, in slices of at most ``batch_size``.

        Args:
            images: an ``N x 3 x S x S`` uint8 tensor of resized, centre
                cropped images (what :func:`dinoprop.models.preprocess_image`
                returns, stacked), e.g. decoded elsewhere

        Returns:
            an ``N x dim`` float32 array
        """
        embed, size = self.model.embed, self.batch_size
        if len(images) <= size:
            return embed(images, **self.options)
        return np.concatenate(
            [embed(images[i : i + size], **self.options) for i in range(0, len(images), size)]
        )

    def describe(self) -> dict:
        """What a run with this engine records and needs to know.

        Returns:
            a dict with ``summary`` (:func:`dinoprop.models.model_summary`),
            ``pooling`` (the pooling applied: with ``patch_mode="tokens"``
            the mean of the patch tokens under each box), ``dim`` (the
            vector length)
            and ``batch_size``
        """
        from dinoprop.models import model_summary

        pooling = self.options["pooling"]
        tokens = self.patch_mode == "tokens"  # boxes pool the patch tokens
        return {
            "summary": model_summary(self.model),
            "pooling": "mean" if tokens else self.model.effective_pooling(pooling),
            "dim": self.model.hidden_dim if tokens else self.model.output_dim(pooling),
            "batch_size": self.batch_size,
        }

    def _count(self, batch: EmbeddedBatch, elapsed: float) -> None:
        stats = self.stats
        stats["images"] += len(batch.indices)
        stats["vectors"] += int(sum(batch.counts))
        stats["failed"] += len(batch.failures)
        stats["seconds"] = elapsed
        stats["images_per_second"] = round(stats["images"] / max(elapsed, 1e-9), 2)
        stats["wait_share"] = round(stats["wait_seconds"] / max(elapsed, 1e-9), 3)


def _empty_stats() -> dict:
    return {"images": 0, "vectors": 0, "failed": 0, "seconds": 0.0, "wait_seconds": 0.0,
            "first_batch_seconds": 0.0, "model_seconds": 0.0, "images_per_second": 0.0, "wait_share": 0.0}


def embed_files(
    paths: Sequence[str],
    model: Any = "dinov2-small",
    boxes: Optional[Sequence[Sequence[Sequence[float]]]] = None,
    device: Any = None,
    image_size: Optional[int] = None,
    precision: Optional[str] = None,
    compile: bool = False,
    trust_remote_code: bool = False,
    **engine_options: Any,
) -> Iterator[EmbeddedBatch]:
    """Embeds image files without FiftyOne or a database.

    The same pipeline as :func:`dinoprop.compute_embeddings` (same
    preprocessing, precision, flip averaging and box crops), yielding the
    vectors instead of storing them::

        from dinoprop.embeddings import embed_files

        for batch in embed_files(paths, model="dinov2-small"):
            for position, vector in zip(batch.indices, batch.vectors):
                ...
            for position, reason in batch.failures:
                ...

    Args:
        paths: image file paths
        model: a model name, Hugging Face id, local directory, Meta
            ``.pth`` checkpoint, or a loaded
            :class:`dinoprop.models.EmbeddingModel`
        boxes: optional, per file, relative ``[x, y, w, h]`` boxes to embed
            instead of the whole image (``counts`` then says how many
            vectors each file has)
        device: None (CUDA, else MPS, else CPU) or e.g. ``"cuda:1"``
        image_size: the model's input crop size (default 224)
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see
            :func:`dinoprop.models.load_model`)
        compile: ``torch.compile`` the model (CUDA only)
        trust_remote_code: allow Hugging Face models to run their own code
        **engine_options: ``batch_size``, ``num_workers``, ``pooling``,
            ``normalize``, ``flip_average``, ``gpu_decode`` (see
            :class:`EmbeddingEngine`)

    Yields:
        an :class:`EmbeddedBatch` per batch, in input order

    Raises:
        DinopropError: for an unknown model or invalid options (before
            anything is embedded)
    """
    from dinoprop import models as dm

    backbone = model if isinstance(model, dm.EmbeddingModel) else dm.load_model(
        model, device=device, image_size=image_size, trust_remote_code=trust_remote_code,
        compile=compile, precision=precision,
    )
    engine = EmbeddingEngine(backbone, **engine_options)
    return engine.run(paths, boxes=boxes)
