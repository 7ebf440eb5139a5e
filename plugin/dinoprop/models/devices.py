"""Where models run and in which precision: devices and compute dtypes."""

from __future__ import annotations

from typing import Any

from dinoprop.core import DinopropError


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
