"""Experiment plots (matplotlib, Agg backend, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

from brainrecon.io import atomic_path

METRIC_LABELS = {"pixcorr": "PixCorr ↑", "ssim": "SSIM ↑", "clip_2way": "CLIP 2-way ↑"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
