"""The torch device of a training or reference command (`--device cpu|cuda`): a missing CUDA is a one-line error,
never a silent CPU run."""

from __future__ import annotations

import torch

from brainrecon.choices import TORCH_DEVICES
from brainrecon.errors import BrainReconError


class DeviceError(BrainReconError):
    """The requested torch device is not available here."""


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` ("cpu", "cuda" or "cuda:N") as a torch.device, after checking that it exists."""
    device = torch.device(name) if isinstance(name, str) and name.split(":")[0] in TORCH_DEVICES else None
    if device is None and isinstance(name, torch.device):
        device = name
    if device is None or device.type not in TORCH_DEVICES:
        raise DeviceError(f"--device: expected one of {', '.join(TORCH_DEVICES)} (or cuda:N), found {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"--device {name}: expected a CUDA GPU, found none (torch {torch.__version__} is {built}; "
                "torch.cuda.is_available() is False)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: expected a GPU index below {torch.cuda.device_count()}, found {device.index}"
            )
    return device
