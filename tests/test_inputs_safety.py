"""Bad inputs that must be refused before anything is allocated or loaded, and the TensorRT engine bookkeeping
that runs without TensorRT: manifest paths confined to the model folder, NIfTI/HDF5 sizes checked against their
files, engine keys covering every byte and setting an engine is built from, engine selection and pruning by key.

Every bad file is small and written by nibabel or h5py themselves; every refusal is one line."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from brainrecon.data.nsd import check_nifti_size, image_brick, open_session, prepare_subject
from brainrecon.errors import BrainReconError, InputError
from brainrecon.export.tensorrt import superseded_engines
from brainrecon.export.triton import repository_engine
from brainrecon.manifest import (
    MANIFEST_FILE,
    Artifact,
    ManifestError,
    describe_file,
    load_manifest,
    verify_manifest,
    write_manifest,
)
from brainrecon.runtime.backends.tensorrt import (
    BuildRecipe,
    EngineKey,
    EngineMismatchError,
    MachineInfo,
    cuda_majors,
    expected_key,
    select_engine,
)
from tests.fixtures import AFFINE
from tests.fixtures import make_nsd_folder as make_fixture

H100 = MachineInfo("10.13.0", "NVIDIA H100 80GB HBM3", "9.0")
L4 = MachineInfo("10.13.0", "NVIDIA L4", "8.9")
PROFILE = {"betas": {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}}
IO = {"profile": PROFILE, "inputs": [], "outputs": [], "max_batch": 16}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, BrainReconError), message
    return message


# ----------------------------------------------------------------------------------------- manifest paths


def _model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    (model_dir / "onnx").mkdir(parents=True)
    (model_dir / "onnx/gru.fp32.onnx").write_bytes(b"graph")
    write_manifest(model_dir, [describe_file(model_dir, "onnx/gru.fp32.onnx", "onnx", model="gru")])
    return model_dir


@pytest.mark.parametrize(
    "key, bad",
    [
        ("path", "/etc/passwd"),
        ("path", "../outside.onnx"),
        ("path", "onnx/../../outside.onnx"),
        ("source", "/tmp/other.onnx"),
        ("external_data", ["../weights.data"]),
    ],
)
def test_manifest_paths_outside_the_model_folder_are_refused(tmp_path, key, bad):
    model_dir = _model_dir(tmp_path)
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["artifacts"][0][key] = bad
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as err:
        load_manifest(model_dir)
    message = one_line(err)
    shown = bad[0] if isinstance(bad, list) else bad
    assert str(model_dir / MANIFEST_FILE) in message and repr(shown) in message and "no '..'" in message


def test_manifest_symlink_leaving_the_model_folder_is_refused(tmp_path):
    model_dir = _model_dir(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not the model's")
    (model_dir / "onnx/vdvae_decoder.fp32.onnx").symlink_to(secret)
    write_manifest(
        model_dir, [describe_file(model_dir, "onnx/vdvae_decoder.fp32.onnx", "onnx", model="vdvae_decoder")]
    )
    load_manifest(model_dir)  # the text is fine: a relative path
    with pytest.raises(ManifestError) as err:
        verify_manifest(model_dir)
    message = one_line(err)
    assert "onnx/vdvae_decoder.fp32.onnx" in message and str(secret) in message
    inside = model_dir / "onnx/alias.onnx"  # a link that stays inside is a file of the folder
    inside.symlink_to(model_dir / "onnx/gru.fp32.onnx")
    write_manifest(
        model_dir, [describe_file(model_dir, "onnx/alias.onnx", "onnx", model="alias")], merge=False
    )
    verify_manifest(model_dir)


# ----------------------------------------------------------------------------------------- NIfTI sizes


def _lying_nifti(path: Path, data: np.ndarray, trials: int) -> None:
    """nibabel's own header for `data`, then its dim[4] rewritten to `trials`; the data stays as written."""
    image_class = nib.Nifti1Image if trials < 2**15 else nib.Nifti2Image  # NIfTI-1 dims are int16
    header = image_class(data, AFFINE).header.copy()
    header.set_data_shape((*data.shape[:3], trials))
    offset = header.single_vox_offset  # what nib.save writes: the data right after the header
    header.set_data_offset(offset)
    raw = (
        header.binaryblock + b"\0" * (offset - len(header.binaryblock)) + np.asfortranarray(data).tobytes("F")
    )
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


