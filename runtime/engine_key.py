"""What a TensorRT engine was built for, and whether it may run here. Pure functions; no TensorRT import.

An engine runs only on the TensorRT version and GPU (compute capability) it was built with (facts §5), and it
is only valid for the exact ONNX bytes, precision and shape profile it was built from. The key holds all six;
the manifest records it beside the engine file, and `check_engine_key` compares it with this machine before
anything is deserialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainReconError

ProfileEntry = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (input, min, opt, max shape)


class EngineMismatchError(BrainReconError):
    """An engine built for another machine, TensorRT version, ONNX file, precision or profile."""


@dataclass(frozen=True)
class MachineInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    precision: str
    profile: tuple[ProfileEntry, ...]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def for_machine(
        cls, onnx_sha256: str, precision: str, profile: dict[str, Any], machine: MachineInfo
    ) -> EngineKey:
        return cls(
            onnx_sha256=onnx_sha256,
            precision=precision,
            profile=profile_tuple(profile),
            tensorrt_version=machine.tensorrt_version,
            gpu_name=machine.gpu_name,
            compute_capability=machine.compute_capability,
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON; engine file names carry its first 12 characters."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["profile"] = [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise EngineMismatchError(f"engine key: expected keys {sorted(names)}, found {sorted(data)}")
        profile = tuple((str(n), tuple(lo), tuple(opt), tuple(hi)) for n, lo, opt, hi in data["profile"])
        return cls(**{**data, "profile": profile})


def profile_tuple(profile: dict[str, Any]) -> tuple[ProfileEntry, ...]:
    """{input: {"min": [..], "opt": [..], "max": [..]}} -> sorted hashable tuple."""
    return tuple(
        (
            name,
            tuple(int(v) for v in s["min"]),
            tuple(int(v) for v in s["opt"]),
            tuple(int(v) for v in s["max"]),
        )
        for name, s in sorted(profile.items())
    )


def key_mismatches(recorded: EngineKey, expected: EngineKey) -> list[str]:
    """Human-readable differences, field by field ("compute capability: engine 8.0, this machine 9.0")."""
    labels = {
        "onnx_sha256": ("ONNX sha256", "manifest ONNX"),
        "precision": ("precision", "requested"),
        "profile": ("shape profile", "contract"),
        "tensorrt_version": ("TensorRT", "this machine"),
        "gpu_name": ("GPU", "this machine"),
        "compute_capability": ("compute capability", "this machine"),
    }
    out = []
    for f, (label, here) in labels.items():
        a, b = getattr(recorded, f), getattr(expected, f)
        if a != b:
            if f == "onnx_sha256":
                a, b = a[:12] + "…", b[:12] + "…"
            out.append(f"{label}: engine {a}, {here} {b}")
    return out


def check_engine_key(
    recorded: EngineKey, expected: EngineKey, engine_path: str | Path, model_dir: str | Path
) -> None:
    """Raise a one-line EngineMismatchError naming every mismatched field and how to rebuild."""
    problems = key_mismatches(recorded, expected)
    if problems:
        raise EngineMismatchError(
            f"{engine_path}: engine built for another target ({'; '.join(problems)}); rebuild it on this machine "
            f"with: recon-export --model-dir {model_dir} --stage all"
        )


def select_engine(candidates: list[Any], expected: EngineKey, model_dir: str | Path) -> Any:
    """Among manifest engine entries (objects with `.path` and `.engine_key`), the one built for `expected`;
    none matching raises the mismatch of the first, which names what differs."""
    if not candidates:
        raise EngineMismatchError(
            f"{model_dir}: no TensorRT engine recorded; build one with: recon-export --model-dir {model_dir} --stage all"
        )
    for candidate in candidates:
        if candidate.engine_key and EngineKey.from_dict(candidate.engine_key) == expected:
            return candidate
    first = candidates[0]
    check_engine_key(
        EngineKey.from_dict(first.engine_key or {}), expected, Path(model_dir) / first.path, model_dir
    )
    raise EngineMismatchError(
        f"{Path(model_dir) / first.path}: engine key differs from this machine's"
    )  # unreachable
