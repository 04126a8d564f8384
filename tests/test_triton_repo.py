"""`recon-export --format triton` (export/triton.py): the model repository of the tiny two-stage model.

- Every `config.pbtxt` of both variants parses with Triton's own schema (`tritonclient.grpc.model_config_pb2`, in
  the serving environment) and matches the export contracts and the files (`check_repository`); a config edited by
  hand is refused; the GPU and CPU variants differ only in platform/backend and instance kind.
- The CPU variant loads in the real `tritonserver` bundled with PyTriton (Python backend only) and reconstructs
  through real BLS calls: the images equal the runtime API's for the same rows and seeds (tolerance: max |diff|
  <= 1 grey level; measured 0); a NaN request gets its own error while the request batched with it is answered.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.serve_helpers import (
    exported_tiny_model,
    free_ports,
    http,
    images,
    infer,
    serve_venv,
    stop_session,
    tiny_betas_file,
    wait_ready,
)

MODELS = [
    "brainrecon",
    "clip_text",
    "clip_vision",
    "ridge",
    "unet",
    "vae_decoder",
    "vae_encoder",
    "vdvae_decoder",
]


def recon_export(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "recon-export"), *args]
    return subprocess.run(command, capture_output=True, text=True)


def check_in_serve_env(repo: Path, model: Path) -> dict:
    """export.triton.check_repository in the serving environment (tritonclient lives there); parsed configs."""
    code = (
        "import json, sys\n"
        "from brainrecon.export.triton import check_repository\n"
        "print(json.dumps(check_repository(sys.argv[1], sys.argv[2])))\n"
    )
    run = subprocess.run(
        [str(serve_venv() / "bin" / "python"), "-c", code, str(repo), str(model)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise AssertionError(run.stderr.strip().splitlines()[-1])
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def repos(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton")
    out = {"gpu": root / "gpu", "gpu16": root / "gpu16", "cpu": root / "cpu"}
    for args in (
        ("--out", str(out["gpu"])),
        ("--out", str(out["gpu16"]), "--precision", "fp16", "--instances", "2"),
        ("--out", str(out["cpu"]), "--variant", "cpu"),
    ):
        run = recon_export("--model-dir", str(model), "--format", "triton", *args)
        assert run.returncode == 0, run.stderr
    return out


def test_configs_parse_with_triton_schema_and_match_the_artifacts(repos, model):
    manifest = json.loads((model / "manifest.json").read_text())
    contracts = {
        a["model"]: a["io"] for a in manifest["artifacts"] if a["kind"] == "onnx" and a["precision"] == "fp32"
    }
    for name, repo in repos.items():
        configs = check_in_serve_env(repo, model)
        assert sorted(configs) == MODELS
        unet = configs["unet"]
        timestep = next(i for i in unet["input"] if i["name"] == "timestep")
        assert timestep["dims"] == ["1"] and timestep["reshape"] == {}  # (batch,) → dims [1], reshape []
        assert int(unet["maxBatchSize"]) == contracts["unet"]["max_batch"]
        bls = configs["brainrecon"]
        assert bls["backend"] == "python"
        assert [i["dims"] for i in bls["input"]] == [
            [str(contracts["ridge"]["inputs"][0]["shape"][1])],
            ["1"],
        ]
        for model_name in MODELS[1:]:
            config = configs[model_name]
            assert "dynamicBatching" in config
            group = config["instanceGroup"][0]
            if name == "cpu":
                assert config["backend"] == "python" and group["kind"] == "KIND_CPU"
            else:
                assert config["platform"] == "onnxruntime_onnx" and group["kind"] == "KIND_GPU"
                assert group["count"] == (2 if name == "gpu16" else 1)


def test_variants_differ_only_in_platform_and_instance_kind(repos):
    for name in MODELS[1:]:
        gpu = (repos["gpu"] / name / "config.pbtxt").read_text().splitlines()
        cpu = (repos["cpu"] / name / "config.pbtxt").read_text().splitlines()
        differing = [(g, c) for g, c in zip(gpu, cpu, strict=True) if g != c]
        assert differing == [
            ('platform: "onnxruntime_onnx"', 'backend: "python"'),
            ("    kind: KIND_GPU", "    kind: KIND_CPU"),
        ]
        assert (repos["cpu"] / name / "1" / "model.py").is_file()
        assert not (repos["gpu"] / name / "1" / "model.py").exists()


def test_a_config_that_disagrees_with_the_contract_is_refused(repos, model, tmp_path):
    import shutil

    repo = tmp_path / "edited"
    shutil.copytree(repos["gpu"], repo)
    config = repo / "vae_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [3, 64, 64]", "dims: [3, 32, 32]", 1))
    with pytest.raises(AssertionError, match=r"vae_encoder/config.pbtxt: expected images dims \[3, 64, 64\]"):
        check_in_serve_env(repo, model)
    (repo / "unet" / "1" / "model.onnx").write_bytes(b"not the exported file")
    config.write_text(config.read_text().replace("dims: [3, 32, 32]", "dims: [3, 64, 64]", 1))
    with pytest.raises(AssertionError, match=r"unet/config.pbtxt: expected sha256 of 1/model.onnx"):
        check_in_serve_env(repo, model)


def test_usage_errors(model, tmp_path):
    run = recon_export("--model-dir", str(model), "--format", "triton")
    assert run.returncode == 2 and "--out" in run.stderr
    run = recon_export(
        "--model-dir", str(model), "--format", "triton", "--out", str(tmp_path / "r"), "--plans"
    )
    assert run.returncode == 1 and "a fp32 engine entry for ridge" in run.stderr  # no TensorRT plans here
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_cpu_variant_reconstructs_through_bls_in_a_real_tritonserver(
    repos, model, tmp_path_factory, tmp_path
):
    venv = serve_venv()
    ports = free_ports(3)
    log = tmp_path / "tritonserver.log"
    command = [
        str(venv / "bin" / "python"),
        "-m",
        "brainrecon.serve.tritonserver",
        str(repos["cpu"]),
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        f"--log={log}",
    ]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        for name in MODELS:
            wait_ready(ports[0], name, process)
        betas = np.load(tiny_betas_file(tmp_path_factory))
        status, body = infer(ports[0], betas[:2], [3, 4])  # two rows, fitted schedule (37 UNet steps)
        assert status == 200, body
        served = images(body)
        # the same through the runtime API in this venv (ONNX Runtime sessions instead of Triton models)
        from brainrecon.runtime import Reconstructor, RuntimeOptions

        with Reconstructor.open(model, RuntimeOptions(threads=1)) as rec:
            direct = rec.reconstruct(betas[:2], seeds=[3, 4], renormalize=False)
        assert np.abs(served["final_image"].astype(int) - direct.images).max() <= 1
        assert np.abs(served["stage1_image"].astype(int) - direct.stage1_images).max() <= 1

        # a NaN request gets its own error; a request batched with it is answered
        bad = betas[:1].copy()
        bad[0, 2] = np.nan
        replies = {}
        threads = [
            threading.Thread(target=lambda: replies.__setitem__("bad", infer(ports[0], bad, [3]))),
            threading.Thread(target=lambda: replies.__setitem__("good", infer(ports[0], betas[:1], [3]))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert replies["bad"][0] == 400 and "expected finite betas" in replies["bad"][1]["error"]
        assert replies["good"][0] == 200
        assert np.array_equal(images(replies["good"][1])["final_image"][0], served["final_image"][0])
        status, stats = http(ports[0], "/v2/models/unet/stats")
        assert status == 200 and int(stats["model_stats"][0]["inference_count"]) > 0  # real BLS calls
    finally:
        seconds = stop_session(process)
    assert seconds < 15