@pytest.mark.parametrize(
    "name, trials, words",
    [
        ("huge.nii.gz", 10**9, "at most"),  # NIfTI-2; beyond deflate's 1032:1: refused from the file size
        ("max.nii.gz", 2**15 - 1, "at most"),  # the most a NIfTI-1 header can claim, also beyond 1032:1
        ("short.nii.gz", 40, "room for 12 trials"),  # plausible size: the trailer disagrees, so it is counted
        ("short.nii", 40, "room for 12 trials"),
    ],
)
def test_nifti_claiming_more_trials_than_its_file_holds(tmp_path, name, trials, words):
    data = np.random.default_rng(0).integers(-900, 900, (5, 6, 4, 12)).astype(np.int16)
    path = tmp_path / name
    _lying_nifti(path, data, trials)
    with pytest.raises(InputError) as err:
        open_session(path, (5, 6, 4), None)
    message = one_line(err)
    assert f"{trials} trials of 5x6x4 int16" in message and words in message, message
    honest = tmp_path / f"honest-{name}"
    _lying_nifti(honest, data, 12)
    assert open_session(honest, (5, 6, 4), None).shape == (5, 6, 4, 12)


def test_multi_member_gzip_nifti_is_counted_not_refused(tmp_path):
    """bgzip-style files (several gzip members): the trailer holds the last member's size only."""
    data = np.arange(5 * 6 * 4 * 12, dtype=np.int16).reshape(5, 6, 4, 12)
    one = tmp_path / "one.nii"
    _lying_nifti(one, data, 12)
    raw = one.read_bytes()
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    img = nib.load(path)
    check_nifti_size(path, img)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_prepare_refuses_a_session_with_a_huge_trial_count(tmp_path):
    from brainrecon.data import layout

    fx = make_fixture(tmp_path / "nsd")
    _lying_nifti(layout.session_path(fx.root, 1, 1), fx.betas[0], 10**9)
    out = tmp_path / "prep"
    with pytest.raises(InputError) as err:
        prepare_subject(fx.root, out, progress=False)
    assert "1000000000 trials" in one_line(err) and not out.exists()


# ----------------------------------------------------------------------------------------- HDF5 sizes


@pytest.mark.parametrize(
    "chunks, compression, found",
    [
        ((1, 16, 16, 3), None, "4 of its 1000000000 chunks stored"),
        ((1, 16, 16, 3), "gzip", "4 of its 1000000000 chunks stored"),
        (None, None, "0 bytes stored"),
    ],
)
def test_hdf5_image_brick_claiming_unstored_images(tmp_path, chunks, compression, found):
    """HDF5 allocates lazily: a dataset of 10^9 images (chunked, plain or compressed) or a contiguous one never
    written is a small file whose missing images would read back as black."""
    path = tmp_path / "stimuli.hdf5"
    n = 10**9 if chunks else 10**6
    with h5py.File(path, "w") as f:
        brick = f.create_dataset(
            "imgBrick", shape=(n, 16, 16, 3), dtype=np.uint8, chunks=chunks, compression=compression
        )
        if chunks:
            brick[:4] = 7
    assert path.stat().st_size < 1 << 20
    with h5py.File(path, "r") as f, pytest.raises(InputError) as err:
        image_brick(f, path)
    message = one_line(err)
    assert f"{n} stored images of 16x16x3" in message and found in message, message


def test_truncated_hdf5_stimuli_are_refused_before_reading_betas(tmp_path):
    """A copy cut short: HDF5 itself notices at open (stored end of file); the reader says so in one line."""
    from brainrecon.data import layout

    fx = make_fixture(tmp_path / "nsd")
    path = layout.stimuli_path(fx.root)
    path.write_bytes(path.read_bytes()[:3000])
    out = tmp_path / "prep"
    with pytest.raises(InputError, match="expected an HDF5 file, found an unreadable file") as err:
        prepare_subject(fx.root, out, progress=False)
    one_line(err)
    assert not out.exists()


