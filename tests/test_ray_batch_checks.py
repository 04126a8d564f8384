"""recon-batch (serve/ray_batch.py) refusals, all before any Ray actor starts: they run in the main venv (no
Ray needed: the driver imports Ray only once every input is checked and every output folder chosen).

Inputs: the tiny subject's exported two-stage model (tests/fixtures.py, 294 voxels) and its first 6 test
rows. Checked:
- bad betas (voxel count, NaN, float64 that overflows float32, integer dtype, a pickled object array, no rows)
  and out-of-range options (seed + row past int64, shard size past MAX_SHARD_SIZE, ...): one-line InputError,
  and no output folder created;
- an output folder whose run.json records another input, model, seed, steps, engine or precision: refused with
  a line naming that setting; with new_run a new folder `X-2`, which a rerun with those settings finds;
- a shard counts as done only with its marker and every PNG whole (non-empty, decodable, of the recorded size).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainrecon.errors import BrainReconError, InputError
from brainrecon.images import png_name
from brainrecon.serve import ray_batch
from brainrecon.serve.ray_batch import SEED_MAX, BatchOptions, plan, prepare_folder, run_batch
from tests.fixtures import exported_tiny_model, tiny_betas_file
from tests.serve_helpers import serve_venv

ROWS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def betas(tmp_path_factory) -> np.ndarray:
    return np.load(tiny_betas_file(tmp_path_factory))[:ROWS]  # (6, 294) float32


def save(folder: Path, name: str, array: np.ndarray, allow_pickle: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, array, allow_pickle=allow_pickle)
    return folder / name


def refused(files, model, out, options=None, match: str = "") -> str:
    with pytest.raises(BrainReconError, match=match) as caught:
        run_batch(files, model, out, options)
    message = str(caught.value)
    assert "\n" not in message
    assert not out.exists(), "nothing may be written before the inputs are checked"
    return message


def test_bad_betas_are_refused_before_any_actor(model, betas, tmp_path):
    out = tmp_path / "out"
    nan = betas.copy()
    nan[4, 7] = np.nan
    huge = betas.astype(np.float64)
    huge[2, 0] = 1e300  # finite as float64, inf once cast to the runtime's float32
    cases = {
        "voxels.npy": (betas[:, :200], r"expected \(N >= 1, 294\) z-scored betas .* found shape \(6, 200\)"),
        "nan.npy": (nan, r"expected finite z-scored betas .*first at row 4, voxel 7"),
        "huge.npy": (huge, r"expected finite z-scored betas \(as float32\).*first at row 2, voxel 0"),
        "int.npy": (
            (betas * 100).astype(np.int16),
            "expected float32 or float64 z-scored betas, found dtype int16",
        ),
        "empty.npy": (betas[:0], r"found shape \(0, 294\)"),
    }
    for name, (array, match) in cases.items():
        refused([save(tmp_path / "in", name, array)], model, out, match=match)
    pickled = save(tmp_path / "in", "object.npy", np.array([betas[0], None], dtype=object), allow_pickle=True)
    refused([pickled], model, out, match="Python objects in dtype")  # never unpickled
    # one bad file among good ones stops the run before anything of the good ones is written
    good = save(tmp_path / "in", "good.npy", betas)
    refused([good, tmp_path / "in" / "nan.npy"], model, out, match="nan.npy")


def test_options_out_of_range_are_refused(model, betas, tmp_path):
    good = save(tmp_path / "in", "sess01.npy", betas)
    out = tmp_path / "out"
    # seed + row must fit int64 (the per-row seeds): the last of 6 rows would need SEED_MAX + 3
    message = refused([good], model, out, BatchOptions(seed=SEED_MAX - 2), match="seed")
    assert f"seed + row <= {SEED_MAX}" in message and f"found {SEED_MAX - 2} + 5" in message
    plan([good], model, out, BatchOptions(seed=SEED_MAX - 5))  # the last row gets exactly SEED_MAX: accepted
    shutil.rmtree(out, ignore_errors=True)
    for options, match in [
        (dict(seed=SEED_MAX + 1), "--seed: expected an integer in"),
        (dict(seed=-1), "--seed"),
        (dict(shard_size=ray_batch.MAX_SHARD_SIZE + 1), r"--shard-size: expected an integer in \[1, 1024\]"),
        (dict(shard_size=0), "--shard-size"),
        (dict(rows_per_call=0), "--rows-per-call"),
        (dict(shard_timeout=0.0), "--shard-timeout: expected seconds > 0"),
        (dict(retries=-1), "--retries"),
    ]:
        with pytest.raises(InputError, match=match):
            BatchOptions(**options)


def fake_previous_run(model: Path, path: Path, out: Path, options: BatchOptions) -> Path:
    """What a finished run leaves that matters here: its folder, run.json and a PNG."""
    (job,) = plan([path], model, out, options).values()
    prepare_folder(job)
    Image.new("RGB", (64, 64)).save(job["out_dir"] / png_name("final", 0))
    return job["out_dir"]


def test_rerun_with_other_input_or_settings_is_refused_or_starts_a_new_folder(model, betas, tmp_path):
    a = save(tmp_path / "a", "sess01.npy", betas)
    changed = betas.copy()
    changed[0, 0] += 1.0
    b = save(tmp_path / "b", "sess01.npy", changed)  # the same name, other trials: issue 20's example
    out = tmp_path / "out"
    first = BatchOptions(seed=100, num_inference_steps=8)
    folder = fake_previous_run(model, a, out, first)
    assert folder == out / "sess01"
    record = json.loads((folder / "run.json").read_text())
    assert record["input"]["path"] == str(a) and record["input"]["size"] == a.stat().st_size
    assert (
        record["images"]["seed_rule"] == "trial i gets img2img seed 100 + i; no re-normalisation over the set"
    )
    assert record["images"]["sampling"]["num_inference_steps"] == 8

    other_model = tmp_path / "model-copy"
    shutil.copytree(model, other_model)
    with open(other_model / "manifest.json", "a") as f:
        f.write("\n")  # a re-exported model: the manifest's hash changes
    cases = [
        ([b], model, first, f"input {b} sha256 .* differs from run.json's .* \\(input {a}\\)"),
        ([a], model, BatchOptions(seed=101, num_inference_steps=8), "seed 101 differs from run.json's 100"),
        ([a], model, BatchOptions(seed=100), "sampling.num_inference_steps 50 differs from run.json's 8"),
        ([a], model, BatchOptions(seed=100, num_inference_steps=9), "num_inference_steps 9 differs .* 8"),
        ([a], other_model, first, "model manifest sha256 .* differs from run.json's"),
        (
            [a],
            model,
            BatchOptions(seed=100, num_inference_steps=8, precision="fp16"),
            "precision fp16 differs",
        ),
        ([a], model, BatchOptions(seed=100, num_inference_steps=8, engine="trt"), "engine trt differs"),
    ]
    for files, model_dir, options, match in cases:
        with pytest.raises(BrainReconError, match=match) as caught:
            run_batch(files, model_dir, out, options)
        assert "\n" not in str(caught.value) and "--new-run" in str(caught.value)
        assert sorted(p.name for p in out.iterdir()) == ["sess01"]  # nothing new written

    # --new-run: the other input gets sess01-2; each run then finds its own folder again
    (job,) = plan([b], model, out, BatchOptions(seed=100, num_inference_steps=8, new_run=True)).values()
    assert job["out_dir"] == out / "sess01-2"
    prepare_folder(job)
    assert next(iter(plan([b], model, out, first).values()))["out_dir"] == out / "sess01-2"
    assert next(iter(plan([a], model, out, first).values()))["out_dir"] == out / "sess01"
    # an input named like the new folder of another input: refused, not shared
    fresh = tmp_path / "out-fresh"
    fake_previous_run(model, a, fresh, first)
    other = save(tmp_path / "c", "sess01-2.npy", betas)
    with pytest.raises(
        InputError, match="expected an output folder of its own, found .*sess01-2, chosen for"
    ):
        plan([b, other], model, fresh, BatchOptions(seed=100, num_inference_steps=8, new_run=True))
    # the same bytes from another path make the same images: the folder is resumed
    moved = save(tmp_path / "moved", "sess01.npy", betas)
    assert next(iter(plan([moved], model, out, first).values()))["out_dir"] == out / "sess01"


def test_a_folder_without_run_json_is_not_adopted(model, betas, tmp_path):
    a = save(tmp_path / "a", "sess01.npy", betas)
    out = tmp_path / "out"
    (out / "sess01").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(out / "sess01" / png_name("final", 0))  # an earlier version's output
    with pytest.raises(BrainReconError, match="a folder without run.json"):
        plan([a], model, out, BatchOptions())
    (job,) = plan([a], model, out, BatchOptions(new_run=True)).values()
    assert job["out_dir"] == out / "sess01-2"


def test_a_shard_is_done_only_with_its_marker_and_whole_pngs(tmp_path):
    sizes = {"stage1": [64, 64], "final": [32, 32]}
    for trial in (0, 1):
        Image.new("RGB", (64, 64), "red").save(tmp_path / png_name("stage1", trial))
        Image.new("RGB", (32, 32), "red").save(tmp_path / png_name("final", trial))
    assert not ray_batch.shard_done(tmp_path, 0, 2)  # no marker
    ray_batch.write_json(ray_batch.marker(tmp_path, 0, 2), {"trials": [0, 2], "sizes": sizes})
    assert ray_batch.shard_done(tmp_path, 0, 2)

    whole = (tmp_path / png_name("final", 1)).read_bytes()
    damages = {
        "deleted": lambda p: p.unlink(),
        "empty": lambda p: p.write_bytes(b""),
        "truncated": lambda p: p.write_bytes(whole[: len(whole) // 2]),
        "wrong size": lambda p: Image.new("RGB", (64, 64), "red").save(p),
        "not a PNG": lambda p: Image.new("RGB", (32, 32), "red").save(p, format="JPEG"),
    }
    for what, damage in damages.items():
        damage(tmp_path / png_name("final", 1))
        assert not ray_batch.shard_done(tmp_path, 0, 2), what
        assert not ray_batch.trial_whole(tmp_path, 1, sizes), what
        assert ray_batch.trial_whole(tmp_path, 0, sizes)
        (tmp_path / png_name("final", 1)).write_bytes(whole)
        assert ray_batch.shard_done(tmp_path, 0, 2)
    ray_batch.marker(tmp_path, 0, 2).write_text("{")  # a marker cut short
    assert not ray_batch.shard_done(tmp_path, 0, 2)


@pytest.mark.serve
def test_cli_refuses_bad_input_with_one_line_and_exit_1(model, betas, tmp_path):
    venv = serve_venv()
    nan = betas.copy()
    nan[1, 3] = np.nan
    path = save(tmp_path / "in", "sess01.npy", nan)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    run = subprocess.run(
        [str(venv / "bin" / "recon-batch"), str(path), f"--model-dir={model}", f"--out={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {path}: expected finite z-scored betas (as float32), found NaN/Inf in 1 values of rows 0-5 "
        "(first at row 1, voxel 3)"
    ]
    assert not out.exists()
    big = subprocess.run(
        [
            str(venv / "bin" / "recon-batch"),
            str(path),
            f"--model-dir={model}",
            f"--out={out}",
            "--shard-size=5000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert big.returncode == 1 and "--shard-size: expected an integer in [1, 1024], found 5000" in big.stderr


def test_the_fast_preset_reaches_run_json_and_a_paper_rerun_is_refused(model, betas, tmp_path):
    """recon-batch/recon-serve --preset (cli/serve.py _sampling): the preset's fields, explicit options on top; a run
    made with the fast preset records them, and the same folder refuses a rerun with the paper's recipe."""
    from brainrecon.cli.serve import _sampling
    from brainrecon.sampling import PRESETS

    assert _sampling("paper", None, None, None) == dict.fromkeys(
        ("num_inference_steps", "sampler", "guidance_stop", "cache_interval")
    )
    assert _sampling("fast", None, None, None) == {
        "guidance_stop": None,
        "cache_interval": None,
        **PRESETS["fast"],
    }
    assert _sampling("fast", 6, None, 0.5) == {
        **PRESETS["fast"],
        "num_inference_steps": 6,
        "guidance_stop": 0.5,
        "cache_interval": None,
    }
    a = save(tmp_path / "a", "sess01.npy", betas)
    out = tmp_path / "out"
    fast = BatchOptions(seed=100, **_sampling("fast", None, None, None))
    folder = fake_previous_run(model, a, out, fast)
    recorded = json.loads((folder / "run.json").read_text())["images"]["sampling"]
    assert {k: recorded[k] for k in PRESETS["fast"]} == dict(PRESETS["fast"])
    with pytest.raises(BrainReconError, match="differs from run.json's") as caught:
        run_batch([a], model, out, BatchOptions(seed=100, **_sampling("paper", None, None, None)))
    assert "\n" not in str(caught.value)
