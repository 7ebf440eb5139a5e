"""The input pipeline of :mod:`dinoprop.embeddings`: decode, resize, batch.

DataLoader worker processes open images (PIL ``draft()`` lets the JPEG
decoder downsample early), resize and centre-crop them, and hand uint8
tensors to the main process, which normalises them on the device. Every
path decodes files with :func:`dinoprop.models.open_image` (EXIF
orientation, size limits) and :func:`dinoprop.models.to_rgb` (bit depth).
Failures travel with the batch as ``(index, reason)`` pairs instead of
crashing it; reasons read ``"<kind>: <detail>"`` (see
:func:`describe_failure`).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from dinoprop.core import usable_cores
from dinoprop.models import (
    Preprocessing,
    UnsupportedImage,
    center_crop_to_tensor,
    open_image,
    preprocess_image,
    preprocess_image_array,
    preprocess_whole_image,
    to_rgb,
)
from dinoprop.models.images import check_image_size, needs_cpu_decode


class ImageItems:
    """A map-style dataset of image files for a ``torch`` DataLoader.

    Each item is ``(index, tensor or None, error or None)``.
    """

    #: resizes and crops a decoded image into the model's input
    transform = staticmethod(preprocess_image)

    def __init__(self, filepaths: Sequence[str], preprocessing: Preprocessing):
        self.filepaths = filepaths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, index: int):
        try:
            image = open_image(self.filepaths[index], self.preprocessing)
            return index, self.transform(image, self.preprocessing), None
        except Exception as e:  # reported per sample, never fatal here
            return index, None, describe_failure(e)


class ArrayImageItems(ImageItems):
    """:class:`ImageItems` whose images are ``3 x S x S`` uint8 numpy arrays:
    decoding without importing torch (the Ray engine's decode tasks)."""

    transform = staticmethod(preprocess_image_array)


class WholeImageItems(ImageItems):
    """Image files resized whole (uncropped) to the model's square input, so
    that the patch tokens under every box can be pooled
    (``patch_mode="tokens"``; see
    :func:`dinoprop.models.preprocess_whole_image`)."""

    transform = staticmethod(preprocess_whole_image)


class PatchItems:
    """A map-style dataset of box crops, one item per image.

    Each item is ``(index, n x 3 x S x S tensor or None, error or None)``
    where ``n`` is the number of boxes of that image.
    """

    def __init__(
        self,
        filepaths: Sequence[str],
        boxes: Sequence[Sequence[Sequence[float]]],
        preprocessing: Preprocessing,
        min_box_pixels: int,
    ):
        self.filepaths = filepaths
        self.boxes = boxes
        self.preprocessing = preprocessing
        self.min_box_pixels = min_box_pixels

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, index: int):
        import torch

        try:
            image = to_rgb(open_image(self.filepaths[index]))
            crops = [
                crop_box(image, box, self.preprocessing.crop_size, self.min_box_pixels)
                for box in self.boxes[index]
            ]
            return index, torch.stack(crops), None
        except Exception as e:  # reported per sample, never fatal here
            return index, None, describe_failure(e)


def crop_box(image: Any, box: Sequence[float], size: int, min_pixels: int) -> Any:
    """Crops a relative ``[x, y, w, h]`` box, squared and padded, to a tensor.

    The box is grown to a square around its centre (so objects are not
    distorted) and to at least ``min_pixels`` on each side (tiny boxes get
    context instead of crashing), clipped to the image, then resized to
    ``size x size``.
    """
    from PIL import Image

    width, height = image.size
    x, y, w, h = box
    cx, cy = (x + w / 2) * width, (y + h / 2) * height
    side = max(w * width, h * height, min_pixels, 1.0)
    left = int(max(0, round(cx - side / 2)))
    top = int(max(0, round(cy - side / 2)))
    right = int(min(width, max(left + 1, round(cx + side / 2))))
    bottom = int(min(height, max(top + 1, round(cy + side / 2))))
    crop = image.crop((left, top, right, bottom))
    crop = crop.resize((size, size), Image.BICUBIC)
    return center_crop_to_tensor(crop, size)


