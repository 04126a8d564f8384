"""tests/conftest.py gives each test torch's global settings as its file's fixtures left them: a thread count set by
one test does not reach the next (with one thread tests/test_vdvae.py's reload ran other kernels, so it passed alone
and failed in the full run)."""

from __future__ import annotations

import torch

THREADS = torch.get_num_threads()  # at collection, before any test ran


def test_a_test_that_changes_torch_globals():
    torch.set_num_threads(2 if THREADS == 1 else 1)
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)


def test_the_next_test_starts_with_them_restored():
    assert torch.get_num_threads() == THREADS
    assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
