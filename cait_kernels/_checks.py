"""Input checks shared by the ops: each raises a clear error before any work is done."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise unless ``t`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Raise unless ``t.shape == expected``; ``meaning`` spells the expected shape in symbols."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor lives on the same device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Raise unless ``value`` is a Python int with ``low <= value`` (and ``<= high`` if given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def values_checkable() -> bool:
    """Whether checks may read tensor values (a host sync). Not while ``torch.compile`` traces or a
    CUDA graph captures: those runs rely on the same inputs having passed the checks in eager mode."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (torch.compiler.is_compiling() or capturing)


def check_index_range(name: str, t: torch.Tensor, upper: int, meaning: str) -> None:
    """Raise unless every value of the integer tensor ``t`` lies in ``[0, upper)`` (when values are checkable)."""
    if not t.numel() or not values_checkable():
        return
    low, high = (int(v) for v in torch.aminmax(t))
    if low < 0 or high >= upper:
        raise ValueError(f"{name} values must lie in [0, {meaning}) = [0, {upper}), got min {low} and max {high}")
