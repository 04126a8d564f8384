"""Resumable training checkpoints, shared by train/foundations/vdvae_train.py and train/foundations/ldm_train.py.

    out_dir/checkpoint/model.safetensors       trained weights (state_dict)
    out_dir/checkpoint/ema.safetensors         EMA weights (absent when the trainer keeps no EMA)
    out_dir/checkpoint/optimizer.safetensors   optimizer state, flat: "<param index>.<name>" -> 1-d tensor
    out_dir/checkpoint/state.json              step, model and training configs, data sha256,
                                               optimizer param groups, loss history of every step so far

The folder is written whole under a temporary name and then swapped in (`atomic_dir`), so a crash during a
save leaves the previous checkpoint intact, never weights of one step beside the state of another. A resume
must use the same training settings (only `steps` may change) and the same data, checked by sha256.

Tensors are written from the CPU whatever device trained them, so a checkpoint made on a GPU resumes on the CPU
and back: `load_checkpoint` copies the weights into the model where it is, and the optimizer moves its state to
its parameters' device (torch.optim.Optimizer.load_state_dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from brainrecon.config import changed_fields, config_from_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.io import atomic_dir, read_json, write_json

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"


def resume_state(ckpt_dir: Path, resume: bool, what: str) -> dict[str, Any] | None:
    """state.json of the checkpoint in `ckpt_dir`, or None if there is none; one without `resume` is an error
    (nothing is overwritten by accident)."""
    if not (ckpt_dir / STATE_FILE).is_file():
        return None
    if not resume:
        raise InputError(ckpt_dir, "no checkpoint (or resume=True to continue it)", "an existing checkpoint")
    return read_json(ckpt_dir / STATE_FILE, what)


def save_checkpoint(
    ckpt_dir: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    configs: dict[str, Any],  # JSON-able, e.g. {"config": ..., "train": ...}
    data_sha256: str,
    history: list[dict[str, float]],  # one entry per step from 0 to `step`
) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    opt_tensors = {
        f"{idx}.{name}": torch.as_tensor(value).detach().cpu().clone().reshape(-1)
        for idx, state in sd["state"].items()
        for name, value in state.items()
    }
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_weights(ema), str(tmp / "ema.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(
            tmp / STATE_FILE,
            {
                "step": step,
                **configs,
                "data_sha256": data_sha256,
                "optimizer_param_groups": sd["param_groups"],
                "history": history,
            },
        )


def load_checkpoint(
    ckpt_dir: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    *,
    train_cfg: Any,  # the trainer's frozen config dataclass, saved under "train"
    data_sha256: str,
    data_name: str,  # what the data is called in the mismatch error: "images", "data"
    where: Path,  # what the settings error names
) -> tuple[int, list[dict[str, float]]]:
    """Check the settings and data against `state`, then load weights and optimizer state in place.

    Returns the saved step and the history of the steps before it.
    """
    from safetensors.torch import load_file

    saved = config_from_dict(type(train_cfg), state["train"], source=str(ckpt_dir / STATE_FILE))
    changed = changed_fields(saved, train_cfg, ignore=("steps",))
    if changed:
        raise ConfigError(
            f"{where}: resume with the saved training settings; these differ: {', '.join(changed)}"
        )
    if state["data_sha256"] != data_sha256:
        raise InputError(
            ckpt_dir,
            f"the {data_name} the checkpoint was trained on",
            f"different {data_name} (sha256 mismatch)",
        )
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")), strict=True)
    if ema is not None:
        ema.load_state_dict(load_file(str(ckpt_dir / "ema.safetensors")), strict=True)
    reference = dict(enumerate(model.parameters()))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(ckpt_dir / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        shape = () if name == "step" else reference[int(idx)].shape  # AdamW keeps `step` as a 0-d tensor
        per_param.setdefault(int(idx), {})[name] = value.reshape(shape)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    step = int(state["step"])
    return step, list(state["history"])[:step]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
