"""Betas into the runtime: the check every run's betas pass once (`check_betas`), and, for `recon-infer`, z-scored
`.npy` rows or raw NIfTI / NSD-style HDF5 sessions preprocessed exactly as `recon-prepare` did (the recorded
`preprocess.json`, `mask_indices.npy`, `voxel_mean.npy`, `voxel_std.npy` of the model directory, hash-verified
through the manifest). Torch-free; nibabel and h5py are imported on use.

Raw sessions go through the reader's own functions (`brainrecon.data.nsd.read_session`, `zscore_session`; both
torch-free), steps 1, 2, 3 and 5 of `recon-prepare` (step 4, averaging repeats, needs the design and is skipped:
every trial is reconstructed on its own):
  1. mask: voxels `mask_indices` (C order of the X×Y×Z grid);
  2. int16 → / betas_scale (300) = percent signal change (float files are taken as percent change already);
  3. when `config.session_zscore`: z-score every voxel over all trials of the file (ddof=0, constant → 0);
  5. `(x - voxel_mean) / voxel_std` with the training statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brainrecon import __version__
from brainrecon import model_dir as layout
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import load_npy, read_json
from brainrecon.manifest import Manifest, load_manifest
from brainrecon.runtime.model_folder import verify_files

CHUNK_TRIALS = 50  # trials read at a time: a real session slice stays < 100 MB (brainrecon/data/nsd.py)


def check_betas(betas: Any, n_voxels: int, source: str = "betas") -> np.ndarray:
    """(N, V) float32/float64 z-scored betas, finite as float32 → float32; anything else is a one-line InputError.
    The one scan of a run's betas (`Reconstructor.check`)."""
    if not isinstance(betas, np.ndarray):
        raise InputError(source, "a numpy array of z-scored betas", type(betas).__name__)
    if betas.ndim != 2:
        raise InputError(source, f"(N, {n_voxels}) z-scored betas (rank 2)", f"shape {betas.shape}")
    if betas.dtype.kind != "f":
        raise InputError(source, "float32 or float64 z-scored betas", f"dtype {betas.dtype}")
    if betas.shape[1] != n_voxels:
        raise InputError(source, f"{n_voxels} voxels per row (the model's mask)", f"{betas.shape[1]}")
    if betas.shape[0] < 1:
        raise InputError(source, "at least one row of betas", "none")
    # cast, then check: a float64 beyond float32's range (1e300) is finite before the cast and inf after it
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(betas, dtype=np.float32)  # (N, V)
    bad = ~np.isfinite(cast)
    if bad.any():
        row, voxel = np.argwhere(bad)[0]
        value = float(betas[row, voxel])
        overflow = f": {value!r}, beyond float32's range" if np.isfinite(value) else ""
        raise InputError(
            source,
            "finite betas",
            f"{int(bad.sum())} NaN/Inf values (first at row {row}, voxel {voxel}{overflow})",
        )
    return cast


def parse_trials(spec: str | None, n: int) -> np.ndarray:
    """ "0,5,10-20" → [0, 5, 10, ..., 20] (ranges inclusive), each in [0, n), no duplicates; None → all n."""
    if spec is None or spec.strip() == "":
        return np.arange(n)
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if "-" in item[1:]:
                lo, hi = (int(v) for v in item.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(item))
        except ValueError:
            raise InputError(
                "--trials", "comma-separated indices or inclusive ranges like 0,5,10-20", repr(item)
            ) from None
    bad = [t for t in out if not 0 <= t < n]
    if bad:
        raise InputError("--trials", f"indices in [0, {n - 1}] ({n} trials in the input)", f"{bad[0]}")
    if len(set(out)) != len(out):
        dup = next(t for t in out if out.count(t) > 1)
        raise InputError("--trials", "each trial once", f"trial {dup} more than once")
    return np.asarray(out, dtype=np.int64)


