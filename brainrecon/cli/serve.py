"""Serving commands: `recon-serve` (Triton through PyTriton) and `recon-batch` (Ray Data). Thin wiring; the logic
lives in `brainrecon.serve`. Both need the serving environment (`make serve-env`, `.venv-serve/bin/...`): PyTriton
pins numpy < 2. Exit codes: 0 ok, 1 failure (one-line error), 2 usage.
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


def _sampling(preset: str, steps: int | None, sampler: str | None, guidance_stop: float | None) -> dict:
    """The stage-2 overrides of recon-serve and recon-batch: a preset, the explicit options on top."""
    from brainrecon.sampling import preset_overrides

    found = preset_overrides(preset, num_inference_steps=steps, sampler=sampler, guidance_stop=guidance_stop)
    return {key: found.get(key) for key in ("num_inference_steps", "sampler", "guidance_stop")}


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
    preset: Annotated[
        Preset,
        typer.Option(
            help="Stage 2: paper (as fitted) or fast (docs/speed.md); --steps and the rest override it."
        ),
    ] = "paper",
    steps: Annotated[
        int | None, typer.Option(help="Stage 2: schedule length (default: the fitted one).")
    ] = None,
    sampler: Annotated[
        Sampler | None,
        typer.Option(help="Stage 2: ddim or dpmpp_2m (DPM-Solver++ 2M) (default: the fitted one, ddim)."),
    ] = None,
    guidance_stop: Annotated[
        float | None,
        typer.Option(
            help="Stage 2: share of the denoising steps run with classifier-free guidance, 0..1 (default: the "
            "fitted one, 1.0)."
        ),
    ] = None,
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
        **_sampling(preset, steps, sampler, guidance_stop),
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
    preset: Annotated[
        Preset,
        typer.Option(
            help="Stage 2: paper (as fitted) or fast (docs/speed.md); --steps and the rest override it."
        ),
    ] = "paper",
    steps: Annotated[
        int | None, typer.Option(help="Stage 2: schedule length (default: the fitted one).")
    ] = None,
    sampler: Annotated[
        Sampler | None,
        typer.Option(help="Stage 2: ddim or dpmpp_2m (DPM-Solver++ 2M) (default: the fitted one, ddim)."),
    ] = None,
    guidance_stop: Annotated[
        float | None,
        typer.Option(
            help="Stage 2: share of the denoising steps run with classifier-free guidance, 0..1 (default: the "
            "fitted one, 1.0)."
        ),
    ] = None,
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
        **_sampling(preset, steps, sampler, guidance_stop),
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


serve_main = run_app(serve_app)
batch_main = run_app(batch_app)
