"""TensorRT tests skip cleanly where there is no GPU or no TensorRT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _tensorrt_ready() -> tuple[bool, str]:
    """TensorRT importable and a CUDA GPU visible to its runtime bindings (cuda-python), whatever torch is
    installed: a GPU machine with a CPU-only torch still runs the TensorRT tests."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed"
    from brainrecon.runtime.backends.tensorrt import tensorrt_status

    return tensorrt_status()


@pytest.fixture
def one_thread():
    """Tiny torch models run several times faster on one thread (no fork/join per op on shared cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if "trt" in item.keywords]
    ready, reason = _tensorrt_ready() if marked else (True, "")
    for item in marked:
        if not ready:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a CUDA GPU: {reason}"))


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory) -> dict[str, Path]:
    """The tiny two-stage subject (tests/stage2_fixture.py): "prep", "unet", and "model", its exported copy (both
    precisions), built once per test session and shared; tests that change a model folder copy it first."""
    from tests.stage2_fixture import build_tiny_stage2, export_tiny_stage2

    root = tmp_path_factory.getbasetemp() / "tiny-stage2"
    return {**build_tiny_stage2(root), "model": export_tiny_stage2(root)}


@pytest.fixture(scope="module")
def betas(tiny2) -> np.ndarray:
    return np.load(tiny2["prep"] / "test_betas.npy")  # (10, V) z-scored test betas of the tiny subject
