"""`recon-sim` (a simulated subject in the NSD layout) and `recon-prepare` (NSD → training arrays). Thin: the logic
lives in `brainrecon.data`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainrecon.cli import print_summary, run_app

sim_app = typer.Typer(add_completion=False, help="Write a simulated subject in the NSD layout.")


@sim_app.command()
def sim(
    out: Annotated[Path, typer.Option(help="Output folder (NSD layout), created atomically.")],
    preset: Annotated[str, typer.Option(help="tiny (seconds, tests) or demo (~2000 train images).")] = "demo",
    seed: Annotated[int, typer.Option(help="Random seed; equal seeds give identical files.")] = 0,
    subject: Annotated[int, typer.Option(help="NSD subject number to simulate.")] = 1,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output folder, only if recon-sim wrote it.")
    ] = False,
    timeseries: Annotated[
        bool,
        typer.Option(
            help="Also write BOLD runs (TR 1.333 s) and design files in NSD's time-series layout; the betas then "
            "come from a GLM on those runs."
        ),
    ] = False,
) -> None:
    """Simulate a subject: stimuli with captions, a voxel brain, int16 betas and the NSD design.

    Example: recon-sim --out data/sim-demo --preset demo --seed 0
    Example: recon-sim --out data/sim-tiny-ts --preset tiny --timeseries
    """
    from brainrecon.data.sim import SimConfig, simulate_subject
    from brainrecon.data.timeseries import TimeseriesConfig
    from brainrecon.io import SIMULATED_SUBJECT, atomic_dir

    if preset not in ("tiny", "demo"):
        raise typer.BadParameter(f"expected tiny or demo, found {preset!r}", param_hint="--preset")
    with atomic_dir(out, overwrite=overwrite, kind=SIMULATED_SUBJECT) as tmp:
        summary = simulate_subject(
            tmp,
            SimConfig.preset(preset),
            seed=seed,
            subject=subject,
            progress=True,
            timeseries=TimeseriesConfig() if timeseries else None,
        )
    print_summary(f"recon-sim {preset} -> {out}", summary)


prepare_app = typer.Typer(add_completion=False, help="Read one NSD-layout subject into training arrays.")


@prepare_app.command()
def prepare(
    nsd_root: Annotated[Path, typer.Option(help="Root of an NSD download or a recon-sim folder.")],
    out: Annotated[Path, typer.Option(help="Output folder for the arrays and preprocess.json.")],
    subject: Annotated[int, typer.Option(help="NSD subject (1-8).")] = 1,
    max_sessions: Annotated[
        int | None, typer.Option(help="Read sessions 1..N (Brain-Diffuser: 37); default all.")
    ] = None,
    session_zscore: Annotated[bool, typer.Option(help="Z-score each voxel within each session.")] = True,
    image_size: Annotated[int | None, typer.Option(help="Resize stimuli to this side (bicubic).")] = None,
    captions: Annotated[Path | None, typer.Option(help="Captions JSON or Brain-Diffuser (N,5) .npy.")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output folder, only if recon-prepare wrote it.")
    ] = False,
) -> None:
    """Mask, scale, z-score, average repeats and split a subject as Brain-Diffuser does.

    Example: recon-prepare --nsd-root data/sim-demo --subject 1 --out data/subj01
    """
    from brainrecon.data.nsd import PrepareConfig, prepare_subject
    from brainrecon.io import PREPARED_SUBJECT, output_dir

    config = PrepareConfig(
        subject=subject,
        max_sessions=max_sessions,
        session_zscore=session_zscore,
        image_size=image_size,
        captions_file=str(captions) if captions else None,
    )
    with output_dir(out, PREPARED_SUBJECT, overwrite, inputs=(nsd_root, captions)):
        summary = prepare_subject(nsd_root, out, config, overwrite=overwrite)
    print_summary(f"recon-prepare subj{subject:02d} -> {out}", summary)


sim_main = run_app(sim_app)
prepare_main = run_app(prepare_app)
