"""TensorRT tests skip cleanly where there is no GPU or no TensorRT."""

from __future__ import annotations

import importlib.util

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def one_thread():
    """Tiny torch models run several times faster on one thread (no fork/join per op on shared cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    trt = cuda and importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "trt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))