def describe_failure(error: Exception) -> str:
    """A one-line ``"<kind>: <detail>"`` reason for a per-sample failure.

    The kind (:func:`failure_kind`) is shared by failures with the same
    cause: ``"file not found"``, ``"unreadable image"`` (not an image,
    truncated, no permission), the kinds of
    :class:`~dinoprop.models.UnsupportedImage` (``"image too large"``,
    ``"extreme aspect ratio"``), else the exception's type.
    """
    if isinstance(error, FileNotFoundError):
        return "file not found: %s" % (error.filename or error)
    text = str(error).strip().splitlines()
    detail = text[0] if text else ""
    if isinstance(error, UnsupportedImage):
        return detail  # "<kind>: <detail>" already
    kind = "unreadable image" if isinstance(error, OSError) else type(error).__name__
    return "%s: %s" % (kind, detail)


def failure_kind(reason: str) -> str:
    """The kind of a :func:`describe_failure` reason: the part before ':'."""
    return reason.split(":", 1)[0]


def collate(items: list) -> tuple:
    """Stacks the successful items; keeps failures as ``(index, reason)``."""
    import torch

    good = [(i, t) for i, t, e in items if e is None]
    failures = [(i, e) for i, _, e in items if e is not None]
    indices = [i for i, _ in good]
    if not good:
        return indices, None, [], failures
    counts = [t.shape[0] if t.dim() == 4 else 1 for _, t in good]
    tensors = [t if t.dim() == 4 else t.unsqueeze(0) for _, t in good]
    return indices, torch.cat(tensors), counts, failures


def make_loader(
    items: Any, batch_size: int, num_workers: int, device: Any, collate_fn: Any = None,
    pin_memory: bool = True,
) -> Any:
    """A DataLoader tuned for the device: pinned memory and prefetch on CUDA.

    Batches larger than :data:`DECODE_CHUNK` come as chunks that tile each
    batch (:class:`ChunkSampler`); :func:`gather_chunks` joins them again.

    ``pin_memory=False`` leaves batches in pageable memory even on CUDA (the
    encoded files of :class:`EncodedItems`: nvJPEG reads them from the host
    itself, and pinning hundreds of small buffers per batch only costs time).
    """
    import torch

    on_cuda = device.type == "cuda"
    kwargs = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4 if on_cuda else 2
    if batch_size > DECODE_CHUNK:
        kwargs["batch_sampler"] = ChunkSampler(len(items), batch_size)
    else:
        kwargs["batch_size"] = batch_size
    return torch.utils.data.DataLoader(
        items,
        num_workers=num_workers,
        collate_fn=collate_fn or collate,
        pin_memory=on_cuda and pin_memory,
        **kwargs,
    )


#: The most images one DataLoader task (what one worker decodes at a time)
#: holds. Model batches larger than this (GPU batches reach 512) are
#: decoded as several chunks by several workers at once and gathered again
#: (:func:`gather_chunks`): the first batch is ready after one chunk's
#: decoding instead of a whole batch's, and a run of a few batches keeps
#: every worker busy instead of one worker per batch.
DECODE_CHUNK = 64


