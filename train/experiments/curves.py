"""Training curves of the foundation models: the per-step losses a `recon-train foundation` checkpoint keeps
(`checkpoint/state.json`, `history`), smoothed and drawn, so a shipped model comes with how it was trained.

`recon-eval curves --run vae=data/vae-small --run unet=data/unet-small --out benchmarks/results/foundations`
writes training.json (per run: its settings, steps and the windowed means of every logged term) and
training_curves.png (one panel per run, log-scale loss against the step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainrecon.errors import ConfigError, InputError
from brainrecon.io import read_json, write_json
from brainrecon.train.experiments.plots import pyplot, save_figure

STATE = Path("checkpoint") / "state.json"
NOT_PLOTTED = ("dropped",)  # logged per step but not a loss: the UNet's share of CFG-dropped contexts


def run_curves(folder: str | Path, window: int = 50) -> dict:
    """{"train": the run's settings, "steps", "window", "curves": term -> windowed means, "step": their end
    steps} from `folder`/checkpoint/state.json (the output folder of a recon-train foundation command)."""
    path = Path(folder) / STATE
    state = read_json(path, "a recon-train foundation checkpoint state")
    history = state.get("history")
    if not isinstance(history, list) or not history or not all(isinstance(h, dict) for h in history):
        found = type(history).__name__ if not isinstance(history, list) else f"{len(history)} entries"
        raise InputError(f"{path}: history", "a non-empty list of per-step loss records", found)
    if window < 1:
        raise ConfigError(f"run_curves: expected window >= 1, found {window}")
    ends = list(range(window, len(history) + 1, window)) or [len(history)]
    curves = {
        term: [
            round(float(np.mean([h[term] for h in history[e - window : e] if term in h])), 5) for e in ends
        ]
        for term in history[0]
    }
    return {
        "train": state.get("train", {}),
        "steps": len(history),
        "window": window,
        "step": ends,
        "curves": curves,
    }


def training_curves(runs: dict[str, str | Path], out: str | Path, window: int = 50) -> dict:
    """`run_curves` of each labelled run -> out/training.json and out/training_curves.png; returns the JSON."""
    if not runs:
        raise ConfigError("training_curves: expected at least one run (label=folder)")
    result = {
        "runs": {
            label: {"folder": str(folder), **run_curves(folder, window)} for label, folder in runs.items()
        }
    }
    out = Path(out)
    write_json(out / "training.json", result)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 3.6), squeeze=False)
    for ax, (label, run) in zip(axes[0], result["runs"].items(), strict=True):
        for term, values in run["curves"].items():
            if term not in NOT_PLOTTED:
                ax.plot(run["step"], values, label=term)
        t = run["train"]
        ax.set_title(
            f"{label}: {run['steps']} steps, batch {t.get('batch_size', '?')}, lr {t.get('lr', '?')}",
            fontsize=9,
        )
        ax.set_xlabel(f"step (mean over {window})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    save_figure(fig, out / "training_curves.png")
    return result
