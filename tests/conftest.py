"""What every test shares: the tiny subjects as session fixtures (built by tests/fixtures.py), torch's global
settings restored after each test and file, and the markers' effects (TensorRT tests skip cleanly where there is
no GPU or no TensorRT; the markers themselves are listed in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import sys
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


def _torch_globals() -> tuple | None:
    """torch's process-wide settings that choose kernels or change results; None while torch is not imported
    (the torch-free tests never import it here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
    )


def _restore_torch_globals(before: tuple | None) -> None:
    torch = sys.modules.get("torch")
    if before is None or torch is None or _torch_globals() == before:
        return
    threads, deterministic, warn_only, matmul_precision, dtype, grad = before
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_float32_matmul_precision(matmul_precision)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.fixture(autouse=True, scope="module")
def _torch_globals_per_module():
    """Whatever a test file sets globally (a module fixture's `torch.set_num_threads(1)`) ends with the file.

    The thread count picks the kernel: with one thread a 1x1 convolution on a small batch runs ATen's own
    im2col + MKL sgemm instead of oneDNN, and MKL's summation order there depends on the operands' alignment
    (MKL's "Conditional Numerical Reproducibility" notes), so a count leaked from an earlier file changed
    tests/test_vdvae.py's results in the full run only (AMD EPYC, torch 2.13)."""
    before = _torch_globals()
    yield
    _restore_torch_globals(before)


@pytest.fixture(autouse=True)
def _torch_globals_per_test():
    """Each test starts with the settings its file's fixtures chose, whatever the tests before it set."""
    before = _torch_globals()
    yield
    _restore_torch_globals(before)


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if "trt" in item.keywords]
    ready, reason = _tensorrt_ready() if marked else (True, "")
    for item in marked:
        if not ready:
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a CUDA GPU: {reason}"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny stage-1 subject (tests/fixtures.py build_tiny_stage1): "sim", "prep", "vdvae" and the exported
    model dirs "gru" and "ridge", built once per test session and shared; tests that change a model folder copy it
    first."""
    from tests.fixtures import build_tiny_stage1

    return build_tiny_stage1(tmp_path_factory.getbasetemp() / "tiny-stage1")


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory) -> dict[str, Path]:
    """The tiny two-stage subject (tests/fixtures.py build_tiny_stage2): "prep", "unet", and "model", its exported
    copy (both precisions), built once per test session and shared; tests that change a model folder copy it
    first."""
    from tests.fixtures import build_tiny_stage2, export_tiny_stage2

    root = tmp_path_factory.getbasetemp() / "tiny-stage2"
    return {**build_tiny_stage2(root), "model": export_tiny_stage2(root)}


@pytest.fixture(scope="module")
def betas(tiny2) -> np.ndarray:
    return np.load(tiny2["prep"] / "test_betas.npy")  # (10, V) z-scored test betas of the tiny subject