class ChunkSampler:
    """A DataLoader ``batch_sampler``: the positions ``0 .. num_items - 1``
    as chunks of at most :data:`DECODE_CHUNK` that tile every model batch of
    ``batch_size`` exactly (a batch of 512 is 8 chunks of 64, one of 100 is
    2 of 50).

    Args:
        num_items: how many items the dataset holds
        batch_size: positions per model batch
    """

    def __init__(self, num_items: int, batch_size: int):
        self.num_items = num_items
        self.batch_size = batch_size

    def _batches(self) -> Iterator[tuple]:
        for start in range(0, self.num_items, self.batch_size):
            stop = min(start + self.batch_size, self.num_items)
            yield start, stop, -(-(stop - start) // DECODE_CHUNK)

    def __iter__(self) -> Iterator[list]:
        for start, stop, parts in self._batches():
            size = stop - start
            for k in range(parts):
                yield list(range(start + size * k // parts, start + size * (k + 1) // parts))

    def __len__(self) -> int:
        return sum(parts for _, _, parts in self._batches())


def gather_chunks(loader: Any, batch_size: int, device: Any) -> Iterator[tuple]:
    """Merges consecutive loader chunks (see :class:`ChunkSampler`) into
    model batches of ``batch_size`` items, in order.

    Chunks are :func:`collate` (or :func:`collate_encoded`) tuples
    ``(indices, images, counts, failures)``; an item is counted once,
    embedded or failed. Decoded images are moved to a CUDA ``device`` chunk
    by chunk as they arrive (asynchronous copies from pinned memory) and
    concatenated there; encoded files (lists) are joined.

    Yields:
        ``(indices, images, counts, failures)`` per model batch
    """
    group, items = [], 0
    for chunk in loader:
        group.append(chunk)
        items += len(chunk[0]) + len(chunk[3])
        if items >= batch_size:
            yield _merge_chunks(group, device)
            group, items = [], 0
    if group:
        yield _merge_chunks(group, device)


def _merge_chunks(chunks: list, device: Any) -> tuple:
    import torch

    if len(chunks) == 1:
        return chunks[0]
    encoded = isinstance(chunks[0][1], list)  # files, not decoded images
    indices, counts, failures, images = [], [], [], []
    for chunk_indices, chunk_images, chunk_counts, chunk_failures in chunks:
        indices += chunk_indices
        counts += chunk_counts
        failures += chunk_failures
        if encoded:
            images += chunk_images
        elif chunk_images is not None:
            if device.type == "cuda":
                chunk_images = chunk_images.to(device, non_blocking=True)
            images.append(chunk_images)
    if encoded:
        return indices, images, counts, failures
    return indices, torch.cat(images) if images else None, counts, failures


def default_num_workers(device: Any) -> int:
    """Decoding workers: all spare cores on GPUs, one on small CPU hosts.

    On the CPU the model itself uses every core, so one worker overlapping
    decoding with inference is the sweet spot; GPUs are fed by as many
    workers as there are cores (capped at 16).
    """
    cores = usable_cores()
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return 1 if cores <= 4 else min(4, cores // 4)


# --- GPU JPEG decoding --------------------------------------------------------


class EncodedItems:
    """Image files as raw bytes, decoded later on the device.

    Workers only read files; :func:`decode_on_device` decodes whole batches
    with nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``) and
    resizes on the GPU, leaving the CPU almost idle. Files nvJPEG would get
    wrong (see :func:`dinoprop.models.images.needs_cpu_decode`: not JPEG,
    EXIF-rotated, too large) are decoded by the worker with PIL like the CPU
    path, and arrive already preprocessed.
    """

    def __init__(self, filepaths: Sequence[str], preprocessing: Preprocessing):
        self.filepaths = filepaths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, index: int):
        import io

        import torch

        try:
            with open(self.filepaths[index], "rb") as f:
                data = f.read()
            if needs_cpu_decode(data):
                image = open_image(io.BytesIO(data), self.preprocessing)
                return index, preprocess_image(image, self.preprocessing), None
            return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
        except Exception as e:  # reported per sample, never fatal here
            return index, None, describe_failure(e)


def collate_encoded(items: list) -> tuple:
    """Keeps encoded files as a list (they have different lengths)."""
    good = [(i, t) for i, t, e in items if e is None]
    failures = [(i, e) for i, _, e in items if e is not None]
    return [i for i, _ in good], [t for _, t in good], [1] * len(good), failures


#: The most values (images x channels x pixels) one resize call of
#: :func:`resize_crop_tensors` turns into float32 at once: 64 Mi values,
#: 256 MiB (78 photos of 400 x 711).
RESIZE_VALUES_PER_CALL = 1 << 26


def decode_on_device(
    indices: list, encoded: list, filepaths: Sequence[str], preprocessing: Preprocessing, device: Any
) -> tuple:
    """Decodes, resizes and crops a batch of encoded images on ``device``.

    JPEGs are decoded in one batched call and resized together, one call
    per group of equally sized images (:func:`resize_crop_tensors`); items
    the workers already decoded (``3 x S x S`` tensors) are only moved;
    anything the device decoder rejects (CMYK or corrupt JPEGs) falls back
    to PIL on the CPU, and images PIL cannot read either are reported as
    failures.

    Returns:
        ``(indices, B x 3 x S x S uint8 tensor or None, failures)``
    """
    raw = [data for data in encoded if data.dim() == 1]
    decoded = iter(_decode_jpegs(raw, device))
    kept, tensors, failures, to_resize = [], [], [], {}
    for index, data in zip(indices, encoded):
        try:
            if data.dim() == 3:  # decoded by the worker
                tensor = data.to(device)
            else:
                tensor = next(decoded)
                if tensor is None:  # rejected by the device decoder
                    pil = open_image(filepaths[index], preprocessing)
                    tensor = preprocess_image(pil, preprocessing).to(device)
                else:
                    check_image_size(tensor.shape[2], tensor.shape[1])
                    to_resize[len(tensors)] = tensor
        except Exception as e:  # reported per sample, never fatal here
            failures.append((index, describe_failure(e)))
            continue
        kept.append(index)
        tensors.append(tensor)
    for slot, tensor in zip(to_resize, resize_crop_tensors(list(to_resize.values()), preprocessing)):
        tensors[slot] = tensor
    if not tensors:
        return kept, None, failures
    import torch

    return kept, torch.stack(tensors), failures


def _decode_jpegs(encoded: list, device: Any) -> list:
    """nvJPEG-decoded ``3 x H x W`` tensors, None for each one it rejects."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
        return images


def resize_crop_tensors(images: list, preprocessing: Preprocessing) -> list:
    """DINOv2's resize + centre crop of ``3 x H x W`` uint8 tensors, in
    order: one interpolation call per group of images of the same size (at
    most :data:`RESIZE_VALUES_PER_CALL` values each), not one per image.

    Bicubic with antialiasing, like PIL; results match the CPU path within a
    few grey levels.

    Args:
        images: ``3 x H x W`` uint8 tensors on one device, of sizes
            :func:`dinoprop.models.images.check_image_size` accepts

    Returns:
        a ``3 x S x S`` uint8 tensor per image
    """
    import torch

    by_size = {}
    for position, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(position)
    out = [None] * len(images)
    for shape, positions in by_size.items():
        per_call = max(1, RESIZE_VALUES_PER_CALL // (shape[0] * shape[1] * shape[2]))
        for start in range(0, len(positions), per_call):
            group = positions[start : start + per_call]
            resized = _resize_crop(torch.stack([images[p] for p in group]), preprocessing)
            for position, tensor in zip(group, resized):
                out[position] = tensor
    return out


def _resize_crop(batch: Any, preprocessing: Preprocessing) -> Any:
    """Resizes and crops a ``B x 3 x H x W`` uint8 batch of one size."""
    import torch

    height, width = batch.shape[2:]
    short = preprocessing.resize_size
    if width <= height:
        size = (int(short * height / width), short)
    else:
        size = (short, int(short * width / height))
    resized = torch.nn.functional.interpolate(
        batch.float(), size=size, mode="bicubic", antialias=True, align_corners=False
    )
    crop = preprocessing.crop_size
    top = int((size[0] - crop) / 2)
    left = int((size[1] - crop) / 2)
    resized = resized[:, :, top : top + crop, left : left + crop]
    return resized.round_().clamp_(0, 255).to(torch.uint8)
