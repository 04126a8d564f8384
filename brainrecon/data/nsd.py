"""NSD reader: real NSD and `recon-sim` subjects through the same code (torch-free).

Preprocessing, in order (each step recorded in `preprocess.json`):
  1. mask `nsdgeneral > 0` (voxels in C order of the X x Y x Z grid, `mask_indices.npy`);
  2. int16 betas / 300 -> percent signal change (float NIfTI betas are taken as percent change already);
  3. per-session z-score of every voxel over that session's trials (`session_zscore`, on by default:
     removes session offsets and gain drift, as most NSD decoders do; Brain-Diffuser itself skips it);
  4. average the repeats (up to 3) of each image;
  5. per-voxel z-score with the *train* mean and std (ddof=1) of the averaged betas, as Brain-Diffuser
     (`voxel_mean.npy`, `voxel_std.npy`; inference applies the same numbers).

Split as Brain-Diffuser: a trial is test when `masterordering <= len(sharedix)` (1000 in NSD), its image id
is `subjectim[subject-1, masterordering-1] - 1` (0-based). Betas come through nibabel's data proxy in slices
of `chunk_trials` trials and are masked before conversion, one session at a time, so a real session
(81x104x83x750 int16) never costs the ~4 GB of `get_fdata()`; memory holds one session's masked betas plus
the per-image sums.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from PIL import Image
from rich.progress import Progress

from brainrecon import __version__
from brainrecon.data import layout
from brainrecon.errors import InputError, MissingFileError
from brainrecon.io import atomic_dir, save_npy, sha256_file, write_json

PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    subject: int = 1
    max_sessions: int | None = (
        None  # None: every consecutive betas_sessionNN file from 01 (Brain-Diffuser: 37)
    )
    session_zscore: bool = True
    image_size: int | None = None  # None keeps the stimuli's own size
    chunk_trials: int = 50
    captions_file: str | None = None  # None: <root>/.../nsd_captions.json when present


@dataclass(frozen=True)
class Design:
    masterordering: np.ndarray  # (T,) 1-based index into the subject's image list
    subjectim: np.ndarray  # (8, M) 1-based stimulus ids
    sharedix: np.ndarray  # (n_shared,) 1-based stimulus ids

    def trial_stim_ids(self, subject: int, n_trials: int) -> np.ndarray:
        """0-based stimulus id of each of the first n_trials trials."""
        return self.subjectim[subject - 1, self.masterordering[:n_trials] - 1] - 1

    def trial_is_test(self, n_trials: int) -> np.ndarray:
        return self.masterordering[:n_trials] <= len(self.sharedix)


def load_design(root: Path, subject: int) -> Design:
    path = layout.expdesign_path(root)
    if not path.is_file():
        raise MissingFileError(path, "NSD experimental design (nsd_expdesign.mat)")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        raise InputError(
            path, "a MATLAB .mat file", f"an unreadable file ({type(e).__name__}: {e})"
        ) from None
    fields = {}
    for name in ("masterordering", "subjectim", "sharedix"):
        if name not in mat:
            raise InputError(
                path, f"variable '{name}'", f"only {sorted(k for k in mat if not k.startswith('__'))}"
            )
        fields[name] = np.asarray(mat[name])
    masterordering = fields["masterordering"].reshape(-1).astype(np.int64)
    sharedix = fields["sharedix"].reshape(-1).astype(np.int64)
    subjectim = fields["subjectim"].astype(np.int64)
    if subjectim.ndim != 2 or not 1 <= subject <= subjectim.shape[0]:
        raise InputError(path, f"subjectim with a row for subject {subject}", f"shape {subjectim.shape}")
    n_images = subjectim.shape[1]
    if masterordering.min() < 1 or masterordering.max() > n_images:
        raise InputError(
            path,
            f"masterordering in 1..{n_images} (1-based)",
            f"values in {masterordering.min()}..{masterordering.max()}",
        )
    if subjectim[subject - 1].min() < 1:
        raise InputError(path, "subjectim ids >= 1 (1-based)", f"minimum {subjectim[subject - 1].min()}")
    if len(sharedix) > n_images:
        raise InputError(path, f"at most {n_images} shared images", f"{len(sharedix)}")
    return Design(masterordering, subjectim, sharedix)


def load_mask(root: Path, subject: int) -> tuple[np.ndarray, np.ndarray, Path]:
    """Boolean ROI mask (X, Y, Z) of `nsdgeneral > 0`, its affine and its path."""
    path = layout.mask_path(root, subject)
    if not path.is_file():
        raise MissingFileError(path, "nsdgeneral ROI mask")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise InputError(path, "a NIfTI mask", f"an unreadable file ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise InputError(path, "a 3-D mask", f"shape {data.shape}")
    mask = data > 0
    if not mask.any():
        raise InputError(path, "at least one voxel with nsdgeneral > 0", "an empty mask")
    return mask, img.affine, path


def find_sessions(root: Path, subject: int, max_sessions: int | None) -> list[Path]:
    """Consecutive session files from 01; with max_sessions, exactly that many must exist."""
    sessions = []
    n = 1
    while (path := layout.session_path(root, subject, n)).is_file() and (
        max_sessions is None or n <= max_sessions
    ):
        sessions.append(path)
        n += 1
    if not sessions:
        raise MissingFileError(layout.session_path(root, subject, 1), "betas session file")
    if max_sessions is not None and len(sessions) < max_sessions:
        raise MissingFileError(
            layout.session_path(root, subject, len(sessions) + 1),
            f"betas session file ({max_sessions} sessions asked for)",
        )
    return sessions


def open_session(path: Path, grid: tuple[int, ...], affine: np.ndarray | None) -> nib.Nifti1Image:
    """Open one betas session lazily and check it against the mask's grid and affine (None: not checked).

    Shared by recon-prepare and the runtime's NIfTI input, so both refuse the same files the same way.
    """
    try:
        # keep the gzip stream open: slices otherwise re-decompress from 0
        img = nib.load(path, keep_file_open=True)
        shape = img.shape
    except Exception as e:
        raise InputError(
            path, "a NIfTI betas file", f"an unreadable file ({type(e).__name__}: {e})"
        ) from None
    if len(shape) != 4 or tuple(shape[:3]) != tuple(grid):
        raise InputError(path, f"betas of shape {tuple(grid)} x trials (the mask's grid)", f"shape {shape}")
    if affine is not None and not np.allclose(img.affine, affine, atol=1e-3):
        raise InputError(
            path,
            "the mask's affine",
            f"a different affine (max diff {np.abs(img.affine - affine).max():.3g})",
        )
    dtype = img.get_data_dtype()
    if dtype != np.int16 and dtype.kind != "f":
        raise InputError(
            path, "int16 betas (percent signal change x 300) or float percent change", f"dtype {dtype}"
        )
    check_nifti_size(path, img)
    return img


# Deflate's largest compression ratio is 1032:1 (zlib's "technical details" page: a long run of one byte codes
# to about 1/1032 of its length), so a gzip file of C bytes holds at most 1032 x C bytes uncompressed.
DEFLATE_MAX_RATIO = 1032


def check_nifti_size(path: Path, img: nib.Nifti1Image) -> None:
    """The header's shape must fit in the file before anything is allocated from it (a header can claim 10^9
    trials in a few kilobytes). Uncompressed: the file size. Gzipped, the uncompressed size is not stored whole:
      1. refuse a shape whose bytes exceed DEFLATE_MAX_RATIO x the file size (no file can hold it);
      2. accept when the gzip trailer's ISIZE (uncompressed size mod 2^32, RFC 1952) equals the header's
         offset + data bytes mod 2^32 (single-member files as nibabel, FSL and AFNI write them);
      3. otherwise (several gzip members, a lying header) decompress and count, stopping at the bytes needed:
         work bounded by 1, and done only for files that step 2 cannot vouch for.
    """
    shape = tuple(int(d) for d in img.shape)
    itemsize = img.get_data_dtype().itemsize
    offset = int(img.dataobj.offset)
    per_trial = int(np.prod(shape[:3], dtype=object)) * itemsize
    needed = offset + per_trial * shape[3]  # Python ints: no overflow
    size = path.stat().st_size
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
    if not gzipped:
        held, what = size, f"a file of {size} bytes"
    elif needed > DEFLATE_MAX_RATIO * size:
        held = DEFLATE_MAX_RATIO * size
        what = f"a gzip file of {size} bytes (at most {held} bytes uncompressed)"
    elif isize == needed % 2**32:
        return
    else:
        held = _gunzipped_size(path, stop=needed)
        what = f"a gzip file of {size} bytes holding {held} bytes uncompressed"
    if held < needed:
        raise InputError(
            path,
            f"{shape[3]} trials of {'x'.join(map(str, shape[:3]))} {img.get_data_dtype()} as its header says "
            f"({needed} bytes)",
            f"{what}: room for {max(held - offset, 0) // max(per_trial, 1)} trials",
        )


def _gunzipped_size(path: Path, stop: int) -> int:
    """Uncompressed bytes of a gzip file (every member), counted up to `stop`; a truncated stream counts what
    decompressed."""
    import gzip
    import zlib

    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < stop and (block := f.read(min(1 << 22, stop - total))):
                total += len(block)
    except (EOFError, OSError, zlib.error):
        pass
    return total


def read_session(
    img: nib.Nifti1Image,
    path: Path,
    mask: np.ndarray,
    chunk_trials: int,
    progress: Progress | None = None,
    task=None,
) -> np.ndarray:
    """Masked betas of one session in percent signal change, (trials, V) float32."""
    n_trials = img.shape[3]
    out = np.empty((n_trials, int(mask.sum())), dtype=np.float32)
    scale = 1.0 / layout.BETAS_SCALE if img.get_data_dtype() == np.int16 else 1.0
    for start in range(0, n_trials, chunk_trials):
        stop = min(start + chunk_trials, n_trials)
        try:
            block = np.asarray(img.dataobj[..., start:stop])  # (X, Y, Z, c), raw dtype when unscaled
        except Exception as e:
            raise InputError(
                path,
                f"{n_trials} readable trials",
                f"a read error at trial {start} ({type(e).__name__}: {e})",
            ) from None
        out[start:stop] = block[mask].T.astype(np.float32) * np.float32(scale)  # (c, V)
        if progress is not None:
            progress.advance(task, stop - start)
    check_finite_betas(path, out)
    return out


def check_finite_betas(path: Path, betas: np.ndarray) -> None:
    """(trials, V) betas must be finite; the error names the first bad trial and masked voxel."""
    bad = ~np.isfinite(betas)
    if bad.any():
        trial, voxel = np.argwhere(bad)[0]
        raise InputError(
            path,
            "finite betas",
            f"{int(bad.sum())} NaN/Inf values (first at trial {trial}, masked voxel {voxel})",
        )


def zscore_session(betas: np.ndarray) -> np.ndarray:
    """Per-voxel z-score over a session's trials (ddof=0); constant voxels become 0."""
    mean = betas.mean(axis=0, dtype=np.float64)
    std = betas.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((betas - mean) / std).astype(np.float32)


