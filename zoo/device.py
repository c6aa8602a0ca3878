"""The device layer: which torch device, its default dtype, its collective backend, how to synchronise.
(How graphs are compiled per device is data: zoo/compile_configs/<family>.<device>.toml.)

NPU support (torch_npu / torchair) is imported only when device "npu" is asked for.
"""
from __future__ import annotations

import os

import torch

SUPPORTED = ("cpu", "cuda", "npu")


class DeviceError(RuntimeError):
    pass


def resolve_device(name: str | torch.device) -> torch.device:
    kind = str(name).split(":")[0]
    if kind not in SUPPORTED:
        raise DeviceError(f"unsupported device {str(name)!r}; use one of {', '.join(SUPPORTED)}")
    if kind == "npu":
        _import_torch_npu()  # before torch.device(): torch only knows "npu" once torch_npu registered it
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for, but torch.cuda.is_available() is False "
                          f"(torch {torch.__version__})")
    return torch.device(name)


def _import_torch_npu() -> None:
    from zoo.backends.npu import import_npu  # its DeviceError says what to install

    import_npu()


def default_dtype(device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """The checkpoint's dtype, except float16 on CPU (slow there) -> bfloat16; float32 if unknown."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = table.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.bfloat16
    return dtype


COLLECTIVE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def collective_backend(device: torch.device) -> str:
    """torch.distributed backend for tensor parallelism / KV transfer on this device."""
    return COLLECTIVE_BACKENDS[device.type]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def default_cache_dir() -> str:
    return os.environ.get("ZOO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo"))