def test_prepare_refuses_stimuli_with_unstored_images_before_reading_betas(tmp_path):
    from brainrecon.data import layout

    fx = make_fixture(tmp_path / "nsd")
    with h5py.File(layout.stimuli_path(fx.root), "w") as f:
        brick = f.create_dataset("imgBrick", shape=(10**9, 16, 16, 3), dtype=np.uint8, chunks=(1, 16, 16, 3))
        brick[: len(fx.images)] = fx.images
    out = tmp_path / "prep"
    with pytest.raises(InputError, match="chunks stored") as err:
        prepare_subject(fx.root, out, progress=False)
    one_line(err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------- engine keys


def test_engine_key_covers_external_data_and_recipe():
    key = EngineKey.for_machine("ab" * 32, "fp32", PROFILE, H100, ["cd" * 32])
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    other_data = EngineKey.for_machine("ab" * 32, "fp32", PROFILE, H100, ["ef" * 32])
    recipe = BuildRecipe.for_precision("fp32")
    changes = [{"workspace_bytes": 1 << 30}, {"tf32": True}, {"optimization_level": 5}, {"flags": ("REFIT",)}]
    variants = [other_data] + [
        EngineKey.for_machine("ab" * 32, "fp32", PROFILE, H100, ["cd" * 32], dataclasses.replace(recipe, **c))
        for c in changes
    ]
    assert len({key.digest(), *(v.digest() for v in variants)}) == 1 + len(variants)
    with pytest.raises(EngineMismatchError) as err:
        select_engine([_engine("trt/gru.plan", other_data)], key, "m")
    assert "ONNX external data: engine ['efefefefefef…'], manifest ONNX ['cdcdcdcdcdcd…']" in one_line(err)
    assert BuildRecipe.for_precision("fp32").tf32 is False and BuildRecipe.for_precision("fp16").tf32 is True


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(built_by="brainrecon 0.2"),  # a field added by a later version
        lambda d: d.pop("recipe"),  # a key from before the recipe was recorded
        lambda d: d.pop("external_data_sha256"),
        lambda d: d["recipe"].update(tiling_level=2),
        lambda d: d.update(profile="not a profile"),
    ],
)
def test_engine_key_of_another_layout_is_a_mismatch_not_a_crash(change):
    key = EngineKey.for_machine("ab" * 32, "fp16", PROFILE, H100)
    data = json.loads(json.dumps(key.to_dict()))
    change(data)
    assert EngineKey.from_dict(data) is None
    with pytest.raises(EngineMismatchError) as err:
        select_engine([_engine("trt/gru.fp16.old.plan", data)], key, "m")
    assert "no engine key of this version" in one_line(err)


def test_cuda_python_major_follows_the_tensorrt_wheel():
    import importlib.metadata

    def installed(**dists):
        def version(name):
            if name in dists:
                return dists[name]
            raise importlib.metadata.PackageNotFoundError(name)

        return version

    assert cuda_majors(installed(**{"tensorrt-cu12": "10.13.3", "cuda-python": "13.0.1"})) == ("12", "13")
    assert cuda_majors(installed(**{"tensorrt-cu13": "11.4.0", "cuda-python": "13.4.4"})) == ("13", "13")
    assert cuda_majors(installed()) == (None, None)
    text = Path(__file__).parents[1].joinpath("pyproject.toml").read_text()
    assert 'trt = ["tensorrt-cu12>=10.0,<12", "cuda-python>=12.0,<13"]' in text


# ----------------------------------------------------------------------------------------- selection, pruning


def _engine(path: str, key: EngineKey | dict, model: str = "gru", precision: str = "fp32") -> Artifact:
    data = key.to_dict() if isinstance(key, EngineKey) else key
    return Artifact(path, "0" * 64, 1, "engine", model=model, precision=precision, io=IO, engine_key=data)