def image_brick(f: h5py.File, path: Path) -> h5py.Dataset:
    """The stimuli file's `imgBrick` (N x S x S x 3 uint8), refused (one line) when its shape is not backed by
    stored data: before anything is sized from it. HDF5 allocates storage lazily, so a small file can declare
    10^9 images, and unwritten chunks read back as the fill value (black images, silently). Checked from the
    file's metadata only: an unfiltered dataset needs its bytes in the file; a chunked one needs every chunk
    stored (`H5Dget_num_chunks`)."""
    if "imgBrick" not in f:
        raise InputError(path, "dataset 'imgBrick'", f"datasets {list(f.keys())}")
    brick = f["imgBrick"]
    if brick.ndim != 4 or brick.shape[3] != 3 or brick.shape[1] != brick.shape[2] or brick.dtype != np.uint8:
        raise InputError(path, "imgBrick N x S x S x 3 uint8", f"{brick.shape} {brick.dtype}")
    if brick.is_virtual or brick.external:
        return brick  # its data lives in other files: read errors name them
    n, side = int(brick.shape[0]), int(brick.shape[1])
    needed = n * side * side * 3  # Python ints
    expected = f"{n} stored images of {side}x{side}x3 ({needed} bytes)"
    if brick.chunks is not None:
        chunks = [-(-dim // c) for dim, c in zip(brick.shape, brick.chunks, strict=True)]
        want, stored = int(np.prod(chunks, dtype=object)), int(brick.id.get_num_chunks())
        if stored < want:
            raise InputError(path, expected, f"{stored} of its {want} chunks stored (the rest read as zeros)")
    elif brick.id.get_storage_size() < needed:
        raise InputError(path, expected, f"{brick.id.get_storage_size()} bytes stored")
    if not brick.id.get_create_plist().get_nfilters() and path.stat().st_size < needed:  # a truncated file
        raise InputError(path, expected, f"a file of {path.stat().st_size} bytes")
    return brick


def stimuli_side(path: Path) -> int:
    """S of the stimuli file's checked imgBrick (`image_brick`)."""
    with h5py.File(path, "r") as f:
        return int(image_brick(f, path).shape[1])


def read_images(path: Path, ids: np.ndarray, image_size: int | None, out: np.ndarray) -> None:
    """Copy imgBrick[ids] (resized when asked) into `out` (n, S, S, 3) uint8, streaming in id order."""
    with h5py.File(path, "r") as f:
        brick = image_brick(f, path)
        if ids.max() >= brick.shape[0]:
            raise InputError(path, f"at least {ids.max() + 1} stimuli (design ids)", f"{brick.shape[0]}")
        for i, stim in enumerate(ids):  # ids are sorted; h5py reads one image at a time cheaply
            img = brick[int(stim)]
            if image_size is not None and img.shape[0] != image_size:
                img = np.asarray(
                    Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
                )
            out[i] = img


def load_captions(path: Path) -> dict[int, list[str]]:
    """Captions keyed by 0-based stimulus id: our JSON, or Brain-Diffuser's (N, 5) str .npy."""
    if not path.is_file():
        raise MissingFileError(path, "captions file")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or arr.dtype.kind != "U":
            raise InputError(path, "an (N, captions) unicode array", f"{arr.shape} {arr.dtype}")
        return {i: [c.strip() for c in row if c.strip()] for i, row in enumerate(arr)}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, "a JSON object of captions", f"a parse error ({e})") from None
    return {int(k): list(v) for k, v in data.items()}


def prepare_subject(
    root: str | Path,
    out: str | Path,
    config: PrepareConfig = PrepareConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Read one subject from an NSD-layout folder and write the documented arrays to `out` (atomically)."""
    root, out = Path(root), Path(out)
    t0 = time.perf_counter()
    if not root.is_dir():
        raise MissingFileError(root, "NSD root directory")
    if out.exists() and not overwrite:
        raise InputError(out, "a new output directory (or --overwrite)", "an existing path")
    subject = config.subject
    # Check everything cheap before the expensive reads.
    design = load_design(root, subject)
    mask, affine, mask_file = load_mask(root, subject)
    session_files = find_sessions(root, subject, config.max_sessions)
    images = [open_session(p, mask.shape, affine) for p in session_files]
    trials_per_session = images[0].shape[3]
    for p, img in zip(session_files, images, strict=True):
        if img.shape[3] != trials_per_session:
            raise InputError(p, f"{trials_per_session} trials like session 01", f"{img.shape[3]}")
    n_trials = trials_per_session * len(images)
    if n_trials > len(design.masterordering):
        raise InputError(
            layout.expdesign_path(root),
            f"at least {n_trials} trials in masterordering ({len(images)} sessions)",
            f"{len(design.masterordering)}",
        )
    stim_path = layout.stimuli_path(root)
    if not stim_path.is_file():
        raise MissingFileError(stim_path, "NSD stimuli (imgBrick HDF5)")
    try:
        native = stimuli_side(stim_path)
    except OSError as e:
        raise InputError(stim_path, "an HDF5 file", f"an unreadable file ({e})") from None
    captions_file = Path(config.captions_file) if config.captions_file else layout.captions_path(root)
    captions = load_captions(captions_file) if config.captions_file or captions_file.is_file() else None

    trial_ids = design.trial_stim_ids(subject, n_trials)  # (T,) 0-based
    trial_test = design.trial_is_test(n_trials)
    unique_ids, trial_row = np.unique(trial_ids, return_inverse=True)  # images sorted by stimulus id
    n_voxels = int(mask.sum())
    sums = np.zeros((len(unique_ids), n_voxels), dtype=np.float32)
    counts = np.zeros(len(unique_ids), dtype=np.int64)
    image_is_test = np.zeros(len(unique_ids), dtype=bool)
    image_is_test[trial_row[trial_test]] = True
    if captions is not None:
        missing = [int(i) for i in unique_ids if int(i) not in captions]
        if missing:
            raise InputError(
                captions_file, "captions for every stimulus in the sessions read", f"none for id {missing[0]}"
            )
    if np.any(image_is_test[trial_row[~trial_test]]):
        raise InputError(
            layout.expdesign_path(root),
            "shared images only in test trials",
            "a shared image in a train trial",
        )

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"subj{subject:02d} betas", total=n_trials)
        for s, (path, img) in enumerate(zip(session_files, images, strict=True)):
            betas = read_session(img, path, mask, config.chunk_trials, bar, task)  # (t, V)
            img.uncache()
            if config.session_zscore:
                betas = zscore_session(betas)
            rows = trial_row[s * trials_per_session : (s + 1) * trials_per_session]
            np.add.at(sums, rows, betas)
            np.add.at(counts, rows, 1)
            del betas
    averaged = sums / counts[:, None].astype(np.float32)
    del sums

    train_rows, test_rows = np.flatnonzero(~image_is_test), np.flatnonzero(image_is_test)
    if len(train_rows) < 2 or len(test_rows) < 1:
        raise InputError(
            layout.expdesign_path(root),
            "at least 2 train and 1 test images in the sessions read",
            f"{len(train_rows)} train, {len(test_rows)} test",
        )
    train_betas, test_betas = averaged[train_rows], averaged[test_rows]
    del averaged
    voxel_mean = train_betas.mean(axis=0, dtype=np.float64).astype(np.float32)
    voxel_std = train_betas.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32)
    n_constant = int((voxel_std == 0).sum())
    voxel_std[voxel_std == 0] = 1.0
    train_betas = (train_betas - voxel_mean) / voxel_std
    test_betas = (test_betas - voxel_mean) / voxel_std

    with atomic_dir(out, overwrite=overwrite) as tmp:
        arrays = {
            "train_betas": train_betas,
            "test_betas": test_betas,
            "train_stim_ids": unique_ids[train_rows],
            "test_stim_ids": unique_ids[test_rows],
            "train_trial_counts": counts[train_rows],
            "test_trial_counts": counts[test_rows],
            "voxel_mean": voxel_mean,
            "voxel_std": voxel_std,
            "mask_indices": np.flatnonzero(mask).astype(np.int64),
        }
        for name, arr in arrays.items():
            save_npy(tmp / f"{name}.npy", arr)
        size = config.image_size
        side = size or native
        for split, rows in (("train", train_rows), ("test", test_rows)):
            mm = np.lib.format.open_memmap(
                tmp / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(len(rows), side, side, 3)
            )
            read_images(stim_path, unique_ids[rows], size, mm)
            mm.flush()
            del mm
            if captions is not None:
                write_json(tmp / f"{split}_captions.json", [captions[int(i)] for i in unique_ids[rows]])
        info = {
            "format_version": PREPROCESS_VERSION,
            "producer": f"brainrecon {__version__}",
            "nsd_root": str(root.resolve()),
            "subject": subject,
            "config": dataclasses.asdict(config),
            "sessions": [p.name for p in session_files],
            "trials_per_session": trials_per_session,
            "n_trials": n_trials,
            "n_voxels": n_voxels,
            "mask": {
                "file": str(mask_file.relative_to(root)),
                "sha256": sha256_file(mask_file),
                "shape": list(mask.shape),
                "affine": np.asarray(affine).round(6).tolist(),
            },
            "betas_scale": layout.BETAS_SCALE,
            "steps": [
                "mask nsdgeneral > 0 (C order)",
                "int16 / 300 -> percent signal change",
                *(["per-session per-voxel z-score over trials (ddof=0)"] if config.session_zscore else []),
                "average repeats per image",
                "per-voxel z-score with train mean/std (ddof=1): voxel_mean.npy, voxel_std.npy",
            ],
            "split": "test iff masterordering <= len(sharedix); image id = subjectim[subject-1, masterordering-1] - 1",
            "n_train": len(train_rows),
            "n_test": len(test_rows),
            "constant_voxels": n_constant,
            "image_size": side,
            "captions": captions is not None,
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.suffix in (".npy", ".json")},
        }
        write_json(tmp / "preprocess.json", info)
    return {
        "subject": subject,
        "sessions": len(session_files),
        "trials": n_trials,
        "voxels": n_voxels,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "mean_repeats_train": float(counts[train_rows].mean()),
        "mean_repeats_test": float(counts[test_rows].mean()),
        "image_size": side,
        "seconds": round(time.perf_counter() - t0, 2),
        "out": str(out),
    }