class Preprocessing:
    """The recorded preprocessing of one model directory (files verified against the manifest on load)."""

    def __init__(self, model_dir: str | Path, manifest: Manifest | None = None):
        model_dir = Path(model_dir)
        verify_files(manifest or load_manifest(model_dir), model_dir, layout.PREPROCESS_FILES)
        path = model_dir / layout.PREPROCESS
        self.info: dict[str, Any] = read_json(path, "recon-prepare preprocess.json")
        from brainrecon.data.nsd import PREPROCESS_VERSION  # the reader that wrote it (torch-free)

        found = self.info.get("format_version")
        if found != PREPROCESS_VERSION:
            raise ConfigError(
                f"{path}: expected format_version {PREPROCESS_VERSION} (recon-prepare {__version__}), found "
                f"{found!r}: its preprocessing steps cannot be applied to raw betas; pass z-scored .npy rows"
            )
        try:  # every step as recon-prepare recorded it; nothing defaulted
            self.grid = tuple(int(d) for d in self.info["mask"]["shape"])  # (X, Y, Z)
            self.scale = float(self.info["betas_scale"])
            self.session_zscore = bool(self.info["config"]["session_zscore"])
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}: expected mask.shape, betas_scale and config.session_zscore, missing {e}"
            ) from None
        self.mask_indices = load_npy(model_dir / layout.MASK_INDICES, "mask indices")  # (V,) int64
        self.voxel_mean = load_npy(model_dir / layout.VOXEL_MEAN, "voxel mean")  # (V,)
        self.voxel_std = load_npy(model_dir / layout.VOXEL_STD, "voxel std")  # (V,)

    def mask(self) -> np.ndarray:
        """Boolean (X, Y, Z) mask; `grid[mask]` lists voxels in `mask_indices` order (C order, sorted)."""
        mask = np.zeros(int(np.prod(self.grid)), dtype=bool)
        mask[self.mask_indices] = True
        return mask.reshape(self.grid)

    def apply(self, psc: np.ndarray) -> np.ndarray:
        """(T, V) masked betas in percent signal change → z-scored betas float32, steps 3 and 5."""
        from brainrecon.data.nsd import zscore_session  # the reader's own function (torch-free)

        x = zscore_session(psc) if self.session_zscore else psc
        return ((x - self.voxel_mean) / self.voxel_std).astype(np.float32)

    def steps(self, int16: bool) -> list[str]:
        return [
            "mask_indices.npy (C order)",
            f"int16 / {self.scale:g}" if int16 else "float betas taken as percent signal change",
            *(
                ["per-session per-voxel z-score over the file's trials (ddof=0)"]
                if self.session_zscore
                else []
            ),
            "(x - voxel_mean) / voxel_std",
        ]


def _load_nifti(path: Path, prep: Preprocessing) -> tuple[np.ndarray, bool]:
    """One session X × Y × Z × trials → (T, V) percent signal change, through recon-prepare's own reader."""
    from brainrecon.data.nsd import open_session, read_session

    affine = prep.info["mask"].get("affine")
    img = open_session(path, prep.grid, None if affine is None else np.asarray(affine))
    dtype = img.get_data_dtype()
    return read_session(img, path, prep.mask(), CHUNK_TRIALS), dtype == np.int16


def _load_hdf5(path: Path, prep: Preprocessing) -> tuple[np.ndarray, bool]:
    """Dataset `betas`: trials × X × Y × Z, or trials × Z × Y × X as NSD's MATLAB-written `betas_sessionNN.hdf5`
    reads in h5py (axes reversed); told apart by the recorded grid (X × Y × Z assumed when X == Z)."""
    import h5py

    from brainrecon.data.nsd import check_finite_betas

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, "an HDF5 betas file", f"an unreadable file ({e})") from None
    with f:
        if "betas" not in f:
            raise InputError(path, "dataset 'betas' (trials x X x Y x Z)", f"datasets {sorted(f.keys())}")
        ds = f["betas"]
        if ds.ndim != 4 or tuple(ds.shape[1:]) not in (prep.grid, prep.grid[::-1]):
            raise InputError(
                path,
                f"betas of shape trials x {prep.grid} (or trials x {prep.grid[::-1]})",
                f"shape {ds.shape}",
            )
        if ds.dtype != np.int16 and ds.dtype.kind != "f":
            raise InputError(
                path, "int16 betas (percent signal change x 300) or float percent change", f"dtype {ds.dtype}"
            )
        reversed_axes = tuple(ds.shape[1:]) != prep.grid
        n = ds.shape[0]
        out = np.empty((n, len(prep.mask_indices)), dtype=np.float32)
        for start in range(0, n, CHUNK_TRIALS):
            block = ds[start : start + CHUNK_TRIALS]  # (c, ...)
            if reversed_axes:
                block = block.transpose(0, 3, 2, 1)  # (c, Z, Y, X) -> (c, X, Y, Z)
            out[start : start + len(block)] = block.reshape(len(block), -1)[:, prep.mask_indices]  # (c, V)
        if ds.dtype == np.int16:
            out /= np.float32(prep.scale)
        check_finite_betas(path, out)
        return out, ds.dtype == np.int16


def load_betas(
    path: str | Path, model_dir: str | Path, manifest: Manifest | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Betas (N, V) float32 z-scored as the model expects, and a description of what was done.

    `.npy`: rows already z-scored (recon-prepare's `test_betas.npy`); pickled arrays are refused; the dtype must be
    float (checked by the pipeline). `.nii`/`.nii.gz`: one session X × Y × Z × trials. `.h5`/`.hdf5`: dataset `betas`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "betas file (.npy, .nii.gz or .hdf5)")
    name = path.name.lower()
    if name.endswith(".npy"):
        return load_npy(path, "z-scored betas"), {"format": "npy", "preprocessing": ["none (z-scored rows)"]}
    prep = Preprocessing(model_dir, manifest)
    if name.endswith((".nii", ".nii.gz")):
        psc, int16 = _load_nifti(path, prep)
        fmt = "nifti"
    elif name.endswith((".h5", ".hdf5")):
        psc, int16 = _load_hdf5(path, prep)
        fmt = "hdf5"
    else:
        raise InputError(path, "a .npy, .nii, .nii.gz, .h5 or .hdf5 betas file", f"suffix {path.suffix!r}")
    return prep.apply(psc), {
        "format": fmt,
        "preprocessing": prep.steps(int16),
        "trials_in_file": len(psc),
    }
