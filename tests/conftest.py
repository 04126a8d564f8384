"""GPU and TensorRT tests skip cleanly where there is no GPU or no TensorRT."""

from __future__ import annotations

import importlib.util

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    trt = cuda and importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))
