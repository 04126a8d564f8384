"""Typed errors. Every message is one line that names the file (or input), what was expected and what was found."""

from __future__ import annotations

from pathlib import Path


class BrainReconError(Exception):
    """Base class: the CLI prints `error: <message>` and exits 1."""


class MissingFileError(BrainReconError):
    def __init__(self, path: str | Path, what: str, hint: str = ""):
        msg = f"{path}: missing {what}"
        super().__init__(f"{msg} ({hint})" if hint else msg)


class InputError(BrainReconError):
    """Bad data: wrong shape, dtype, NaN/Inf, out-of-range indices, inconsistent files."""

    def __init__(self, source: str | Path, expected: str, found: str):
        super().__init__(f"{source}: expected {expected}, found {found}")


class ConfigError(BrainReconError):
    """Bad configuration: unknown keys, wrong types, impossible values."""
