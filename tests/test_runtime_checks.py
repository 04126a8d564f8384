"""Bad runtime inputs are refused up front, and what a run is asked for is what it does.

- every `SamplingConfig` field refuses NaN, ±Inf, out-of-range values and wrong types (a check written as
  `x < lo or x > hi` lets NaN through: comparisons with NaN are False);
- `Reconstructor.reconstruct` refuses bad seeds and bad betas with one line before any model runs: the progress
  callback, called after every model call, is never called (a check that only the noise generator makes would
  fail after stage 1, CLIP and the VAE ran);
- a stage-1 reconstructor refuses seeds: stage 1 draws no noise (the exported VDVAE decoder takes the prior
  means after layer K), so seeds would be ignored silently;
- a guidance_scale override changes the images, and equals a run of the same model whose fitted `stage2.json`
  says that guidance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from brainrecon.manifest import describe_file, load_manifest, write_manifest
from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.sampling import SEED_MAX, SamplingConfig, check_seeds
from tests.fixtures import FAST_STEPS

FLOAT_FIELDS = ("strength", "guidance_scale", "eta", "vae_scale_factor", "mix_ratio")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5", True, None])
def test_every_float_sampling_field_refuses_non_finite_and_non_numbers(field, value):
    with pytest.raises(ConfigError, match=f"sampling: expected .*{field}") as e:
        SamplingConfig(**{field: value})
    one_line(e)


@pytest.mark.parametrize(
    "field, value",
    [
        ("strength", -0.01),
        ("strength", 1.01),
        ("mix_ratio", 1.5),
        ("vae_scale_factor", 0.0),
        ("eta", 0.5),
        ("num_inference_steps", 0),
        ("num_inference_steps", 8.0),
        ("seed", -1),
        ("seed", SEED_MAX + 1),
        ("seed", 1.0),
        ("seed", True),
    ],
)
def test_sampling_fields_out_of_range_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"sampling: expected .*{field}") as e:
        SamplingConfig(**{field: value})
    one_line(e)


def test_sampling_accepts_the_range_ends():
    SamplingConfig(strength=0.0, mix_ratio=1.0, guidance_scale=-1.0, seed=SEED_MAX, num_inference_steps=1)
    SamplingConfig(strength=np.float32(1.0), seed=np.int64(3))


@pytest.mark.parametrize(
    "seeds, found",
    [
        ([0, -1], "-1 at row 1"),
        (np.array([2**63, 1], np.uint64), "9223372036854775808 at row 0"),
        ([2**64, 1], "object of shape (2,)"),
        ([1, 2, 3], "int64 of shape (3,)"),
        ([1.0, 2.0], "float64 of shape (2,)"),
        ([True, False], "bool of shape (2,)"),
        ([[1], [2, 3]], "a ragged list"),
        ("12", "<U2 of shape ()"),
    ],
)
def test_check_seeds(seeds, found):
    with pytest.raises(InputError, match="seeds: expected 2 integers in") as e:
        check_seeds(seeds, 2)
    assert one_line(e).endswith(f"found {found}")


def test_check_seeds_returns_int64():
    seeds = check_seeds(np.array([SEED_MAX, 0], np.uint64), 2)
    assert seeds.dtype == np.int64 and seeds.tolist() == [SEED_MAX, 0]


# ----------------------------------------------------------------------------------------- the runtime API


@pytest.fixture(scope="module")
def rec(tiny2):
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1)) as r:
        yield r


@pytest.fixture(scope="module")
def fast(rec) -> SamplingConfig:
    return dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS)


def _with(betas: np.ndarray, row: int, voxel: int, value: float, dtype=np.float32) -> np.ndarray:
    out = betas.astype(dtype)
    out[row, voxel] = value
    return out


BAD_BETAS = {  # case -> (betas from the good ones, words of the one-line error)
    "float64 1e300": (lambda b: _with(b, 2, 5, 1e300, np.float64), "voxel 5: 1e+300, beyond float32's range"),
    "float64 -1e39": (lambda b: _with(b, 0, 1, -1e39, np.float64), "beyond float32's range"),
    "NaN": (
        lambda b: _with(b, 3, 7, math.nan),
        "finite betas, found 1 NaN/Inf values (first at row 3, voxel 7)",
    ),
    "Inf float64": (
        lambda b: _with(b, 1, 0, math.inf, np.float64),
        "1 NaN/Inf values (first at row 1, voxel 0)",
    ),
    "int32": (lambda b: b.astype(np.int32), "float32 or float64 z-scored betas, found dtype int32"),
    "object": (lambda b: b.astype(object), "found dtype object"),
    "complex": (lambda b: b.astype(np.complex64), "found dtype complex64"),
    "one voxel short": (lambda b: b[:, :-1], "voxels per row (the model's mask), found"),
    "0 rows": (lambda b: b[:0], "at least one row of betas, found none"),
    "3-D": (lambda b: b[None], "(rank 2), found shape (1, "),
    "1-D": (lambda b: b[0], "(rank 2), found shape ("),
    "a list": (lambda b: b.tolist(), "a numpy array of z-scored betas, found list"),
}


@pytest.mark.parametrize("case", list(BAD_BETAS))
def test_bad_betas_are_refused_before_any_model_runs(rec, fast, betas, case):
    make, words = BAD_BETAS[case]
    calls = []
    with pytest.raises(InputError) as e:
        rec.reconstruct(make(betas), fast, progress=lambda *step: calls.append(step))
    assert words in one_line(e) and calls == []


BAD_SEEDS = {  # case -> (seeds for 4 rows, words of the one-line error)
    "negative seed": ([1, 2, -3, 4], "found -3 at row 2"),
    "seed too large": (np.array([1, 2**63, 3, 4], np.uint64), f"found {2**63} at row 1"),
    "too few seeds": ([1, 2, 3], "found int64 of shape (3,)"),
    "non-integer seeds": ([1.5, 2.0, 3.0, 4.0], "found float64 of shape (4,)"),
}


@pytest.mark.parametrize("case", list(BAD_SEEDS))
def test_bad_seeds_are_refused_before_any_model_runs(rec, fast, betas, case):
    """With the seed check missing from `check`, the noise generator refuses a negative seed only after stage 1,
    CLIP and the VAE encoder ran (progress was called), and takes 2**63 as it is."""
    seeds, words = BAD_SEEDS[case]
    calls = []
    with pytest.raises(InputError, match="seeds: expected 4 integers in") as e:
        rec.reconstruct(betas[:4], fast, seeds=seeds, renormalize=False, progress=lambda *s: calls.append(s))
    assert words in one_line(e) and calls == []


def test_bad_sampling_overrides_are_refused_before_any_model_runs(rec, fast, betas):
    for field in ("strength", "guidance_scale"):
        with pytest.raises(ConfigError, match=field):
            rec.reconstruct(betas, fast.with_overrides(**{field: math.nan}))
    with pytest.raises(
        InputError, match="sampling: expected a brainrecon.sampling.SamplingConfig, found dict"
    ):
        rec.reconstruct(betas, {"strength": 0.5})


def test_stage1_reconstructor_refuses_seeds_and_sampling(tiny2, betas):
    """Stage 1 is deterministic (prior means after layer K, DmoL mode; shown here: two runs are equal bit for bit,
    the same sessions run twice), so seeds cannot do anything: refused, not silently ignored."""
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1), stage=1) as rec1:
        first, second = rec1.reconstruct(betas[:4]), rec1.reconstruct(betas[:4])
        np.testing.assert_array_equal(first.images, second.images)
        calls = []
        with pytest.raises(InputError) as e:
            rec1.reconstruct(betas[:4], seeds=[1, 2, 3, 4], progress=lambda *s: calls.append(s))
        assert one_line(e) == (
            "seeds: expected None for a stage-1 model (deterministic: it draws no noise), found per-row seeds"
        )
        with pytest.raises(InputError, match="sampling: expected None for a stage-1 model"):
            rec1.reconstruct(betas[:4], SamplingConfig(), progress=lambda *s: calls.append(s))
        assert calls == []


def test_guidance_override_is_used_and_equals_a_model_fitted_with_it(tiny2, rec, fast, betas, tmp_path):
    """`guidance_scale=g` per run changes the images, and gives those of a copy of the model whose
    `stage2/stage2.json` says g (the same ONNX files, loaded again, one thread each). Tolerances: the copy runs the
    same computation in separately created sessions, so ≤ 1 grey level (uint8 rounding of float32 noise; measured
    0). An override that is reported but not used changes nothing (the same sessions run twice: equal bit for
    bit); the tiny random UNet responds weakly to guidance, so g = 30 against the fitted 7.5 (measured: mean 3.7
    grey levels, 63 % of pixels moved by more than 1; required: 30 %)."""
    rows = betas[:3]
    guidance = 30.0
    assert not math.isclose(guidance, fast.guidance_scale)
    fitted = rec.reconstruct(rows, fast)
    overridden = rec.reconstruct(rows, fast.with_overrides(guidance_scale=guidance))
    assert overridden.sampling.guidance_scale == guidance
    np.testing.assert_array_equal(overridden.stage1_images, fitted.stage1_images)  # stage 1 has no guidance
    change = np.abs(overridden.final_images.astype(int) - fitted.final_images.astype(int))
    assert (change > 1).mean() > 0.3, (change.mean(), (change > 1).mean())

    copy = tmp_path / "model"
    shutil.copytree(tiny2["model"], copy)
    summary_path = copy / "stage2" / "stage2.json"
    summary = json.loads(summary_path.read_text())
    summary["sampling"]["guidance_scale"] = guidance
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
    with Reconstructor.open(copy, RuntimeOptions(threads=1)) as refitted:
        assert refitted.sampling.guidance_scale == guidance
        native = refitted.reconstruct(
            rows, dataclasses.replace(refitted.sampling, num_inference_steps=FAST_STEPS)
        )
    diff = np.abs(native.final_images.astype(int) - overridden.final_images.astype(int))
    assert diff.max() <= 1, diff.max()
