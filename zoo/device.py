"""The device layer: which torch device, its default dtype, its collective backend, how to synchronise.
(How graphs are compiled per device is data: zoo/graphs/configs/<stem>.<device>.toml.)

NPU support (torch_npu / torchair) is imported only when device "npu" is asked for.
"""
from __future__ import annotations

import importlib
import os
import types

import torch

from zoo.config import DTYPE_ALIASES, DTYPE_NAMES
from zoo.errors import DeviceError

SUPPORTED = ("cpu", "cuda", "npu")


def resolve_device(name: str | torch.device) -> torch.device:
    kind = str(name).split(":")[0]
    if kind not in SUPPORTED:
        raise DeviceError(f"unsupported device {str(name)!r}; use one of {', '.join(SUPPORTED)}")
    if kind == "npu":
        import_npu()  # before torch.device(): torch only knows "npu" once torch_npu registered it
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for, but torch.cuda.is_available() is False "
                          f"(torch {torch.__version__})")
    return torch.device(name)




# dtype names users and files write (zoo.config.DTYPE_NAMES, aliases included) -> torch dtypes
DTYPES = {**{name: getattr(torch, name) for name in DTYPE_NAMES},
          **{alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name ("bfloat16", "bf16", "torch.bfloat16", ...) or a torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def default_dtype(device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """The checkpoint's dtype, except float16 on CPU (slow there) -> bfloat16; float32 if unknown."""
    dtype = DTYPES.get(str(checkpoint_dtype).removeprefix("torch."), torch.float32)
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


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on the device (host RAM for cpu); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]  # torch_npu is imported by then
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def default_cache_dir() -> str:
    return os.environ.get("ZOO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zoo"))


# ---- Ascend: the vendor imports, only when device "npu" is asked for -------------------------
def _install_hint() -> str:
    release = torch.__version__.split("+")[0]
    return (
        "To run on Ascend: (1) install the Ascend driver/firmware and the CANN toolkit, and load its "
        "environment in this shell (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`, or set_env.sh "
        f"under your CANN install); (2) `pip install torch-npu=={release}`, pinned to the installed torch "
        f"{torch.__version__} (an unpinned torch-npu pulls a different torch), choosing the build whose release "
        "notes match your CANN version; (3) torchair, which ships inside torch-npu (Ascend Extension for "
        "PyTorch) - build it from https://gitcode.com/Ascend/torchair only if your torch-npu lacks it."
    )


def import_vendor(name: str):
    """Import a vendor module, turning every known failure into a DeviceError that says what to do."""
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError, OSError) as e:
        text = str(e)
        msg = f"device 'npu': importing {name} failed ({type(e).__name__}: {text}). {_install_hint()}"
        if isinstance(e, RuntimeError) and ("TORCH_DEVICE_BACKEND_AUTOLOAD" in text or "backend extension" in text):
            msg += (
                " torch tried to auto-load the torch_npu backend and could not (often CANN libraries such as "
                "libhccl.so are not found because set_env.sh was not sourced). Fix the install, or set "
                "TORCH_DEVICE_BACKEND_AUTOLOAD=0 to keep torch usable without it."
            )
        raise DeviceError(msg) from e


def import_npu() -> tuple[types.ModuleType, types.ModuleType]:
    """(torch_npu, torchair), imported now; DeviceError naming what to install if either fails.

    torch_npu is imported first: it registers the "npu" device with torch, and the TorchAir guide
    (torchair_00005, "安装") requires `import torch_npu` before `import torchair`.
    """
    torch_npu = import_vendor("torch_npu")
    torchair = import_vendor("torchair")
    return torch_npu, torchair
