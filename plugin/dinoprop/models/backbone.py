"""The loaded backbone: :class:`EmbeddingModel` maps uint8 image batches to
pooled float32 vectors."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dinoprop.core import DinopropError
from dinoprop.models.preprocessing import Preprocessing

#: Supported ways of pooling a ViT's tokens into one vector.
POOLINGS = ("cls", "mean", "cls+mean")

#: Model kinds whose output is a class (or pooled) token and patch tokens.
TOKEN_KINDS = ("vit", "convnext")


@dataclass
class EmbeddingModel:
    """A loaded backbone on a device, mapping image batches to vectors.

    Attributes:
        name: the name the model was loaded by
        module: the underlying ``torch.nn.Module``
        kind: ``"vit"`` (class token, registers, then patch tokens),
            ``"convnext"`` (DINOv3 ConvNeXt: a pooled token, then its
            stride-32 tokens) or ``"cnn"`` (feature maps)
        device: the ``torch.device`` the model runs on
        dtype: the compute dtype (see :func:`compute_dtype`)
        hidden_dim: the width of one token or feature-map channel
        patch_size: the ViT patch size in pixels (CNN: its total stride)
        num_prefix_tokens: class (or pooled) + register tokens before the
            patch tokens
        preprocessing: the :class:`Preprocessing` the model expects
        fingerprint: a short hash identifying the weights and architecture
    """

    name: str
    module: Any
    kind: str
    device: Any
    dtype: Any
    hidden_dim: int
    patch_size: int
    num_prefix_tokens: int
    preprocessing: Preprocessing
    fingerprint: str
    _scale: Any = field(default=None, repr=False)
    _shift: Any = field(default=None, repr=False)

    @property
    def has_tokens(self) -> bool:
        """Whether the model outputs a class (or pooled) token and patch
        tokens, which every pooling of :data:`POOLINGS` applies to."""
        return self.kind in TOKEN_KINDS

    def output_dim(self, pooling: str = "cls") -> int:
        """The length of the vectors :meth:`embed` returns for ``pooling``."""
        check_pooling(pooling)
        if self.has_tokens and pooling == "cls+mean":
            return 2 * self.hidden_dim
        return self.hidden_dim

    def effective_pooling(self, pooling: str) -> str:
        """The pooling actually applied: CNNs always average their map."""
        check_pooling(pooling)
        return pooling if self.has_tokens else "mean"

    def embed(
        self,
        images: Any,
        pooling: str = "cls",
        normalize: bool = True,
        flip_average: bool = False,
    ) -> np.ndarray:
        """Embeds a batch of preprocessed images.

        Args:
            images: a ``B x 3 x H x W`` uint8 tensor (see
                :func:`preprocess_image`), on any device
            pooling: ``"cls"`` (the class token; a DINOv3 ConvNeXt's pooled
                token), ``"mean"`` (of the patch tokens, registers left
                out) or ``"cls+mean"`` (their concatenation, DINOv2's
                linear-probe feature); CNNs always use global average
                pooling
            normalize: whether to scale every vector to unit L2 norm
            flip_average: whether each vector is the mean of the image's
                and its mirror image's (test-time augmentation: twice the
                model compute, one forward pass of ``2B`` images)

        Returns:
            a ``B x output_dim(pooling)`` float32 numpy array
        """
        import torch

        pooling = self.effective_pooling(pooling)
        with torch.inference_mode():
            if flip_average:  # mirrored on the device: one transfer
                images = images.to(self.device, non_blocking=True)
                images = torch.cat([images, images.flip(-1)])
            features = self._pool(self.forward_features(images), pooling)
            features = features.float()
            if flip_average:
                features = features.view(2, -1, features.shape[1]).mean(0)
            if normalize:
                features = torch.nn.functional.normalize(features, dim=1)
            return features.cpu().numpy()

    def forward_features(self, images: Any) -> Any:
        """Runs the backbone on uint8 images.

        Returns:
            ``B x T x D`` tokens (ViT) or a ``B x C x h x w`` map (CNN)
        """
        import torch

        x = images.to(self.device, non_blocking=True)
        if self._scale is None:
            mean = torch.tensor(self.preprocessing.mean, device=self.device)
            std = torch.tensor(self.preprocessing.std, device=self.device)
            self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
            self._shift = (-mean / std).view(1, 3, 1, 1)
        x = x.float() * self._scale + self._shift
        if self.device.type == "cpu" and self.dtype != torch.float32:
            precision = torch.autocast("cpu", dtype=self.dtype)  # fp32 weights
        else:
            x, precision = x.to(self.dtype), contextlib.nullcontext()
        with torch.inference_mode(), precision:
            if getattr(self.module, "config", None) is None:  # efficientnet
                return self.module.extract_features(x)
            return self.module(pixel_values=x).last_hidden_state

    def default_batch_size(self) -> int:
        """Images per forward pass: 16 on CPUs; on GPUs as many as half the
        memory left free by the loaded weights holds (8 to 512, a power of 2).

        One image needs about one layer's activations at a time (inference
        frees them layer by layer): see :meth:`activation_bytes_per_image`.
        """
        if self.device.type != "cuda":
            return 16
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        fits = int(0.5 * free_bytes / self.activation_bytes_per_image())
        return min(512, max(8, 2 ** max(0, fits.bit_length() - 1)))

    def activation_bytes_per_image(self) -> int:
        """About the peak activation memory one image needs in a forward pass.

        ViTs: the tokens times the residual stream, its norm, q/k/v and the
        attention output (6 widths) plus the MLP's hidden units (2 of
        them), plus one head's worth of attention scores per head. CNNs:
        the same estimate on their final feature map, a lower bound.
        """
        import torch

        config = getattr(self.module, "config", None)
        width = self.hidden_dim
        mlp = getattr(config, "intermediate_size", None) or 4 * width
        heads = getattr(config, "num_attention_heads", None) or 1
        side = self.preprocessing.crop_size // self.patch_size
        tokens = side * side + self.num_prefix_tokens
        element = torch.empty((), dtype=self.dtype).element_size()
        return element * (tokens * (6 * width + 2 * int(mlp)) + heads * tokens * tokens)

    def patch_tokens(self, images: Any) -> Any:
        """The patch tokens of a batch, on their grid.

        Args:
            images: a ``B x 3 x H x W`` uint8 tensor (see
                :func:`preprocess_image`), on any device

        Returns:
            a ``B x h x w x D`` float32 tensor on the model's device, with
            ``h = H // patch_size`` and ``w = W // patch_size``; token ``[i,
            j]`` covers the pixels ``[i * patch_size, (i + 1) * patch_size)``
            down and ``[j * patch_size, ...)`` across (row-major, class and
            register tokens left out)
        """
        import torch

        with torch.inference_mode():
            features = self.forward_features(images)
            if features.dim() == 4:  # CNN feature map
                return features.permute(0, 2, 3, 1).float()
            rows = images.shape[-2] // self.patch_size
            cols = images.shape[-1] // self.patch_size
            patches = features[:, self.num_prefix_tokens :]
            return patches.reshape(len(patches), rows, cols, -1).float()

    def embed_boxes(
        self,
        images: Any,
        boxes: Sequence[Sequence[Sequence[float]]],
        normalize: bool = True,
        flip_average: bool = False,
    ) -> np.ndarray:
        """Embeds boxes from one forward pass per image: each box's vector is
        the mean of the patch tokens whose centres lie inside it (a box
        smaller than a patch takes the patch nearest its centre).

        Args:
            images: a ``B x 3 x H x W`` uint8 tensor of whole images
            boxes: per image, its relative ``[x, y, w, h]`` boxes (in the
                coordinates of ``images``)
            normalize: whether to scale every vector to unit L2 norm
            flip_average: whether each box's vector averages the image's
                tokens and its mirror image's (mirrored back into place)

        Returns:
            a ``sum(len(b) for b in boxes) x hidden_dim`` float32 array, the
            boxes of each image one after another
        """
        import torch

        if flip_average:
            both = self.patch_tokens(torch.cat([images, images.flip(-1)]))
            grid = (both[: len(images)] + both[len(images) :].flip(2)) / 2
        else:
            grid = self.patch_tokens(images)
        rows, cols = grid.shape[1:3]
        vectors = [
            grid[i, top:bottom, left:right].mean((0, 1))
            for i, image_boxes in enumerate(boxes)
            for left, right, top, bottom in (_token_span(b, rows, cols) for b in image_boxes)
        ]
        if not vectors:
            return np.zeros((0, self.hidden_dim), dtype=np.float32)
        stacked = torch.stack(vectors)
        if normalize:
            stacked = torch.nn.functional.normalize(stacked, dim=1)
        return stacked.cpu().numpy()

    def _pool(self, features: Any, pooling: str) -> Any:
        import torch

        if features.dim() == 4:
            return features.mean((2, 3))
        patch_mean = features[:, self.num_prefix_tokens :].mean(1)
        if pooling == "mean":
            return patch_mean
        if pooling == "cls+mean":
            return torch.cat([features[:, 0], patch_mean], dim=1)
        return features[:, 0]


def _token_span(box: Sequence[float], rows: int, cols: int) -> tuple:
    """``(left, right, top, bottom)`` slice bounds of the tokens whose
    centres lie in a relative ``[x, y, w, h]`` box; the token nearest the
    box's centre when none does."""
    x, y, w, h = box
    left, right = _axis_span(x, w, cols)
    top, bottom = _axis_span(y, h, rows)
    return left, right, top, bottom


def _axis_span(start: float, length: float, count: int) -> tuple:
    # token k's centre is at (k + 0.5) / count
    first = max(0, math.ceil(start * count - 0.5))
    last = min(count - 1, math.floor((start + length) * count - 0.5))
    if first > last:
        first = last = min(count - 1, max(0, math.floor((start + length / 2) * count)))
    return first, last + 1


def check_pooling(pooling: str) -> None:
    """Raises a DinopropError unless ``pooling`` is one of :data:`POOLINGS`."""
    if pooling not in POOLINGS:
        raise DinopropError(
            "Unknown pooling %r; choose one of %s" % (pooling, list(POOLINGS))
        )


def model_summary(model: EmbeddingModel) -> dict:
    """JSON-friendly facts about a loaded model (recorded with runs)."""
    return {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "kind": model.kind,
        "hidden_dim": model.hidden_dim,
        "patch_size": model.patch_size,
        "image_size": model.preprocessing.crop_size,
        "resize_size": model.preprocessing.resize_size,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }
