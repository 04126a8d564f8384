"""Serving commands: `recon-serve` (Triton through PyTriton), `recon-batch` (Ray Data), `recon-stream` (volumes
as they arrive → images) and `recon-view` (its live page). Thin wiring; the logic lives in `brainrecon.serve`. recon-serve and recon-batch need the
serving environment (`make serve-env`, `.venv-serve/bin/...`): PyTriton pins numpy < 2; recon-stream runs in either.
Exit codes: 0 ok, 1 failure (one-line error), 2 usage.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Annotated

import typer

from brainrecon.choices import Preset, Sampler
from brainrecon.cli import print_summary, run_app
from brainrecon.errors import BrainReconError

# The stage-2 sampling options of recon-serve, recon-batch and recon-stream (one definition for the three)
PresetOption = Annotated[
    Preset,
    typer.Option(
        help="Stage 2: paper (as fitted) or fast (docs/speed.md); --steps and the rest override it."
    ),
]
StepsOption = Annotated[int | None, typer.Option(help="Stage 2: schedule length (default: the preset's).")]
SamplerOption = Annotated[
    Sampler | None,
    typer.Option(
        help="Stage 2: ddim or dpmpp_2m (DPM-Solver++ 2M) (default: the preset's; the fitted ddim)."
    ),
]
GuidanceStopOption = Annotated[
    float | None,
    typer.Option(
        help="Stage 2: share of the denoising steps run with classifier-free guidance, 0..1 (default: the "
        "fitted one, 1.0)."
    ),
]
CacheIntervalOption = Annotated[
    int | None,
    typer.Option(
        help="Stage 2: DeepCache, the whole UNet every K-th step and its shallow branch between; 1 = off "
        "(default: the fitted one, 1). K > 1 needs recon-export --deepcache."
    ),
]
ViewPortOption = Annotated[int, typer.Option(help="The live page's port on 127.0.0.1 (0: a free one).")]


def _sampling(
    preset: str,
    steps: int | None,
    sampler: str | None,
    guidance_stop: float | None,
    cache_interval: int | None = None,
) -> dict:
    """The stage-2 overrides of recon-serve and recon-batch: a preset, the explicit options on top."""
    from brainrecon.sampling import preset_overrides

    found = preset_overrides(
        preset,
        num_inference_steps=steps,
        sampler=sampler,
        guidance_stop=guidance_stop,
        cache_interval=cache_interval,
    )
    keys = ("num_inference_steps", "sampler", "guidance_stop", "cache_interval")
    return {key: found.get(key) for key in keys}


def _require(module: str, command: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise BrainReconError(
            f"{command}: expected the serving environment (module {module}), found none: run `make serve-env` "
            f"and use .venv-serve/bin/{command}"
        )


serve_app = typer.Typer(add_completion=False, help="Serve an exported model folder with Triton (PyTriton).")


@serve_app.command()
def serve(
    model_dir: Annotated[Path, typer.Option(help="Exported model folder (recon-export).")],
    host: Annotated[str, typer.Option(help="Address to bind HTTP, gRPC and metrics to.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP/REST port (KServe v2 protocol).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    instances: Annotated[int, typer.Option(help="Model instances (threads sharing the loaded runtime).")] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Rows per runtime call (dynamic batching limit).")] = 8,
    dynamic_batching: Annotated[
        bool, typer.Option("--dynamic-batching/--no-dynamic-batching", help="Batch concurrent requests.")
    ] = True,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="Longest wait for a batch to fill, microseconds.")
    ] = 5000,
    max_queue_size: Annotated[
        int, typer.Option(help="Requests allowed to wait; more are refused at once (0: no limit).")
    ] = 64,
    queue_timeout_s: Annotated[
        float,
        typer.Option(
            help="A request that waited this long is refused, not computed (0: no limit); a request may set a "
            "shorter one (KServe v2 parameter `timeout`, microseconds)."
        ),
    ] = 60.0,
    engine: Annotated[str, typer.Option(help="ort or trt.")] = "ort",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 models.")] = "fp32",
    device: Annotated[str, typer.Option(help="ONNX Runtime device: cpu, cuda or tensorrt.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (default: all cores).")] = None,
    preset: PresetOption = "paper",
    steps: StepsOption = None,
    sampler: SamplerOption = None,
    guidance_stop: GuidanceStopOption = None,
    cache_interval: CacheIntervalOption = None,
    verbose: Annotated[
        bool, typer.Option(help="Triton's log on stderr, a line per model execution.")
    ] = False,
) -> None:
    """Serve model `brainrecon` (betas (V,) FP32 [+ seed (1,) INT64] → final_image, stage1_image) until
    SIGINT/SIGTERM. A bad request gets its own one-line error (HTTP 400); a full queue or an expired request is
    refused (HTTP 503). Triton's admin APIs (statistics, logging, trace, shared memory, repository) need the header
    `admin-key: $BRAINRECON_SERVE_ADMIN_KEY` (closed when that variable is unset).

    Example: .venv-serve/bin/recon-serve --model-dir engines/subj01 --http-port 8000 --grpc-port 8001
    """
    _require("pytriton", "recon-serve")
    from brainrecon.serve.triton_server import ServeOptions, check_model_dir
    from brainrecon.serve.triton_server import serve as run_server

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("pytriton", "tritonclient"):  # their INFO lines are per-request chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_model_dir(model_dir)
    options = ServeOptions(
        model_dir=model_dir,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        instances=instances,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size,
        queue_timeout_s=queue_timeout_s,
        engine=engine,
        precision=precision,
        device=device,
        threads=threads,
        **_sampling(preset, steps, sampler, guidance_stop, cache_interval),
        verbose=verbose,
    )
    run_server(options)


batch_app = typer.Typer(add_completion=False, help="Reconstruct many betas files on a Ray cluster.")


@batch_app.command()
def batch(
    betas: Annotated[list[Path], typer.Argument(help="Betas files (.npy z-scored rows, NIfTI, NSD HDF5).")],
    model_dir: Annotated[Path, typer.Option(help="Exported model folder (recon-export).")],
    out: Annotated[Path, typer.Option(help="Output root: one folder per input file.")],
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (ray://host:10001 or auto); default: a local Ray.")
    ] = None,
    shard_size: Annotated[
        int, typer.Option(help="Trials per shard (the unit of work and of resuming), at most 1024.")
    ] = 16,
    actors: Annotated[int, typer.Option(help="Actors in the pool, each with one loaded runtime.")] = 2,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs reserved per actor.")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor (0: CPU only).")] = 0.0,
    seed: Annotated[
        int, typer.Option(help="Trial i of a file gets img2img seed SEED + i (at most 2**63 - 1).")
    ] = 0,
    engine: Annotated[str, typer.Option(help="ort or trt.")] = "ort",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 models.")] = "fp32",
    device: Annotated[str, typer.Option(help="ONNX Runtime device: cpu, cuda or tensorrt.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads per actor.")] = 1,
    retries: Annotated[int, typer.Option(help="Times a shard whose actor died is retried.")] = 3,
    preset: PresetOption = "paper",
    steps: StepsOption = None,
    sampler: SamplerOption = None,
    guidance_stop: GuidanceStopOption = None,
    cache_interval: CacheIntervalOption = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray instance (default: all).")] = None,
    rows_per_call: Annotated[
        int, typer.Option(help="Trials per runtime call; their PNGs are written as soon as it returns.")
    ] = 4,
    shard_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a shard may run; then its actor is killed and it is recorded as timed out."
        ),
    ] = None,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="When a file's folder holds another run (other input, model, seed, sampling, engine, precision "
            "or device: see its run.json), write to a new folder X-2, X-3, ... instead of refusing.",
        ),
    ] = False,
) -> None:
    """Reconstruct every trial of every file: shards through a pool of Ray actors, PNGs and summaries written
    atomically; a rerun with the same settings (run.json) skips finished shards and whole PNGs, one with other
    settings is refused (or, with --new-run, gets a new folder). Exit 1 when a shard failed or timed out, or
    trials are missing (both listed in the summary).

    Examples:
      .venv-serve/bin/recon-batch data/subj01/test_betas.npy --model-dir engines/subj01 --out out/batch
      .venv-serve/bin/recon-batch s1.npy s2.npy --model-dir engines/subj01 --out out/ --address auto --gpus-per-actor 1
    """
    _require("ray", "recon-batch")
    from brainrecon.serve.ray_batch import BatchOptions, run_batch

    options = BatchOptions(
        shard_size=shard_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        seed=seed,
        engine=engine,
        precision=precision,
        device=device,
        threads=threads,
        retries=retries,
        **_sampling(preset, steps, sampler, guidance_stop, cache_interval),
        num_cpus=num_cpus,
        rows_per_call=rows_per_call,
        shard_timeout=shard_timeout,
        new_run=new_run,
    )
    report = run_batch(betas, model_dir, out, options, address=address)
    print_summary(
        f"recon-batch -> {out}",
        {
            "files": len(report["files"]),
            "folders": ", ".join(report["folders"].values()),
            "trials written": report["written"],
            "trials computed now": report["computed"],
            "shards skipped (done before)": report["skipped_shards"],
            "missing trials": report["missing"] or "none",
            "failed shards": report["failed_shards"] or "none",
            "stopped by": report["error"] or "-",
            "seconds": report["seconds"],
        },
    )
    if report["missing"] or report["failed_shards"] or report["error"]:
        raise BrainReconError(
            f"recon-batch: {report['missing_count']} trials missing: {report['missing'] or 'none'}; failed "
            f"shards: {report['failed_shards'] or 'none'} (see each folder's summary.json)"
        )


stream_app = typer.Typer(add_completion=False, help="Reconstruct each trial of a run as its volumes arrive.")


@stream_app.command()
def stream(
    model_dir: Annotated[Path, typer.Option(help="Exported model folder (recon-export).")],
    design: Annotated[Path, typer.Option(help="The run's design file: a row per volume, the 10k id or 0.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (a rerun with the same settings resumes it).")
    ] = None,
    replay: Annotated[
        Path | None, typer.Option(help="A recorded 4-D run (.nii.gz), played volume by volume.")
    ] = None,
    watch: Annotated[
        Path | None, typer.Option(help="A folder the scanner writes per-volume 3-D NIfTI files into.")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="Per-voxel statistics from a --calibrate pass over an earlier run.")
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(help="Write the online betas' statistics over the --replay run to this .npz and stop."),
    ] = None,
    speed: Annotated[
        float, typer.Option(help="Replay pace: 1 the run's TR, X times faster, 0 as fast as possible.")
    ] = 1.0,
    tr: Annotated[
        float | None,
        typer.Option(help="TR in seconds (default: the replayed run's header; required to watch)."),
    ] = None,
    first_number: Annotated[
        int, typer.Option(help="Watch: the number in the first volume's file name (volume = number - this).")
    ] = 0,
    stage: Annotated[
        int | None, typer.Option(help="1: stage-1 images only (default: 2 when fitted).")
    ] = None,
    preset: PresetOption = "paper",
    steps: StepsOption = None,
    seed: Annotated[int, typer.Option(help="Trial t gets img2img seed SEED + t.")] = 0,
    window_volumes: Annotated[
        int, typer.Option(help="A trial is estimated once volume onset + this has arrived.")
    ] = 7,
    late_s: Annotated[float, typer.Option(help="Watch: seconds a gap waits before it is missing.")] = 2.0,
    idle_s: Annotated[float, typer.Option(help="Watch: seconds without a new file that end the run.")] = 30.0,
    max_volumes: Annotated[
        int | None, typer.Option(help="Stop after this many volumes (rerun to resume).")
    ] = None,
    engine: Annotated[str, typer.Option(help="ort, openvino or trt.")] = "ort",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 models.")] = "fp32",
    device: Annotated[str, typer.Option(help="ONNX Runtime device: cpu, cuda or tensorrt.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (default: all cores).")] = None,
    view: Annotated[
        bool,
        typer.Option("--view", help="Serve the live page (docs/real-time.md) on 127.0.0.1 during the run."),
    ] = False,
    view_hold: Annotated[
        float | None,
        typer.Option(help="--view: keep serving this many seconds after the run (default: Ctrl-C)."),
    ] = None,
    port: ViewPortOption = 8765,
    stimuli_root: Annotated[
        Path | None,
        typer.Option(help="--view: NSD root (nsd_expdesign.mat, nsd_stimuli.hdf5) for ground truth."),
    ] = None,
    subject: Annotated[int, typer.Option(help="--view: the NSD subject of the ground truth.")] = 1,
) -> None:
    """Estimate each trial's beta online (LSS GLM) once its window has passed, normalise it with a calibration
    run's statistics, and write stage1_TTTTT.png then final_TTTTT.png (TTTTT: the trial in the run), stream.jsonl
    (one line per event, faults also on stderr) and summary.json (latency p50/p95). --view serves a live page of
    the run (as recon-view) and adds the page's latency to summary.json. docs/real-time.md.

    Examples:
      recon-stream --replay run01.nii.gz --design run01.tsv --model-dir engines/subj01 --calibrate cal.npz
      recon-stream --replay run02.nii.gz --design run02.tsv --model-dir engines/subj01 --calibration cal.npz --out out/run02
      recon-stream --watch /scanner/export --tr 1.333 --design run03.tsv --model-dir engines/subj01 --calibration cal.npz --out out/run03
      recon-stream --replay run02.nii.gz --design run02.tsv --model-dir engines/subj01 --calibration cal.npz --out out/run02 --view --stimuli-root data/nsd
    """
    from brainrecon.runtime import RuntimeOptions
    from brainrecon.serve.stream import StreamConfig, run_stream
    from brainrecon.serve.stream import calibrate as run_calibration

    config = StreamConfig(window_volumes=window_volumes, late_s=late_s, idle_s=idle_s)
    if calibrate is not None:
        if replay is None:
            raise typer.BadParameter("--calibrate needs --replay RUN.nii.gz (a recorded run)")
        found = run_calibration(replay, design, model_dir, calibrate, config, tr)
        print_summary(f"recon-stream --calibrate -> {calibrate}", found)
        return
    if out is None:
        raise typer.BadParameter("--out is required (unless --calibrate)")
    options = RuntimeOptions(engine=engine, precision=precision, device=device, threads=threads)
    viewer = None
    if view:
        from brainrecon.serve.viewer import start_viewer

        viewer = start_viewer(out, stimuli_root, subject, port)
        typer.echo(f"recon-stream: live page at {viewer.url}", err=True)
    try:
        summary = run_stream(
            model_dir,
            design,
            out,
            replay_path=replay,
            watch_dir=watch,
            calibration_path=calibration,
            speed=speed,
            stage=stage,
            sampling_overrides=_sampling(preset, steps, None, None),
            seed=seed,
            tr=tr,
            first_number=first_number,
            max_volumes=max_volumes,
            config=config,
            options=options,
        )
        page = viewer.settle() if viewer is not None else None  # page_latency into summary.json
    except BaseException:
        if viewer is not None:
            viewer.stop()
        raise
    latency = summary["latency"]
    print_summary(
        f"recon-stream -> {out}",
        {
            "trials done now / before / in run": f"{summary['trials_done_now']} / "
            f"{summary['trials_done_before']} / {summary['trials_in_run']}",
            "failed trials": summary["trials_failed"] or "none",
            "faults": summary["faults"] or "none",
            "stage-1 latency p50 / p95 s": f"{latency['stage1']['p50_s']} / {latency['stage1']['p95_s']}",
            "final latency p50 / p95 s": f"{latency['final']['p50_s']} / {latency['final']['p95_s']}",
            **(
                {"final on the page p50 / p95 s": f"{page['final']['p50_s']} / {page['final']['p95_s']}"}
                if page
                else {}
            ),
            "complete": summary["complete"],
        },
    )
    if viewer is not None:
        how = "until Ctrl-C" if view_hold is None else f"for {view_hold:g} s"
        typer.echo(f"recon-stream: the run ended; serving {viewer.url} {how}", err=True)
        viewer.hold(view_hold)


view_app = typer.Typer(add_completion=False, help="Watch a recon-stream output folder live in a browser.")


@view_app.command()
def view(
    out: Annotated[Path, typer.Argument(help="The --out folder of a recon-stream run (running or done).")],
    nsd_root: Annotated[
        Path | None, typer.Option(help="NSD root (nsd_expdesign.mat, nsd_stimuli.hdf5) for ground truth.")
    ] = None,
    subject: Annotated[int, typer.Option(help="The NSD subject of the ground truth.")] = 1,
    port: ViewPortOption = 8765,
) -> None:
    """Serve the live page of OUT on 127.0.0.1 until Ctrl-C: a row per trial (ground truth, stage 1, final,
    latency), faults, progress; images appear as another process streams them. docs/real-time.md.

    Example: recon-view out/run02 --nsd-root data/nsd --subject 1
    """
    from brainrecon.errors import MissingFileError
    from brainrecon.serve.viewer import start_viewer

    if not out.is_dir():
        raise MissingFileError(out, "recon-stream output folder")
    viewer = start_viewer(out, nsd_root, subject, port)
    typer.echo(f"recon-view: serving {viewer.url} until Ctrl-C", err=True)
    viewer.hold()


serve_main = run_app(serve_app)
batch_main = run_app(batch_app)
stream_main = run_app(stream_app)
view_main = run_app(view_app)