def _onnx_manifest(tmp_path: Path, weights: bytes) -> tuple[Path, list[Artifact]]:
    """A model folder with one ONNX file and its external data (hashes real, contents stand-ins)."""
    model_dir = tmp_path / "model"
    (model_dir / "onnx").mkdir(parents=True, exist_ok=True)
    (model_dir / "onnx/gru.fp32.onnx").write_bytes(b"same graph, weights outside")
    (model_dir / "onnx/gru.fp32.onnx.data").write_bytes(weights)
    data = describe_file(model_dir, "onnx/gru.fp32.onnx.data", "onnx_data", model="gru", precision="fp32")
    onnx = describe_file(
        model_dir,
        "onnx/gru.fp32.onnx",
        "onnx",
        model="gru",
        precision="fp32",
        io=IO,
        external_data=(data.path,),
    )
    return model_dir, [onnx, data]


def _write_engines(model_dir: Path, keys: dict[str, EngineKey | dict]) -> list[Artifact]:
    (model_dir / "trt").mkdir(exist_ok=True)
    entries = []
    for rel, key in keys.items():
        (model_dir / rel).write_bytes(b"plan " + rel.encode())
        data = key.to_dict() if isinstance(key, EngineKey) else key
        entries.append(
            describe_file(model_dir, rel, "engine", model="gru", precision="fp32", io=IO, engine_key=data)
        )
    return entries


def test_stale_engine_after_a_weights_change_is_never_selected_and_is_pruned(tmp_path):
    """Retrained with the same shapes: the .onnx is byte-identical, only its .data differs. The engine of the old
    weights sorts first by path; it must be neither served nor kept."""
    model_dir, old = _onnx_manifest(tmp_path, b"old weights")
    manifest = write_manifest(model_dir, old)
    stale_key = expected_key(manifest, old[0], "fp32", H100)
    _, new = _onnx_manifest(tmp_path, b"new weights")
    assert new[0].sha256 == old[0].sha256 and new[1].sha256 != old[1].sha256
    manifest = write_manifest(model_dir, new)
    fresh_key = expected_key(manifest, new[0], "fp32", H100)
    fresh_on_l4 = expected_key(manifest, new[0], "fp32", L4)
    legacy = {k: v for k, v in fresh_key.to_dict().items() if k not in ("recipe", "external_data_sha256")}
    engines = _write_engines(
        model_dir,
        {
            "trt/gru.fp32.000stale.plan": stale_key,
            "trt/gru.fp32.111legacy.plan": legacy,
            "trt/gru.fp32.222fresh.plan": fresh_key,
            "trt/gru.fp32.333l4.plan": fresh_on_l4,
        },
    )
    manifest = write_manifest(model_dir, engines)
    candidates = [a for a in manifest.artifacts if a.kind == "engine"]
    assert candidates[0].path == "trt/gru.fp32.000stale.plan"
    assert select_engine(candidates, fresh_key, model_dir).path == "trt/gru.fp32.222fresh.plan"
    assert repository_engine(manifest, model_dir, "gru", "fp32", H100).path == "trt/gru.fp32.222fresh.plan"
    assert repository_engine(manifest, model_dir, "gru", "fp32", L4).path == "trt/gru.fp32.333l4.plan"
    with pytest.raises(InputError) as err:  # written without TensorRT: which GPU the server has is unknown
        repository_engine(manifest, model_dir, "gru", "fp32", None)
    assert "engines for 2 targets" in one_line(err)
    with pytest.raises(InputError) as err:
        repository_engine(manifest, model_dir, "gru", "fp32", MachineInfo("10.13.0", "NVIDIA A100", "8.0"))
    assert "built from the current onnx/gru.fp32.onnx for NVIDIA A100" in one_line(err)

    pruned = superseded_engines(model_dir, new)
    assert pruned == ["trt/gru.fp32.000stale.plan", "trt/gru.fp32.111legacy.plan"]
    after = write_manifest(model_dir, new, drop=pruned)
    kept = [a.path for a in after.artifacts if a.kind == "engine"]
    assert kept == ["trt/gru.fp32.222fresh.plan", "trt/gru.fp32.333l4.plan"]


