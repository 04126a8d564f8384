"""Data benchmarks (issue 2): `recon-sim --preset demo` time, and the peak memory of preparing one
real-size NSD session (81 x 104 x 83 x 750 int16, written here as a synthetic NIfTI) with the reader,
beside the naive whole-session load for comparison. Each measurement runs in a fresh subprocess so
its peak RSS is its own. Results: benchmarks/results/data.json.

    python benchmarks/bench_data.py [--skip-real] [--workdir DIR] [--out benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from brainrecon.benchmarks.common import RESULTS, child, machine
from brainrecon.data import layout
from brainrecon.io import write_json

REAL_GRID = (81, 104, 83)
REAL_TRIALS = 750
TARGET_PEAK_GB = 1.5

CHILD = """
import json, sys, time, numpy as np, nibabel as nib
from brainrecon.benchmarks.common import peak_gb
t0 = time.perf_counter()
mode, root, out = sys.argv[1:4]
if mode == "reader":
    from brainrecon.data.nsd import PrepareConfig, prepare_subject
    prepare_subject(root, out, PrepareConfig(), progress=False)
else:  # naive: the whole session through the data proxy, then mask (~2 GB for a real-size session, measured here)
    from brainrecon.data import layout
    mask = np.asarray(nib.load(layout.mask_path(root, 1)).dataobj) > 0
    betas = np.asarray(nib.load(layout.session_path(root, 1, 1)).dataobj)[mask].T / 300.0
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": peak_gb()}))
"""


def run_child(mode: str, root: Path, out: Path) -> dict:
    result = child(["-c", CHILD, mode, str(root), str(out)])
    if "error" in result:
        raise SystemExit(f"{mode} child failed: {result['error']}")
    return result


def write_real_size_session(root: Path, seed: int = 0) -> dict:
    """One real-size session with an ellipsoid mask of ~15.7k voxels (subj01 has 15,724)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in REAL_GRID], indexing="ij")
    mask = np.where((x / 0.42) ** 2 + ((y + 0.55) / 0.3) ** 2 + (z / 0.4) ** 2 < 1, 1, 0).astype(np.int16)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    layout.mask_path(root, 1).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, affine), layout.mask_path(root, 1))
    layout.betas_dir(root, 1).mkdir(parents=True)
    t0 = time.perf_counter()
    betas = np.empty((*REAL_GRID, REAL_TRIALS), dtype=np.int16)
    for k in range(0, REAL_TRIALS, 50):  # fill in blocks to keep this script's own memory modest
        betas[..., k : k + 50] = rng.normal(0, 600, size=(*REAL_GRID, 50)).astype(np.int16)
    nib.save(nib.Nifti1Image(betas, affine), layout.session_path(root, 1, 1))
    del betas
    write_s = time.perf_counter() - t0
    # Design: 750 trials over 250 images shown 3 times; the first 50 are the shared test set.
    masterordering = rng.permutation(np.repeat(np.arange(1, 251), 3))
    subjectim = np.tile(np.arange(1, 251), (8, 1))
    layout.expdesign_path(root).parent.mkdir(parents=True)
    scipy.io.savemat(
        layout.expdesign_path(root),
        {"masterordering": masterordering[None], "subjectim": subjectim, "sharedix": np.arange(1, 51)[None]},
    )
    layout.stimuli_path(root).parent.mkdir(parents=True)
    with h5py.File(layout.stimuli_path(root), "w") as f:
        f.create_dataset("imgBrick", data=rng.integers(0, 256, (250, 32, 32, 3), dtype=np.uint8))
    size_gb = layout.session_path(root, 1, 1).stat().st_size / 2**30
    return {
        "grid": list(REAL_GRID),
        "trials": REAL_TRIALS,
        "voxels": int(mask.sum()),
        "file_gb": round(size_gb, 3),
        "write_seconds": round(write_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-real", action="store_true", help="skip the real-size session (slow to write)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "data.json")
    args = parser.parse_args()
    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run(
            [Path(sys.executable).parent / "recon-sim", "--out", tmp / "sim", "--preset", "demo"],
            check=True,
            capture_output=True,
        )
        results["recon_sim_demo_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"recon-sim --preset demo: {results['recon_sim_demo_seconds']} s")
        t0 = time.perf_counter()
        prep = run_child("reader", tmp / "sim", tmp / "prep-sim")
        results["recon_prepare_demo"] = prep
        print(f"recon-prepare demo: {prep}")
        if not args.skip_real:
            real = tmp / "real"
            results["real_size_session"] = write_real_size_session(real)
            print(f"real-size session: {results['real_size_session']}")
            reader = run_child("reader", real, tmp / "prep-real")
            naive = run_child("naive", real, tmp / "naive")
            results["prepare_real_session"] = {
                "reader": reader,
                "naive_whole_session": naive,
                "peak_ratio_naive_over_reader": round(naive["peak_rss_gb"] / reader["peak_rss_gb"], 2),
                "target_peak_gb": TARGET_PEAK_GB,
                "meets_target": reader["peak_rss_gb"] < TARGET_PEAK_GB,
            }
            print(f"prepare one real-size session: reader {reader}, naive {naive}")
    write_json(args.out, results)
    print(f"wrote {args.out}")
    if not args.skip_real and not results["prepare_real_session"]["meets_target"]:
        raise SystemExit(f"peak memory {reader['peak_rss_gb']} GB is over the {TARGET_PEAK_GB} GB target")


if __name__ == "__main__":
    main()
