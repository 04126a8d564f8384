"""A hand-made miniature NSD folder, independent of the simulator, for reader tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from brainrecon.data import layout

AFFINE = np.diag([1.8, 1.8, 1.8, 1.0]) + np.array(
    [[0, 0, 0, -70], [0, 0, 0, -90], [0, 0, 0, -60], [0, 0, 0, 0]]
)


@dataclass
class Fixture:
    root: Path
    grid: tuple[int, int, int]
    mask: np.ndarray  # (X, Y, Z) int16 in {-1, 0, 1}
    betas: list[np.ndarray]  # per session (X, Y, Z, T) int16
    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    images: np.ndarray  # (N, S, S, 3) uint8


def make_fixture(
    root: Path,
    n_sessions: int = 3,
    trials: int = 12,
    n_shared: int = 2,
    n_train: int = 8,
    grid: tuple[int, int, int] = (5, 6, 4),
    n_stimuli: int = 14,
    size: int = 16,
    seed: int = 0,
) -> Fixture:
    rng = np.random.default_rng(seed)
    total = n_sessions * trials
    # Subject's image list: shared first (NSD convention), then train images; ids 1-based into the stimuli.
    perm = rng.permutation(n_stimuli) + 1
    subjectim = np.stack([np.roll(perm, k)[: n_shared + n_train] for k in range(8)])
    sharedix = subjectim[0, :n_shared].copy()
    subjectim[:, :n_shared] = sharedix
    order = np.concatenate(
        [np.repeat(np.arange(1, n_shared + 1), 3), rng.integers(n_shared + 1, n_shared + n_train + 1, total)]
    )
    masterordering = rng.permutation(order[:total] if len(order) >= total else order)[:total]
    mask = np.full(grid, -1, dtype=np.int16)
    mask[1:-1, 1:-1, :] = 0
    mask[1:-1, 2:-1, 1:-1] = 1
    betas = [rng.normal(0, 600, size=(*grid, trials)).round().astype(np.int16) for _ in range(n_sessions)]
    images = rng.integers(0, 256, size=(n_stimuli, size, size, 3), dtype=np.uint8)

    layout.expdesign_path(root).parent.mkdir(parents=True)
    scipy.io.savemat(
        layout.expdesign_path(root),
        {"masterordering": masterordering[None], "subjectim": subjectim, "sharedix": sharedix[None]},
    )
    layout.mask_path(root, 1).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, AFFINE), layout.mask_path(root, 1))
    layout.betas_dir(root, 1).mkdir(parents=True)
    for s, b in enumerate(betas, start=1):
        nib.save(nib.Nifti1Image(b, AFFINE), layout.session_path(root, 1, s))
    layout.stimuli_path(root).parent.mkdir(parents=True)
    with h5py.File(layout.stimuli_path(root), "w") as f:
        f.create_dataset("imgBrick", data=images)
    layout.captions_path(root).write_text(
        json.dumps({str(i): [f"image {i} caption {k}" for k in range(5)] for i in range(n_stimuli)})
    )
    return Fixture(root, grid, mask, betas, masterordering, subjectim, sharedix, images)
