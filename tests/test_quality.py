"""The quality map (train/experiments/quality.py, `recon-eval quality`) on the tiny exported two-stage subject
(conftest `tiny2`, 10 test images), every setting at a few steps. The runtime is deterministic on the CPU, so a
setting identical to the reference must give exactly its numbers (and a difference of 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from tests.fixtures import FAST_STEPS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPECS = [
    ("paper", {"num_inference_steps": FAST_STEPS}),  # the fitted sampling at FAST_STEPS: the reference
    ("same", {"num_inference_steps": FAST_STEPS}),
    ("short", {"num_inference_steps": 4, "strength": 0.5, "guidance_scale": 3.0}),
    ("dpm", {"sampler": "dpmpp_2m", "num_inference_steps": 6, "guidance_stop": 0.5}),
]
# hand-made per-call seconds: the estimate must be exactly calls x these
TIMES = {
    "machine": "hand-made",
    "unet_rows_s": {"ort fp32": {"1": 0.5, "2": 0.875}},
    "vae_encode_s": 1.5,
    "vae_decode_s": {"ort fp32": 2.0},
    "stage1_s": 0.25,
}
ROW_FIELDS = {
    "name",
    "overrides",
    "sampling",
    "options",
    "ran",
    "n",
    "steps",
    "guided_steps",
    "unguided_steps",
    "unet_rows_per_image",
    "step_kinds",
    "unet_calls",
    "unet_rows",
    "batch_sizes",
    "seconds_per_image",
    "unet_seconds_per_image",
    "timings",
    "pixcorr",
    "ssim",
    "clip_2way",
    "vs_reference",
    "drop",
    "within_bounds",
    "real_size_seconds_per_image",
}


def _times_file(folder: Path) -> Path:
    path = folder / "times.json"
    path.write_text(json.dumps(TIMES))
    return path


@pytest.fixture(scope="module")
def quality(tiny2, tmp_path_factory) -> tuple[dict, Path]:
    from brainrecon.train.experiments.quality import quality_map

    out = tmp_path_factory.mktemp("quality")
    times = _times_file(out)
    return quality_map(
        tiny2["model"], tiny2["prep"], out / "map", SPECS, real_size_times=times, progress=False
    ), out / "map"


def _rows(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in result["settings"]}


def test_reference_is_first_and_its_difference_from_itself_is_zero(quality):
    result, _ = quality
    assert [r["name"] for r in result["settings"]] == [name for name, _ in SPECS]
    paper = result["settings"][0]
    assert result["reference"] == "paper" and paper["sampling"]["num_inference_steps"] == FAST_STEPS
    assert paper["sampling"]["sampler"] == "ddim" and paper["sampling"]["guidance_stop"] == 1.0
    assert paper["options"]["engine"] == "ort" and paper["options"]["precision"] == "fp32"
    assert paper["vs_reference"] == {"mean_abs": 0.0, "max_abs": 0, "pixcorr": 1.0}
    assert paper["drop"] == {"clip_2way": 0.0, "pixcorr": 0.0, "ssim": 0.0} and paper["within_bounds"]


def test_a_setting_identical_to_the_reference_gives_its_numbers(quality):
    rows = _rows(quality[0])
    same, paper = rows["same"], rows["paper"]
    for key in (
        "pixcorr",
        "ssim",
        "clip_2way",
        "steps",
        "guided_steps",
        "unet_rows",
        "unet_calls",
        "sampling",
    ):
        assert same[key] == paper[key], key
    assert same["vs_reference"] == {"mean_abs": 0.0, "max_abs": 0, "pixcorr": 1.0}
    assert same["within_bounds"]


def test_other_settings_differ_and_count_their_unet_steps(quality):
    rows = _rows(quality[0])
    n = rows["paper"]["n"]
    # strength 0.75 x 8 -> 6 steps, all guided; 0.5 x 4 -> 2; DPM-Solver++ 0.75 x 6 -> 4, ceil(0.5 x 4) = 2 guided
    expected = {"paper": (6, 6), "short": (2, 2), "dpm": (4, 2)}
    for name, (steps, guided) in expected.items():
        r = rows[name]
        assert (r["steps"], r["guided_steps"], r["unguided_steps"]) == (steps, guided, steps - guided), name
        assert r["unet_rows_per_image"] == 2 * guided + (steps - guided)
        assert r["unet_rows"] == n * r["unet_rows_per_image"]
        assert r["unet_calls"] >= steps and r["unet_calls"] % steps == 0  # every image chunk takes every step
        assert 0 < r["unet_seconds_per_image"] <= r["seconds_per_image"]
    for name in ("short", "dpm"):
        assert rows[name]["vs_reference"]["max_abs"] > 0, name


def test_the_json_has_every_field(quality):
    result, out = quality
    assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(result))
    assert result["complete"] and result["n_test"] == 10 and result["paper_metrics"] is None
    assert {"date", "cpu", "cores", "affinity", "cpu_flags", "loadavg_1m", "versions"} <= set(
        result["machine"]
    )
    assert result["real_size_times"]["unet_rows_s"] == TIMES["unet_rows_s"]
    assert {"clip_2way", "pixcorr", "ssim", "rule"} <= set(result["bounds"])
    for row in result["settings"]:
        assert set(row) == ROW_FIELDS, row["name"]
        assert {"total_s", "unet_s", "vae_decode_s"} <= set(row["timings"])
        assert row["ran"]["engine"] == "ort" and row["ran"]["precision"] == "fp32"
        assert -1 <= row["pixcorr"] <= 1 and 0 <= row["clip_2way"] <= 1 and row["n"] == 10


def test_the_within_bounds_marks_agree_with_the_numbers(quality):
    from brainrecon.train.experiments.quality import BOUNDS

    result, out = quality
    reference = result["settings"][0]
    table = (out / "quality.md").read_text()
    kept = []
    for row in result["settings"]:
        drop = {m: round(reference[m] - row[m], 4) for m in BOUNDS}
        assert row["drop"] == drop
        assert row["within_bounds"] == all(drop[m] <= BOUNDS[m] for m in BOUNDS)
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row['name']} |"))
        mark = "reference" if row is reference else "✓" if row["within_bounds"] else "✗"
        assert line.endswith(f"| {mark} |"), line
        if row is not reference and row["within_bounds"]:
            kept.append(row["name"])
    assert f"Within the bounds of paper: {', '.join(kept) or 'none'}." in table


def test_within_bounds_is_a_drop_of_at_most_the_bound():
    from brainrecon.train.experiments.quality import within_bounds

    reference = {"clip_2way": 0.8, "pixcorr": 0.3, "ssim": 0.4}
    assert within_bounds({"clip_2way": 0.79, "pixcorr": 0.28, "ssim": 0.38}, reference)["within_bounds"]
    assert within_bounds({"clip_2way": 0.9, "pixcorr": 0.5, "ssim": 0.5}, reference)[
        "within_bounds"
    ]  # better
    for worse in ({"clip_2way": 0.7899}, {"pixcorr": 0.2799}, {"ssim": 0.3799}):
        assert not within_bounds({**reference, **worse}, reference)["within_bounds"], worse


def test_the_real_size_estimate_is_calls_times_per_call_seconds(quality):
    from brainrecon.train.experiments.quality import real_size_seconds, step_kinds

    others = TIMES["vae_encode_s"] + TIMES["vae_decode_s"]["ort fp32"] + TIMES["stage1_s"]
    for row in quality[0]["settings"]:
        expected = row["guided_steps"] * 0.875 + row["unguided_steps"] * 0.5 + others
        assert row["real_size_seconds_per_image"] == round(expected, 3), row["name"]
    guided_only, stopped = step_kinds(37, 37), step_kinds(15, 10)
    assert real_size_seconds(TIMES, "ort fp32", guided_only) == 37 * 0.875 + 3.75
    assert real_size_seconds(TIMES, "ort fp32", stopped) == 10 * 0.875 + 5 * 0.5 + 3.75


def test_deepcache_steps_are_timed_at_the_shallow_graphs_seconds(tmp_path):
    from brainrecon.train.experiments.quality import real_size_seconds, step_kinds

    """Every cache_interval-th step (the first included) is full, the others shallow, guided or not; the estimate
    prices them at unet_rows_s and unet_shallow_rows_s; a DeepCache setting needs the shallow times."""
    from brainrecon.sampling import SamplingConfig
    from brainrecon.train.experiments.quality import read_real_size_times, resolve_settings

    kinds = step_kinds(6, 3, 2)  # steps 0 1 2 guided, 3 4 5 not; 0 2 4 full
    assert kinds == {"guided_full": 2, "guided_shallow": 1, "unguided_full": 1, "unguided_shallow": 2}
    assert step_kinds(6, 3) == {
        "guided_full": 3,
        "guided_shallow": 0,
        "unguided_full": 3,
        "unguided_shallow": 0,
    }
    times = TIMES | {"unet_shallow_rows_s": {"ort fp32": {"1": 0.125, "2": 0.25}}}
    assert real_size_seconds(times, "ort fp32", kinds) == 2 * 0.875 + 0.25 + 0.5 + 2 * 0.125 + 3.75
    settings = resolve_settings([("cache", {"cache_interval": 2})], SamplingConfig())
    path = tmp_path / "times.json"
    path.write_text(json.dumps(TIMES))
    with pytest.raises(InputError, match=r'unet_shallow_rows_s\["ort fp32"\] \(setting .cache., DeepCache\)'):
        read_real_size_times(path, settings)
    path.write_text(json.dumps(times))
    assert read_real_size_times(path, settings)["unet_shallow_rows_s"] == times["unet_shallow_rows_s"]


def test_the_files_are_written(quality):
    result, out = quality
    for path in [
        out / "quality.png",
        out / "quality_sheet.png",
        *(out / "sheets" / f"{n}.png" for n, _ in SPECS),
    ]:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert "| setting |" in (out / "quality.md").read_text()


# ---------------------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "text",
    [
        "x=steps=8",  # not a field
        "x=num_inference_steps=8.5",
        "x=guidance_scale=high",
        "x=allow_cpu_fallback=yes",
        "x=num_inference_steps",
        "x=num_inference_steps=8,num_inference_steps=9",
        "no-value",
        "a/b=strength=0.5",
    ],
)
def test_a_bad_setting_fails_in_one_line_when_parsed(text):
    from brainrecon.train.experiments.quality import parse_setting

    with pytest.raises(ConfigError) as exc:
        parse_setting(text)
    assert "\n" not in str(exc.value)


def test_parse_setting_types_the_values_as_the_fields():
    from brainrecon.train.experiments.quality import parse_setting

    assert parse_setting("fast=sampler=dpmpp_2m,num_inference_steps=20,guidance_stop=0.5,threads=2") == (
        "fast",
        {"sampler": "dpmpp_2m", "num_inference_steps": 20, "guidance_stop": 0.5, "threads": 2},
    )
    assert parse_setting("plain=") == ("plain", {})
    assert parse_setting("s=strength=1,allow_cpu_fallback=true") == (
        "s",
        {"strength": 1.0, "allow_cpu_fallback": True},
    )


@pytest.mark.parametrize(
    ("specs", "times", "match"),
    [
        ([("x", {"strength": 2.0})], None, "setting 'x': sampling: expected strength in"),
        ([("x", {"sampler": "euler"})], None, "setting 'x': sampling: expected sampler"),
        ([("x", {"engine": "openvino", "precision": "fp16"})], None, "setting 'x': precision: expected"),
        ([("x", {"mix_ratio": 0.5})], None, "setting 'x': sampling: expected mix_ratio"),  # baked in
        ([("x", {}), ("x", {"seed": 1})], None, "expected distinct names"),
        ([("x", {"engine": "openvino", "precision": "bf16"})], TIMES, 'unet_rows_s\\["openvino bf16"\\]'),
    ],
)
def test_a_bad_setting_fails_in_one_line_before_any_model_runs(
    tiny2, tmp_path, monkeypatch, specs, times, match
):
    from brainrecon.runtime.api import Reconstructor
    from brainrecon.train.experiments.quality import quality_map

    def no_run(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(Reconstructor, "run_checked", no_run)
    monkeypatch.setattr(Reconstructor, "reconstruct", no_run)
    with pytest.raises((ConfigError, InputError), match=match) as exc:
        quality_map(
            tiny2["model"],
            tiny2["prep"],
            tmp_path / "out",
            specs,
            real_size_times=_times_file(tmp_path) if times else None,
            progress=False,
        )
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_read_settings_keeps_the_order_and_refuses_unknown_keys(tmp_path):
    from brainrecon.train.experiments.quality import read_settings

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"b": {"num_inference_steps": 20}, "a": {"engine": "openvino"}}))
    assert read_settings(path) == [("b", {"num_inference_steps": 20}), ("a", {"engine": "openvino"})]
    path.write_text(json.dumps({"b": {"steps": 20}}))
    with pytest.raises(ConfigError, match="found steps"):
        read_settings(path)


# ---------------------------------------------------------------------------------------------------- the command


def _cli(*args, command: str = "quality") -> subprocess.CompletedProcess:
    cmd = [Path(sys.executable).parent / "recon-eval", command, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


def test_the_command_exits_0_and_writes_every_file(tiny2, tmp_path):
    out = tmp_path / "q"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"short": {"num_inference_steps": 4}}))
    weights = (
        tmp_path / "weights"
    )  # no network files: the papers' PixCorr and SSIM, the others named as missing
    weights.mkdir()
    proc = _cli(
        "--model-dir", tiny2["model"], "--data", tiny2["prep"], "--out", out, "--images", 4,
        "--settings", settings, "--setting", f"paper=num_inference_steps={FAST_STEPS}",
        "--setting", "cfg3=num_inference_steps=4,guidance_scale=3", "--real-size-times", _times_file(tmp_path),
        "--weights", weights,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "quality.json").read_text())
    assert [r["name"] for r in result["settings"]] == ["paper", "short", "cfg3"] and result["n_test"] == 4
    for name in ("quality.json", "quality.md", "quality.png", "quality_sheet.png", "sheets/paper.png",
                 "sheets/short.png", "sheets/cfg3.png"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "real-size s/image" in proc.stdout and "| cfg3 |" in proc.stdout
    assert "Brain-Diffuser's eight metrics" in proc.stdout and "not computed: needs" in proc.stdout
    assert result["paper_metrics"]["computed"] == ["pixcorr", "ssim"]
    for row in result["settings"]:
        assert row["paper"] == {"pixcorr": row["pixcorr"], "ssim": row["ssim"]}, row["name"]


def test_seed_replaces_every_settings_seed_but_a_named_one(tiny2, quality, tmp_path):
    """--seed: the reference and the settings without a seed of their own draw other img2img noise (other images
    than the fitted seed's); a setting that names its seed keeps it."""
    from brainrecon.train.experiments.quality import quality_map

    specs = [SPECS[0], ("own", {"num_inference_steps": FAST_STEPS, "seed": 0})]
    result = quality_map(
        tiny2["model"], tiny2["prep"], tmp_path / "q", specs, n_images=4, progress=False, seed=7
    )
    rows = _rows(result)
    assert rows["paper"]["sampling"]["seed"] == 7 and rows["own"]["sampling"]["seed"] == 0
    fitted_seed = _rows(quality[0])["paper"]["sampling"]["seed"]
    assert fitted_seed != 7
    assert rows["own"]["vs_reference"]["max_abs"] > 0  # seed 0 vs seed 7: other noise, other pixels


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("fast=num_inference_steps=0", "setting 'fast': sampling: expected num_inference_steps >= 1"),
        ("fast=sampler=euler", "setting 'fast': sampling: expected sampler one of"),
        (
            "fast=mix_ratio=0.5",
            "setting 'fast': sampling: expected mix_ratio 0.6 (baked into",
        ),  # the folder's
    ],
)
def test_the_command_refuses_a_bad_setting_in_one_line(tiny2, tmp_path, setting, message):
    proc = _cli(
        "--model-dir", tiny2["model"], "--data", tiny2["prep"], "--out", tmp_path / "q", "--setting", setting
    )
    assert proc.returncode == 1 and not (tmp_path / "q").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_across_seeds_averages_the_change_from_each_seeds_reference(tiny2, tmp_path, monkeypatch):
    """recon-eval quality-seeds: the change of a setting is taken against the reference of the same seed and
    averaged; a setting missing from one map is left out; a partial map or a repeated seed is refused."""
    from brainrecon.train.experiments.quality import across_seeds, quality_map

    specs = [SPECS[0], SPECS[2]]
    runs = []
    for seed in (3, 4):
        quality_map(
            tiny2["model"], tiny2["prep"], tmp_path / f"s{seed}", specs, n_images=4, progress=False, seed=seed
        )
        runs.append(tmp_path / f"s{seed}")
    maps = [
        {r["name"]: r for r in json.loads((run / "quality.json").read_text())["settings"]} for run in runs
    ]
    summary = across_seeds(runs)
    assert summary["seeds"] == [3, 4] and [r["name"] for r in summary["settings"]] == ["paper", "short"]
    short = summary["settings"][1]
    for metric in ("pixcorr", "ssim", "clip_2way"):
        change = [m["short"][metric] - m["paper"][metric] for m in maps]
        assert short[f"{metric}_change"]["mean"] == pytest.approx(np.mean(change), abs=1e-4)
        assert short[f"{metric}_change"]["sd"] == pytest.approx(np.std(change, ddof=1), abs=1e-4)
    assert short["seeds_within"] == sum(m["short"]["within_bounds"] for m in maps)
    proc = _cli(*runs, "--out", tmp_path / "seeds", command="quality-seeds")
    assert proc.returncode == 0, proc.stderr
    assert "| short |" in (tmp_path / "seeds" / "seeds.md").read_text()
    with pytest.raises(InputError, match="distinct seeds"):
        across_seeds([runs[0], runs[0]])
    partial = json.loads((runs[1] / "quality.json").read_text()) | {"complete": False}
    (runs[1] / "quality.json").write_text(json.dumps(partial))
    with pytest.raises(InputError, match="a finished quality map"):
        across_seeds(runs)