def test_repository_engine_without_tensorrt_takes_the_one_fresh_target(tmp_path):
    model_dir, arts = _onnx_manifest(tmp_path, b"weights")
    manifest = write_manifest(model_dir, arts)
    old_recipe = BuildRecipe(1 << 30, False, 3, True)
    engines = _write_engines(
        model_dir,
        {
            "trt/gru.fp32.aaa.plan": EngineKey.for_machine(
                arts[0].sha256, "fp32", PROFILE, H100, [arts[1].sha256], old_recipe
            ),
            "trt/gru.fp32.bbb.plan": expected_key(manifest, arts[0], "fp32", L4),
        },
    )
    manifest = write_manifest(model_dir, engines)
    assert repository_engine(manifest, model_dir, "gru", "fp32", None).path == "trt/gru.fp32.bbb.plan"
    assert superseded_engines(model_dir, arts) == ["trt/gru.fp32.aaa.plan"]  # another workspace: rebuilt


# ----------------------------------------------------------------------------------------- export wiring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures import build_tiny_stage1

    return build_tiny_stage1(tmp_path_factory.getbasetemp() / "tiny-stage1")


def test_export_prunes_engines_of_other_bytes_and_keeps_other_targets(tiny, tmp_path, one_thread):
    """recon-export without TensorRT still drops engine entries its new ONNX supersedes (here: an engine of
    other weights and one with a key of an older layout), and keeps one of the same build for another GPU."""
    from brainrecon.export.subject import export_model_dir

    model_dir = shutil.copytree(tiny["gru"], tmp_path / "m")
    manifest = load_manifest(model_dir)
    onnx = manifest.find("onnx", "gru", "fp32")
    same = expected_key(manifest, onnx, "fp32", L4)
    other = EngineKey.for_machine("12" * 32, "fp32", onnx.io["profile"], H100)
    (model_dir / "trt").mkdir()
    entries = []
    for rel, key in (
        ("trt/a.plan", other.to_dict()),
        ("trt/b.plan", {"onnx_sha256": onnx.sha256}),
        ("trt/c.plan", same.to_dict()),
    ):
        (model_dir / rel).write_bytes(b"plan")
        entries.append(describe_file(model_dir, rel, "engine", model="gru", precision="fp32", engine_key=key))
    write_manifest(model_dir, entries)
    summary = export_model_dir(model_dir, stage="gru", precision="fp32", validate=False)
    after = load_manifest(model_dir)
    assert after.find("onnx", "gru", "fp32").sha256 == onnx.sha256  # the export is deterministic here
    assert summary["engines"]["pruned"] == ["trt/a.plan", "trt/b.plan"]
    assert [a.path for a in after.artifacts if a.kind == "engine"] == ["trt/c.plan"]


def test_triton_repository_serves_the_fresh_engine_not_the_first_by_path(tiny, tmp_path):
    """Written where TensorRT is absent (the server's target unknown): each model's one engine built from the
    current ONNX is copied, not the stale one that sorts first."""
    from brainrecon.export.triton import RepoOptions, write_triton_repository

    model_dir = shutil.copytree(tiny["gru"], tmp_path / "m")
    manifest = load_manifest(model_dir)
    (model_dir / "trt").mkdir()
    entries = []
    for model in ("gru", "vdvae_decoder"):
        onnx = manifest.find("onnx", model, "fp32")
        stale = EngineKey.for_machine("12" * 32, "fp32", onnx.io["profile"], L4)
        for rel, key in (
            (f"trt/{model}.0stale.plan", stale),
            (f"trt/{model}.1fresh.plan", expected_key(manifest, onnx, "fp32", L4)),
        ):
            (model_dir / rel).write_bytes(rel.encode())
            entries.append(
                describe_file(
                    model_dir,
                    rel,
                    "engine",
                    model=model,
                    precision="fp32",
                    io=onnx.io,
                    engine_key=key.to_dict(),
                    source=onnx.path,
                )
            )
    write_manifest(model_dir, entries)
    summary = write_triton_repository(model_dir, tmp_path / "repo", RepoOptions(engine="trt"))
    sources = {name: info["source"] for name, info in summary["models"].items() if "source" in info}
    assert sources == {"gru": "trt/gru.1fresh.plan", "vdvae_decoder": "trt/vdvae_decoder.1fresh.plan"}
    assert (tmp_path / "repo/gru/1/model.plan").read_bytes() == b"trt/gru.1fresh.plan"
