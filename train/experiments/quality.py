"""The quality map: the deployed path (the torch-free runtime, `brainrecon.runtime.Reconstructor`) on a subject's
test set, once per setting, each setting scored and timed beside Brain-Diffuser's recipe.

A setting is a name and overrides of the fitted `SamplingConfig` (num_inference_steps, strength, guidance_scale,
sampler, guidance_stop, ...) and of `RuntimeOptions` (engine, precision, ...). The first setting is the reference,
"paper": the fitted sampling (Brain-Diffuser's DDIM, 50 steps x strength 0.75, guidance 7.5 at every step) on
ONNX Runtime fp32 (the engine and precision of every setting that names none may be changed); a setting named
"paper" replaces its overrides. Every setting runs the whole set in one call
(the fitted re-normalisation over the set, the img2img noise from the sampling's seed, as recon-infer), after an
untimed warm-up call on 2 images whenever a model folder is opened with new options; with fewer images than the
test set, the re-normalisation takes its statistics over those. Per setting:

- seconds per image on this machine, the UNet loop and the whole call (`Reconstruction.timings`);
- the UNet steps per image with and without classifier-free guidance (2 rows per call with, 1 without), the
  UNet calls the run made, and the rows;
- PixCorr and SSIM (brainrecon.metrics), CLIP 2-way on the subject's own CLIP (ours: the stage-2 summary's CLIP,
  the small one for the demo, not the papers' CLIP column), and Brain-Diffuser's eight metrics as far as
  `weights` holds their networks (train/evaluation/paper_metrics.py);
- the difference from the reference's images: mean and max absolute grey-level difference, PixCorr between them;
- whether it stays within the bounds of the reference: CLIP 2-way at most 0.01 and PixCorr and SSIM at most 0.02
  below the reference's (a higher score is within), on the rounded numbers the JSON holds;
- with a real-size times file, the estimated real-size seconds per image: UNet calls x their per-call time (by
  rows) + the VAE encoder, VAE decoder and stage-1 calls, for the setting's engine and precision.

    out/quality.json        machine, settings as resolved, the rows above, the real-size times used
    out/quality.md          the table, the settings within the bounds, the papers' metrics when computed
    out/quality.png         CLIP 2-way and PixCorr against seconds per image (demo, and real size when given)
    out/quality_sheet.png   ground truth, then every setting (first 12 images)
    out/sheets/NAME.png     ground truth, paper, this setting (first 12 images)

The files are rewritten after every setting ("complete": false until the last), so a long run leaves its
finished settings behind.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.config import config_from_dict, config_to_dict
from brainrecon.errors import BrainReconError, ConfigError, InputError
from brainrecon.io import read_json, write_json, write_text
from brainrecon.runtime import RuntimeOptions
from brainrecon.sampling import SamplingConfig

REFERENCE = "paper"
# How far below the reference a setting may score and still count as within (issue 23's bounds).
BOUNDS = {"clip_2way": 0.01, "pixcorr": 0.02, "ssim": 0.02}
SHEET_IMAGES = 12
WARMUP_IMAGES = 2
SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RuntimeOptions)}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a setting's name is also its sheet's file name
# what a real-size times file holds beside the UNet's per-call times: seconds per image of each other model call
REAL_SIZE_CALLS = ("vae_encode_s", "vae_decode_s", "stage1_s")


@dataclass(frozen=True)
class Setting:
    """One run of the map: its name, the overrides it was given, and what they resolve to."""

    name: str
    overrides: Mapping[str, Any]
    sampling: SamplingConfig
    options: RuntimeOptions

    @property
    def engine_key(self) -> str:
        """The key of its per-call times in a real-size times file: "ort fp32", "openvino bf16"."""
        return f"{self.options.engine} {self.options.precision}"


# ----------------------------------------------------------------------------------------------- settings


def _convert(name: str, key: str, text: str) -> Any:
    """A command-line value typed as the field's default is (a None default is an optional integer)."""
    default = {**SAMPLING_DEFAULTS, **OPTION_DEFAULTS}[key]
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise ConfigError(f"setting {name!r}: expected true or false for {key}, found {text!r}")
        return text == "true"
    kind = (
        int if default is None or isinstance(default, int) else float if isinstance(default, float) else str
    )
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"setting {name!r}: expected {kind.__name__} for {key}, found {text!r}") from None


