"""Headless Chromium for the `browser` tests (the system package; `make browser`). Required, not optional: a missing
Chromium fails the test with the command that installs it. Each browser runs in its own process group, killed
whole at the end (serve/viewer.py `open_chromium`, `close_chromium`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from brainrecon.errors import InputError
from brainrecon.serve import viewer
from brainrecon.serve.viewer import close_chromium

__all__ = ["close_chromium", "open_chromium", "run_chromium"]


def open_chromium(args: list[str], profile: Path) -> subprocess.Popen:
    """A headless Chromium left running (e.g. on a live page's URL); close it with close_chromium."""
    try:
        return viewer.open_chromium(args, profile)
    except InputError as e:
        pytest.fail(f"{e}: run `make browser` (apt-get install -y chromium)")


def run_chromium(args: list[str], profile: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """One headless run (--dump-dom, --screenshot) with a virtual time budget of 10 s: the page's timers and
    loads run to completion (virtual time waits for pending requests) before the dump."""
    proc = open_chromium(["--virtual-time-budget=10000", *args], profile)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        close_chromium(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
