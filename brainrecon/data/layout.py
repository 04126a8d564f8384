"""Paths of the Natural Scenes Dataset (NSD) layout, shared by the reader and the simulator.

Real NSD (Allen et al. 2022) and `recon-sim` output use exactly these relative paths:

    nsddata/experiments/nsd/nsd_expdesign.mat                      masterordering, subjectim, sharedix (1-based)
    nsddata/ppdata/subjAA/func1pt8mm/roi/nsdgeneral.nii.gz         ROI mask; voxels used are `> 0`
    nsddata_betas/ppdata/subjAA/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz
                                                                    int16, X x Y x Z x trials, percent change x 300
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5                    dataset `imgBrick`, N x S x S x 3 uint8
    nsddata_stimuli/stimuli/nsd/nsd_captions.json                   {"<0-based stimulus id>": [captions...]}
    nsddata_timeseries/ppdata/subjAA/func1pt8mm/timeseries/timeseries_sessionNN_runCC.nii.gz
                                                                    X x Y x Z x volumes, TR 1.333 s, zeros outside
                                                                    the brain (`recon-sim --timeseries`: int16)
    nsddata_timeseries/ppdata/subjAA/func1pt8mm/design/design_sessionNN_runCC.tsv
                                                                    one row per volume: the 10k id (1-based) whose
                                                                    trial starts there, else 0; no header

Real NSD ships COCO captions separately; Brain-Diffuser's `COCO_73k_annots_curated.npy` (73000 x 5 str)
is accepted by the reader through an explicit captions path.
"""

from __future__ import annotations

from pathlib import Path

BETAS_SCALE = 300.0  # NSD stores betas as int16 = percent signal change x 300
BETAS_FOLDER = "betas_fithrf_GLMdenoise_RR"
RESOLUTION = "func1pt8mm"


def expdesign_path(root: Path) -> Path:
    return Path(root) / "nsddata/experiments/nsd/nsd_expdesign.mat"


def mask_path(root: Path, subject: int) -> Path:
    return Path(root) / f"nsddata/ppdata/subj{subject:02d}/{RESOLUTION}/roi/nsdgeneral.nii.gz"


def betas_dir(root: Path, subject: int) -> Path:
    return Path(root) / f"nsddata_betas/ppdata/subj{subject:02d}/{RESOLUTION}/{BETAS_FOLDER}"


def session_path(root: Path, subject: int, session: int) -> Path:
    return betas_dir(root, subject) / f"betas_session{session:02d}.nii.gz"


def stimuli_path(root: Path) -> Path:
    return Path(root) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def captions_path(root: Path) -> Path:
    return Path(root) / "nsddata_stimuli/stimuli/nsd/nsd_captions.json"


def timeseries_path(root: Path, subject: int, session: int, run: int) -> Path:
    return (
        Path(root)
        / f"nsddata_timeseries/ppdata/subj{subject:02d}/{RESOLUTION}/timeseries"
        / f"timeseries_session{session:02d}_run{run:02d}.nii.gz"
    )


def run_design_path(root: Path, subject: int, session: int, run: int) -> Path:
    return (
        Path(root)
        / f"nsddata_timeseries/ppdata/subj{subject:02d}/{RESOLUTION}/design"
        / f"design_session{session:02d}_run{run:02d}.tsv"
    )


def sim_timeseries_path(root: Path) -> Path:
    """What a reader of a simulated subject's time series needs: TR, HRF, runs, onsets (not part of real NSD)."""
    return Path(root) / "simulation_timeseries.json"


def sim_truth_path(root: Path) -> Path:
    """Ground truth of a simulated subject (not part of real NSD)."""
    return Path(root) / "simulation_truth.json"