def _check_keys(name: str, overrides: Mapping[str, Any]) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"setting name: expected letters, digits and _.+- (a file name), found {name!r}")
    unknown = sorted(set(overrides) - set(SAMPLING_DEFAULTS) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"setting {name!r}: expected keys from {sorted(SAMPLING_DEFAULTS)} (sampling) or "
            f"{sorted(OPTION_DEFAULTS)} (runtime options), found {', '.join(unknown)}"
        )


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """A --setting: "NAME=key=value,key=value" (or "NAME=" for the defaults) → (name, {key: typed value})."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"--setting: expected NAME=key=value,key=value, found {text!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"setting {name!r}: expected key=value, found {item!r}")
        if key in overrides:
            raise ConfigError(f"setting {name!r}: expected each key once, found {key} twice")
        _check_keys(name, {key: value})
        overrides[key] = _convert(name, key, value)
    _check_keys(name, overrides)
    return name, overrides


def read_settings(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """A settings file: a JSON object {name: {key: value, ...}, ...}, in run order; values typed as JSON types them."""
    data = read_json(path, "quality-map settings")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(
            f"{path}: expected a JSON object {{name: {{key: value}}}}, found {type(data).__name__}"
        )
    for name, overrides in data.items():
        _check_keys(name, overrides)
    return [(name, dict(overrides)) for name, overrides in data.items()]


def resolve_settings(
    specs: Sequence[tuple[str, Mapping[str, Any]]],
    fitted: SamplingConfig,
    engine: str = "ort",
    precision: str = "fp32",
) -> list[Setting]:
    """The settings to run, the reference first: each overrides the fitted sampling and RuntimeOptions(engine,
    precision). Every value is checked here (SamplingConfig, RuntimeOptions: one-line errors naming the setting),
    before any model is opened."""
    names = [name for name, _ in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"settings: expected distinct names, found {', '.join(twice)} more than once")
    specs = sorted(specs, key=lambda spec: spec[0] != REFERENCE)  # stable: the others keep their order
    if REFERENCE not in names:
        specs.insert(0, (REFERENCE, {}))
    settings = []
    for name, overrides in specs:
        _check_keys(name, overrides)
        try:
            sampling = dataclasses.replace(
                fitted, **{k: v for k, v in overrides.items() if k in SAMPLING_DEFAULTS}
            )
            options = RuntimeOptions(
                **{"engine": engine, "precision": precision}
                | {k: v for k, v in overrides.items() if k in OPTION_DEFAULTS}
            )
        except (BrainReconError, TypeError) as exc:
            raise ConfigError(f"setting {name!r}: {exc}") from None
        settings.append(Setting(name, dict(overrides), sampling, options))
    return settings


# ----------------------------------------------------------------------------------------------- real size


def read_real_size_times(path: str | Path, settings: Sequence[Setting]) -> dict:
    """A real-size times file, checked against the settings: {"machine": ..., "unet_rows_s": {"ort fp32": {"1": s,
    "2": s}, ...}, "vae_encode_s": s, "vae_decode_s": s, "stage1_s": s}, seconds per call of one image ("1": a
    UNet call on 1 row, the conditional pass alone; "2": the guided call on 2 rows); each of the three may also be
    {"ort fp32": s, ...} per engine and precision."""
    times = read_json(path, "real-size per-call times")

    def check_seconds(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(path, f"seconds >= 0 at {where}", repr(value))

    if not isinstance(times, dict) or not isinstance(times.get("unet_rows_s"), dict):
        raise InputError(path, 'an object with "unet_rows_s": {"ENGINE PRECISION": {"1": s, "2": s}}', "none")
    for setting in settings:
        key = setting.engine_key
        rows = times["unet_rows_s"].get(key)
        if not isinstance(rows, dict):
            raise InputError(path, f'unet_rows_s["{key}"] (setting {setting.name!r})', "none")
        for n in ("1", "2"):
            check_seconds(rows.get(n), f'unet_rows_s["{key}"]["{n}"]')
        if setting.sampling.cache_interval > 1:  # DeepCache's shallow steps have their own time
            shallow = times.get("unet_shallow_rows_s", {}).get(key)
            if not isinstance(shallow, dict):
                raise InputError(
                    path, f'unet_shallow_rows_s["{key}"] (setting {setting.name!r}, DeepCache)', "none"
                )
            for n in ("1", "2"):
                check_seconds(shallow.get(n), f'unet_shallow_rows_s["{key}"]["{n}"]')
        for call in REAL_SIZE_CALLS:
            value = times.get(call)
            check_seconds(value.get(key) if isinstance(value, dict) else value, f"{call} ({key})")
    return times


def step_kinds(steps: int, guided: int, cache_interval: int = 1) -> dict[str, int]:
    """UNet calls per image by kind: {"guided"|"unguided"} x {"full"|"shallow"}: the first `guided` steps run 2 rows,
    the rest 1; with DeepCache every `cache_interval`-th step (the first included) is full, the others shallow
    (runtime/stage2.py's rule)."""
    kinds = dict.fromkeys(("guided_full", "guided_shallow", "unguided_full", "unguided_shallow"), 0)
    for i in range(steps):
        kinds[
            f"{'guided' if i < guided else 'unguided'}_{'full' if i % cache_interval == 0 else 'shallow'}"
        ] += 1
    return kinds


def real_size_seconds(times: Mapping[str, Any], key: str, kinds: Mapping[str, int]) -> float:
    """Estimated real-size seconds per image: the UNet calls of `kinds` (step_kinds: 2-row guided, 1-row unguided;
    full steps at `unet_rows_s`, DeepCache's shallow ones at `unet_shallow_rows_s`) + one VAE encoder, one VAE
    decoder and one stage-1 call, at the per-call times of `times` for engine and precision `key`."""
    full, shallow = times["unet_rows_s"][key], times.get("unet_shallow_rows_s", {}).get(key, {})
    unet = kinds["guided_full"] * float(full["2"]) + kinds["unguided_full"] * float(full["1"])
    if kinds["guided_shallow"] or kinds["unguided_shallow"]:
        unet += kinds["guided_shallow"] * float(shallow["2"]) + kinds["unguided_shallow"] * float(
            shallow["1"]
        )
    others = (times[c][key] if isinstance(times[c], dict) else times[c] for c in REAL_SIZE_CALLS)
    return unet + sum(float(s) for s in others)


# ----------------------------------------------------------------------------------------------- scores


def image_difference(reference: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """Mean and max absolute grey-level difference (0-255, over pixels and channels) and PixCorr between two sets."""
    from brainrecon.metrics import pixcorr

    diff = np.abs(reference.astype(np.int16) - images.astype(np.int16))
    return {
        "mean_abs": round(float(diff.mean()), 4),
        "max_abs": int(diff.max()),
        "pixcorr": round(float(pixcorr(reference, images)), 4),
    }


def within_bounds(row: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """{"drop": {metric: reference − row}, "within_bounds": every drop <= its bound}, on the rounded scores."""
    drop = {m: round(reference[m] - row[m], 4) for m in BOUNDS}
    return {"drop": drop, "within_bounds": all(drop[m] <= BOUNDS[m] for m in BOUNDS)}


def machine() -> dict[str, Any]:
    """Where and when the seconds were measured: UTC date, CPU model, cores, bf16/int8 CPU flags, load, versions."""
    from brainrecon.manifest import producer_versions

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_flags": [f for f in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in flags],
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "versions": producer_versions() | {"openvino": _version("openvino")},
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- the map


def load_test_set(data_dir: Path, n_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """recon-prepare's test betas and images, the first `n_images` (None: all; at least 2, for 2-way
    identification). Read here rather than by stage1/fit.py's load_prepared, whose imports (torch, transformers)
    would come before the callers' checks and print their warnings above a refusal."""
    from brainrecon.io import load_npy

    betas = load_npy(data_dir / "test_betas.npy", "test betas from recon-prepare")
    images = load_npy(data_dir / "test_images.npy", "test images from recon-prepare", mmap=True)
    if len(images) != len(betas):
        raise InputError(
            data_dir / "test_images.npy", f"as many test images as betas ({len(betas)})", str(len(images))
        )
    n = len(betas) if not n_images else min(n_images, len(betas))
    if n < 2:
        raise InputError(data_dir / "test_betas.npy", "at least 2 test trials (2-way identification)", str(n))
    return np.ascontiguousarray(betas[:n]), np.asarray(images[:n])


def quality_map(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    specs: Sequence[tuple[str, Mapping[str, Any]]] = (),
    n_images: int | None = None,
    real_size_times: str | Path | None = None,
    weights: str | Path | None = None,
    engine: str = "ort",
    precision: str = "fp32",
    device: str = "cpu",
    progress: bool = True,
    seed: int | None = None,
) -> dict:
    """Run every setting of `specs` ((name, overrides), after the reference) on the first `n_images` test images
    (None: all) of an exported two-stage model folder → out/quality.{json,md,png} and the contact sheets. Every
    setting, the real-size times file and the samplings against the model folder are checked before any model
    runs. The subject's CLIP and the metric networks run on the torch `device`. `seed` replaces the fitted img2img
    seed of every setting, the reference's included (a setting that names its own keeps it): the same map at
    another noise draw, to see which differences outlast the draw."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.model_dir import STAGE2_SUMMARY
    from brainrecon.runtime import Reconstructor, read_model_folder

    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    info = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary (recon-train subject)")
    fitted = config_from_dict(SamplingConfig, info["sampling"], str(model_dir / STAGE2_SUMMARY))
    if seed is not None:
        fitted = fitted.with_overrides(seed=seed)
    settings = resolve_settings(specs, fitted, engine, precision)
    times = read_real_size_times(real_size_times, settings) if real_size_times is not None else None
    betas, gt = load_test_set(data_dir, n_images)
    n = len(betas)

    opened: dict[str, Any] = {}  # the open Reconstructor and its options: consecutive settings share it

    def reconstructor(options: RuntimeOptions) -> Reconstructor:
        if opened.get("options") != options:
            if "rec" in opened:
                opened.pop("rec").close()
            opened["rec"], opened["options"] = Reconstructor.open(model_dir, options, stage=2), options
            opened["warm"] = False
        return opened["rec"]

    # every setting against the folder (its files for each precision and UNet graph; the sampling's baked-in
    # fields and a schedule the scheduler can build) before any model runs
    for options in {(s.options.precision, s.options.unet_graph): s.options for s in settings}.values():
        read_model_folder(model_dir, 2, options.precision, options.unet_graph)
    for setting in settings:
        try:
            reconstructor(settings[0].options).check(betas, setting.sampling)
        except BrainReconError as exc:
            raise ConfigError(f"setting {setting.name!r}: {exc}") from None

    from brainrecon.train.evaluation.paper_metrics import PaperScorer
    from brainrecon.train.evaluation.stage2 import clip_identification, clip_image_embeddings
    from brainrecon.train.foundations.loaders import load_clip

    extractor, _ = load_clip(info["config"]["clip"], device=device)
    gt_embeddings = clip_image_embeddings(extractor, gt)
    scorer = PaperScorer(gt, weights, device=device, show_progress=progress) if weights is not None else None

    rows: list[dict] = []
    outputs: dict[str, np.ndarray] = {}
    result: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    host, t_start = machine(), time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        for i, setting in enumerate(settings):
            rec = reconstructor(setting.options)
            if not opened["warm"]:  # sessions allocate and the unconditional K/V is computed: not timed
                rec.reconstruct(betas[:WARMUP_IMAGES], setting.sampling)
                opened["warm"] = True
            task = bar.add_task(f"{setting.name} ({i + 1}/{len(settings)})", total=None)
            calls: dict[str, int] = {}

            def tick(step: str, done: int, total: int, task=task, calls=calls, name=setting.name) -> None:
                calls[step] = total
                bar.update(task, description=f"{name}: {step}", completed=done, total=total)

            recon = rec.run_checked(rec.check(betas, setting.sampling), tick)
            final = recon.images
            outputs[setting.name] = final
            steps = len(recon.timesteps)
            guided = setting.sampling.guided_steps(steps)  # the runtime's rule
            row = {
                "name": setting.name,
                "overrides": dict(setting.overrides),
                "sampling": config_to_dict(setting.sampling),
                "options": config_to_dict(setting.options),
                "ran": {
                    **{k: rec.info[k] for k in ("engine", "precision", "device", "unet_graph")},
                    "providers": recon.providers,
                    "fallback": recon.fallback,
                },
                "n": n,
                "steps": steps,
                "guided_steps": guided,
                "unguided_steps": steps - guided,
                "unet_rows_per_image": 2 * guided + (steps - guided),
                "step_kinds": step_kinds(steps, guided, setting.sampling.cache_interval),
                "unet_calls": calls.get("unet", 0),
                "unet_rows": n * (2 * guided + (steps - guided)),
                "batch_sizes": recon.batch_sizes,
                "seconds_per_image": round(recon.timings["total_s"] / n, 5),
                "unet_seconds_per_image": round(recon.timings["unet_s"] / n, 5),
                "timings": recon.timings,
                "pixcorr": round(float(pixcorr(gt, final)), 4),
                "ssim": round(float(ssim(gt, final)), 4),
                "clip_2way": round(clip_identification(extractor, gt_embeddings, final), 4),
                "vs_reference": image_difference(outputs[REFERENCE], final),
            }
            if scorer is not None:
                values = scorer.score(final, setting.name).values
                row["paper"] = {m: round(v, 4) for m, v in values.items() if v is not None}
            row |= within_bounds(row, rows[0] if rows else row)
            if times is not None:
                seconds = real_size_seconds(times, setting.engine_key, row["step_kinds"])
                row["real_size_seconds_per_image"] = round(seconds, 3)
            rows.append(row)
            bar.update(task, description=f"{setting.name}: done ({row['seconds_per_image']:.3f} s/image)")
            result = {
                "model_dir": str(model_dir),
                "data": str(data_dir),
                "n_test": n,
                "machine": host,
                "reference": REFERENCE,
                "bounds": {**BOUNDS, "rule": "reference − setting <= bound (a higher score is within)"},
                "metrics_note": "clip_2way is ours: the subject's own CLIP (the stage-2 summary's), not the papers'",
                "paper_metrics": scorer.info() if scorer is not None else None,
                "real_size_times": {"file": str(real_size_times), **times} if times is not None else None,
                "seconds": round(time.perf_counter() - t_start, 1),
                "complete": i + 1 == len(settings),
                "settings": rows,
            }
            _write(out, result, gt, outputs)
    opened.pop("rec").close()
    return result


def _write(out: Path, result: dict, gt: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
    from brainrecon.images import contact_sheet

    write_json(out / "quality.json", result)
    write_text(out / "quality.md", quality_table(result))
    plot_quality(result, out / "quality.png")
    first = gt[:SHEET_IMAGES]
    reference = outputs[REFERENCE][:SHEET_IMAGES]
    for name, images in outputs.items():
        rows = [("ground truth", first), (REFERENCE, reference)]
        contact_sheet(
            rows if name == REFERENCE else [*rows, (name, images[:SHEET_IMAGES])],
            out / "sheets" / f"{name}.png",
        )
    contact_sheet(
        [("ground truth", first), *((name, images[:SHEET_IMAGES]) for name, images in outputs.items())],
        out / "quality_sheet.png",
    )


def _describe(row: Mapping[str, Any]) -> str:
    s, o = row["sampling"], row["options"]
    stop = f", guidance stop {s['guidance_stop']:g}" if s["guidance_stop"] < 1 else ""
    stop += f", DeepCache every {s['cache_interval']}" if s.get("cache_interval", 1) > 1 else ""
    return (
        f"{s['sampler']} {s['num_inference_steps']} x {s['strength']:g}, guidance {s['guidance_scale']:g}{stop}, "
        f"{o['engine']} {o['precision']}"
    )


def quality_table(result: dict) -> str:
    """The Markdown of quality.md: the table (one row per setting), the settings within the bounds, and the
    papers' eight metrics when they were computed."""
    from brainrecon.train.evaluation.paper_metrics import METRICS, PaperMetrics, paper_table_rows

    m, rows = result["machine"], result["settings"]
    real = result["real_size_times"] is not None
    b = result["bounds"]
    lines = [
        f"Quality map: {result['n_test']} test images of {result['model_dir']}, the torch-free runtime, on "
        f"{m['cpu']} ({m['affinity']} of {m['cores']} cores), {m['date']}.",
        "",
        *([] if result["complete"] else ["**Partial**: the run stopped before every setting was done.", ""]),
        f"Reference: {result['reference']}. Within the bounds (✓): CLIP 2-way at most {b['clip_2way']}, PixCorr "
        f"and SSIM at most {b['pixcorr']} below the reference's (a higher score is within). CLIP 2-way is ours "
        "(the subject's own CLIP). Steps: UNet steps per image (with guidance: 2 rows per call).",
        "",
        "| setting | sampling | steps (guided) | s/image | UNet s/image |"
        + (" real-size s/image |" if real else "")
        + " PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ (ours) | vs paper: mean / max abs | vs paper: PixCorr | within |",
        "|---|---|---|---|---|" + ("---|" if real else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        within = "reference" if r["name"] == result["reference"] else "✓" if r["within_bounds"] else "✗"
        d = r["vs_reference"]
        lines.append(
            f"| {r['name']} | {_describe(r)} | {r['steps']} ({r['guided_steps']}) | {r['seconds_per_image']:.4f} | "
            f"{r['unet_seconds_per_image']:.4f} |"
            + (f" {r['real_size_seconds_per_image']:.1f} |" if real else "")
            + f" {r['pixcorr']:.3f} | {r['ssim']:.3f} | {r['clip_2way']:.3f} | {d['mean_abs']:.2f} / {d['max_abs']} | "
            f"{d['pixcorr']:.4f} | {within} |"
        )
    kept = [r["name"] for r in rows[1:] if r["within_bounds"]]
    lines += ["", f"Within the bounds of {result['reference']}: {', '.join(kept) if kept else 'none'}."]
    if real:
        t = result["real_size_times"]
        lines += [
            "",
            f"Real-size seconds: estimated from {t['file']} (measured on {t.get('machine', 'unnamed')}).",
        ]
    if result["paper_metrics"] is not None:
        info = result["paper_metrics"]
        paper = [
            (
                r["name"],
                PaperMetrics(r["n"], {k: r["paper"].get(k) for k in METRICS}, info["missing"], info["files"]),
            )
            for r in rows
        ]
        lines += ["", "Brain-Diffuser's eight metrics, in the papers' order (identification as %):", ""]
        lines += paper_table_rows(paper)
    return "\n".join(lines) + "\n"


def plot_quality(result: dict, path: str | Path) -> None:
    """CLIP 2-way and PixCorr against seconds per image, one point per setting named; a second row against the
    estimated real-size seconds when the result has them. Dotted: the reference's score minus its bound."""
    from brainrecon.train.experiments.plots import METRIC_LABELS, pyplot, save_figure

    rows = result["settings"]
    xs = [("seconds_per_image", "seconds per image (this machine, demo model)")]
    if result["real_size_times"] is not None:
        xs.append(("real_size_seconds_per_image", "estimated real-size seconds per image"))
    plt = pyplot()
    fig, axes = plt.subplots(len(xs), 2, figsize=(11, 4 * len(xs)), squeeze=False)
    for (x_key, x_label), ax_row in zip(xs, axes, strict=True):
        for ax, metric in zip(ax_row, ("clip_2way", "pixcorr"), strict=True):
            for i, r in enumerate(rows):
                ax.scatter(
                    r[x_key], r[metric], color="C3" if i == 0 else "C0" if r["within_bounds"] else "C7"
                )
                ax.annotate(
                    r["name"], (r[x_key], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            ax.axhline(rows[0][metric] - BOUNDS[metric], color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")  # the settings span several-fold in seconds
            for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                set_formatter(lambda v, _: f"{v:g}")
            ax.set_xlabel(x_label)
            ax.set_ylabel(METRIC_LABELS[metric] + (" (ours)" if metric == "clip_2way" else ""))
            ax.grid(alpha=0.3)
    fig.suptitle(
        f"Quality map: {result['n_test']} test images; red: {result['reference']}, blue: within the bounds "
        f"(dotted), grey: outside; {result['machine']['cpu']}",
        fontsize=9,
    )
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- across seeds


def across_seeds(runs: Sequence[str | Path]) -> dict:
    """The quality maps of one model at several img2img seeds (`recon-eval quality --seed S` into one folder each)
    → per setting run in all of them: the mean and sample SD over the seeds of each score and of its change from
    the same seed's reference, how many seeds keep it within the bounds, and whether the mean change does. One
    seed's ±0.01 CLIP 2-way is within the draw's own spread on 100 images; the mean over seeds is the evidence."""
    results = [read_json(Path(r) / "quality.json", "quality map (recon-eval quality)") for r in runs]
    if len(results) < 2:
        raise InputError("quality-seeds runs", "at least 2 quality maps", str(len(results)))
    seeds = [res["settings"][0]["sampling"]["seed"] for res in results]
    if len(set(seeds)) != len(seeds):
        raise InputError("quality-seeds runs", "maps at distinct seeds", f"seeds {seeds}")
    for res, run in zip(results, runs, strict=True):
        if not res["complete"]:
            raise InputError(run, "a finished quality map", "a partial one (complete: false)")
        if res["model_dir"] != results[0]["model_dir"] or res["n_test"] != results[0]["n_test"]:
            raise InputError(
                run,
                f"a map of {results[0]['model_dir']} on {results[0]['n_test']} images",
                f"{res['model_dir']} on {res['n_test']}",
            )
    by_name = [{r["name"]: r for r in res["settings"]} for res in results]
    names = [n for n in by_name[0] if all(n in b for b in by_name)]
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "sampling": _describe(by_name[0][name])}
        for metric in BOUNDS:
            scores = [b[name][metric] for b in by_name]
            change = [b[name][metric] - b[REFERENCE][metric] for b in by_name]
            row[metric] = {
                "mean": round(float(np.mean(scores)), 4),
                "sd": round(float(np.std(scores, ddof=1)), 4),
            }
            row[f"{metric}_change"] = {
                "mean": round(float(np.mean(change)), 4),
                "sd": round(float(np.std(change, ddof=1)), 4),
            }
        row["seeds_within"] = sum(b[name]["within_bounds"] for b in by_name)
        row["mean_within"] = all(row[f"{m}_change"]["mean"] >= -BOUNDS[m] for m in BOUNDS)
        row["real_size_seconds_per_image"] = by_name[0][name].get("real_size_seconds_per_image")
        rows.append(row)
    return {"runs": [str(r) for r in runs], "seeds": seeds, "n_test": results[0]["n_test"],
            "model_dir": results[0]["model_dir"], "bounds": BOUNDS, "settings": rows}  # fmt: skip


def across_seeds_table(summary: dict) -> str:
    """The Markdown of seeds.md: one row per setting, means ± SD over the seeds."""
    b = summary["bounds"]
    lines = [
        f"Quality map across img2img seeds {summary['seeds']}: {summary['n_test']} test images of "
        f"{summary['model_dir']}. Change: the setting's score minus the reference's at the same seed, mean ± SD "
        f"over the seeds. Within: CLIP 2-way at most {b['clip_2way']}, PixCorr and SSIM at most {b['pixcorr']} "
        "below the reference (per seed: how many seeds; mean: the mean change). Real size: the first run's estimate "
        "(when it was given a times file).",
        "",
        "| setting | sampling | PixCorr | SSIM | CLIP 2-way (ours) | Δ PixCorr | Δ SSIM | Δ CLIP 2-way | "
        "seeds within | mean within | real-size s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["settings"]:
        cells = [f"{r[m]['mean']:.3f} ± {r[m]['sd']:.3f}" for m in ("pixcorr", "ssim", "clip_2way")]
        changes = [f"{r[m + '_change']['mean']:+.4f} ± {r[m + '_change']['sd']:.4f}" for m in ("pixcorr", "ssim", "clip_2way")]  # fmt: skip
        within = "reference" if r["name"] == REFERENCE else "✓" if r["mean_within"] else "✗"
        seconds = r["real_size_seconds_per_image"]
        real = "–" if seconds is None else f"{seconds:.1f}"
        lines.append(
            f"| {r['name']} | {r['sampling']} | {' | '.join(cells)} | {' | '.join(changes)} | "
            f"{r['seeds_within']}/{len(summary['seeds'])} | {within} | {real} |"
        )
    return "\n".join(lines) + "\n"
