"""The public runtime API (`brainrecon.runtime.Reconstructor`, `RuntimeOptions`) on the tiny exported two-stage model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from brainrecon.manifest import MANIFEST_FILE, describe_file, load_manifest, write_manifest
from brainrecon.runtime import CheckedInputs, Reconstructor, RuntimeOptions
from brainrecon.runtime.stage2 import unet_session_count
from tests.fixtures import FAST_STEPS


@pytest.fixture(scope="module")
def rec(tiny2):
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1)) as r:
        yield r


def fast(rec: Reconstructor, **changes):
    return dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS, **changes)


def test_options_are_validated_when_made():
    for bad in ({"engine": "onnx"}, {"precision": "int8"}, {"device": "gpu"}, {"threads": 0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            RuntimeOptions(**bad)
    with pytest.raises(InputError, match="threads"):
        RuntimeOptions(threads=True)


def test_reconstruct_is_check_then_run_checked_and_reports_what_ran(rec, betas):
    out = rec.reconstruct(betas, fast(rec))
    assert rec.stage == 2 and rec.n_voxels == betas.shape[1]
    assert out.images is out.final_images and out.final_images.dtype == np.uint8
    assert out.stage1_images.shape[0] == out.final_images.shape[0] == len(betas)
    assert out.providers["unet"] == ["CPUExecutionProvider"] and out.renormalized == {
        "stage1": True,
        "clip": True,
    }
    assert set(out.timings) >= {"stage1_s", "clip_s", "unet_s", "total_s", "stage1_split"}
    assert set(out.timings["stage1_split"]) >= {"regressor_s", "renormalize_s", "decoder_s"}
    checked = rec.check(betas, fast(rec))
    assert checked.betas.dtype == np.float32 and checked.seeds is None and checked.sampling == fast(rec)
    direct = rec.run_checked(checked)
    np.testing.assert_array_equal(out.final_images, direct.final_images)
    np.testing.assert_array_equal(out.stage1_images, direct.stage1_images)
    with pytest.raises(InputError, match="what Reconstructor.check returned"):
        rec.run_checked(betas)


def test_per_row_seeds_do_not_depend_on_batching_and_match_single_trials(rec, betas):
    rows = betas[:4]
    seeds = [11, 12, 13, 14]
    together = rec.reconstruct(rows, fast(rec), seeds=seeds, renormalize=False)
    apart = rec.reconstruct(rows, fast(rec), seeds=seeds, renormalize=False, batch_size=1)
    np.testing.assert_array_equal(together.final_images, apart.final_images)
    for i, seed in enumerate(seeds):  # a single row with its seed is recon-infer of that trial with --seed
        single = rec.reconstruct(rows[i : i + 1], fast(rec, seed=seed))
        np.testing.assert_allclose(
            single.final_images.astype(int), together.final_images[i : i + 1].astype(int), atol=1
        )
    other = rec.reconstruct(rows, fast(rec), seeds=[21, 12, 13, 14], renormalize=False)
    assert not np.array_equal(other.final_images[0], together.final_images[0])  # row 0's seed changed
    np.testing.assert_array_equal(other.final_images[1:], together.final_images[1:])  # the others did not


def test_checks_of_several_requests_run_as_one_call(rec, betas):
    """A server checks each request once and runs the valid ones together (serve/triton_requests.py):
    `CheckedInputs.concat` of per-request checks gives the images of one call on all the rows (per-row seeds, no
    re-normalisation: a row does not depend on its neighbours); parts with other settings are refused."""
    parts = [
        rec.check(betas[:1], fast(rec), seeds=[5], renormalize=False),
        rec.check(betas[1:4], fast(rec), seeds=[6, 7, 8], renormalize=False),
    ]
    together = rec.run_checked(CheckedInputs.concat(parts))
    whole = rec.reconstruct(betas[:4], fast(rec), seeds=[5, 6, 7, 8], renormalize=False)
    np.testing.assert_array_equal(together.final_images, whole.final_images)
    for other in (
        rec.check(betas[1:4], fast(rec, seed=9), seeds=[6, 7, 8], renormalize=False),  # another sampling
        rec.check(betas[1:4], fast(rec), renormalize=False),  # no per-row seeds
        rec.check(betas[1:4], fast(rec), seeds=[6, 7, 8], renormalize=False, batch_size=2),
    ):
        with pytest.raises(InputError, match="checked inputs"):
            CheckedInputs.concat([parts[0], other])
    with pytest.raises(InputError, match="renormalize=False"):
        CheckedInputs.concat([rec.check(betas[:2], fast(rec))] * 2)


def test_inputs_are_checked_before_any_model_runs(rec, betas):
    calls = []
    rec.pipeline.stage1.regressor.run = lambda inputs: calls.append(1)  # instance attribute, this test only
    try:
        cases = [
            (betas[:, :-1], "voxels"),
            (betas.astype(np.int32), "dtype"),
            (betas[0], "rank 2"),
            (np.where(np.arange(betas.size).reshape(betas.shape) == 7, np.nan, betas), "NaN"),
        ]
        for bad, match in cases:
            with pytest.raises(InputError, match=match):
                rec.reconstruct(bad)
        with pytest.raises(InputError, match="seeds"):
            rec.reconstruct(betas, seeds=[1, 2])
        with pytest.raises(ConfigError, match="mix_ratio"):
            rec.reconstruct(betas, dataclasses.replace(rec.sampling, mix_ratio=0.3))
        with pytest.raises(ConfigError, match="vae_scale_factor"):
            rec.reconstruct(betas, dataclasses.replace(rec.sampling, vae_scale_factor=1.0))
        assert calls == []
    finally:
        del rec.pipeline.stage1.regressor.run


def test_open_parses_the_manifest_once(tiny2, monkeypatch):
    import brainrecon.manifest as manifest

    reads = []
    real = manifest.read_json

    def counting(path, what="JSON file"):
        if Path(path).name == MANIFEST_FILE:
            reads.append(path)
        return real(path, what)

    monkeypatch.setattr(manifest, "read_json", counting)
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1)) as rec:
        rec.load_betas(tiny2["prep"] / "test_betas.npy")
    assert len(reads) == 1


def test_close_releases_every_session(tiny2, betas):
    rec = Reconstructor.open(tiny2["model"], RuntimeOptions(threads=2))
    workers = rec.pipeline.unet_workers
    rec.close()
    assert all(w.session is None for w in [*workers, *rec.pipeline.backends.values()])
    with pytest.raises(Exception, match="closed"):
        rec.reconstruct(betas)


def test_unet_sessions_are_bounded_by_the_memory_budget(tiny2):
    gb = 2**30
    assert unet_session_count(16, int(3.4 * gb), 64 * gb) == 9  # a VD UNet in fp32 on a 16-core, 128 GB box
    assert unet_session_count(16, int(3.4 * gb), 4 * gb) == 1  # never fewer than one
    assert unet_session_count(2, 1000, 64 * gb) == 2  # never more than the cores
    unet = load_manifest(tiny2["model"]).find("onnx", "unet_kv", "fp32")  # the step the runtime loads
    opts = RuntimeOptions(threads=2, memory_budget_bytes=3 * unet.size)  # room for 1.5 sessions
    with Reconstructor.open(tiny2["model"], opts) as rec:
        assert len(rec.pipeline.unet_workers) == 1
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=2)) as rec:
        assert len(rec.pipeline.unet_workers) == 2


@pytest.mark.parametrize("key", ["mix_ratio", "vae_scale_factor"])
def test_a_baked_in_constant_that_disagrees_with_stage2_json_is_refused(tiny2, tmp_path, key):
    """stage2.json says one value, the exported graphs another: the runtime must not sample with either."""
    copy = tmp_path / "model"
    shutil.copytree(tiny2["model"], copy)
    summary_path = copy / "stage2" / "stage2.json"
    summary = json.loads(summary_path.read_text())
    summary["sampling"][key] = summary["sampling"][key] * 0.5
    summary_path.write_text(json.dumps(summary))
    manifest = load_manifest(copy)
    write_manifest(
        copy,
        [
            *[a for a in manifest.artifacts if a.path != "stage2/stage2.json"],
            describe_file(copy, "stage2/stage2.json", "data"),
        ],
        merge=False,
    )
    with pytest.raises(ConfigError, match=f"expected {key}"):
        Reconstructor.open(copy, RuntimeOptions(threads=1))


def test_the_readme_python_example_runs(tiny2):
    """The README's API example, on the tiny model (its paths swapped for the fixture's)."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"data/subj01/test_betas.npy"', repr(str(tiny2["prep"] / "test_betas.npy")))
    code = code.replace('"engines/subj01"', repr(str(tiny2["model"])))
    code = code.replace(
        'RuntimeOptions(engine="ort", precision="fp32")', 'RuntimeOptions(engine="ort", threads=1)'
    )
    fast = f"num_inference_steps={FAST_STEPS}"  # the full schedule takes a minute on the tiny model
    code = code.replace(
        "rec.reconstruct(betas)", f"rec.reconstruct(betas, rec.sampling.with_overrides({fast}))"
    )
    code = code.replace(
        "with_overrides(guidance_scale=3.0, seed=1)", f"with_overrides(guidance_scale=3.0, seed=1, {fast})"
    )
    code = code.replace("seeds=[7, 8, 9, 10],", f"rec.sampling.with_overrides({fast}), seeds=[7, 8, 9, 10],")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].images.shape[0] == len(scope["betas"]) and scope["rows"].images.shape[0] == 4
    assert scope["guided3"].sampling.guidance_scale == 3.0 and scope["guided3"].sampling.seed == 1
