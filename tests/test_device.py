import importlib.util

import pytest

import zoo
from zoo.device import DeviceError, resolve_device


def test_unknown_device_is_named():
    with pytest.raises(DeviceError, match=r"unsupported device 'xpu'"):
        resolve_device("xpu")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_without_torch_npu_says_what_to_install(checkpoint):
    with pytest.raises(DeviceError, match=r"device 'npu': importing torch_npu failed .*CANN toolkit.*pip install torch-npu==2\.13\.0"):
        zoo.load(checkpoint("llama2"), device="npu")


def test_unknown_dtype_is_named(checkpoint):
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'"):
        zoo.load(checkpoint("llama2"), dtype="int4")


def test_collective_backend_per_device():
    import torch

    from zoo.device import collective_backend

    assert [collective_backend(torch.device(d)) for d in ("cpu", "cuda")] == ["gloo", "nccl"]
