"""`recon-export --format triton` (export/triton.py): the model repository of the tiny two-stage model.

- Every `config.pbtxt` of both variants parses with Triton's own schema (`tritonclient.grpc.model_config_pb2`, in
  the serving environment) and matches the export contracts and the files (`check_repository`); a config edited by
  hand is refused; the GPU and CPU variants differ only in platform/backend and instance kind.
- One UNet graph per repository: the K/V-once pair (unet_context + unet_kv) when the folder has it, the plain unet
  with --unet-graph plain; a folder exported with the pair only serves it, and refuses --unet-graph plain.
- The CPU variant loads in the real `tritonserver` bundled with PyTriton (Python backend only) and reconstructs
  through real BLS calls on the K/V pair: unet_context runs once at the first request and once per runtime call,
  unet_kv at every step; the images equal the runtime API's (recon-infer's loop, also on the pair) for the same
  rows and seeds (tolerance: max |diff| <= 1 grey level; measured 0); a NaN request gets its own error (HTTP 400)
  while the request batched with it (queued together behind a running request; Triton's statistics) is answered.
- The BLS model's outputs are declared in the layout the runtime really returns (images (S, S, 3), channels last),
  taken from a `Reconstructor` run, not from the function that writes the config.
- The launcher restricts Triton's admin APIs: statistics only with the `admin-key` header.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import InputError
from brainrecon.export.triton import RepoOptions, write_triton_repository
from brainrecon.manifest import load_manifest, write_manifest
from tests.fixtures import exported_tiny_model, tiny_betas_file
from tests.serve_helpers import (
    free_ports,
    http,
    images,
    infer,
    infer_body,
    metric,
    model_stats,
    pending_requests,
    reply,
    send,
    serve_env,
    serve_venv,
    stop_session,
    wait_for,
    wait_ready,
)

MODELS = [
    "brainrecon",
    "clip_text",
    "clip_vision",
    "ridge",
    "unet_context",
    "unet_kv",
    "vae_decoder",
    "vae_encoder",
    "vdvae_decoder",
]
PLAIN_MODELS = sorted({*MODELS, "unet"} - {"unet_context", "unet_kv"})


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
def runtime_layout(model, tmp_path_factory) -> dict[str, list[str]]:
    """The BLS model's output dims as the runtime really returns them (one reconstruction through the runtime API,
    without the batch axis), as strings like the parsed configs: the expectation stated apart from export/triton.py."""
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    betas = np.load(tiny_betas_file(tmp_path_factory))
    with Reconstructor.open(model, RuntimeOptions(threads=1)) as rec:
        out = rec.reconstruct(betas[:1], seeds=[0], renormalize=False)
    assert out.images.shape[-1] == 3 and out.stage1_images.shape[-1] == 3  # images are channels-last
    return {
        "final_image": [str(d) for d in out.images.shape[1:]],
        "stage1_image": [str(d) for d in out.stage1_images.shape[1:]],
    }


@pytest.fixture(scope="module")
def repos(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton")
    out = {"gpu": root / "gpu", "gpu16": root / "gpu16", "cpu": root / "cpu", "plain": root / "plain"}
    for args in (
        ("--out", str(out["gpu"])),
        ("--out", str(out["gpu16"]), "--precision", "fp16", "--instances", "2"),
        ("--out", str(out["cpu"]), "--variant", "cpu", "--preset", "fast"),  # the BLS model samples fast
        ("--out", str(out["plain"]), "--unet-graph", "plain"),
    ):
        run = recon_export("--model-dir", str(model), "--format", "triton", *args)
        assert run.returncode == 0, run.stderr
    return out


@pytest.mark.serve
def test_configs_parse_with_triton_schema_and_match_the_artifacts(repos, model, runtime_layout):
    manifest = json.loads((model / "manifest.json").read_text())
    contracts = {
        a["model"]: a["io"] for a in manifest["artifacts"] if a["kind"] == "onnx" and a["precision"] == "fp32"
    }
    for name, repo in repos.items():
        configs = check_in_serve_env(repo, model)
        graph = "plain" if name == "plain" else "kv"  # the pair whenever the folder has it
        models = PLAIN_MODELS if graph == "plain" else MODELS
        assert sorted(configs) == models  # one UNet graph: the other is not copied
        assert json.loads((repo / "repository.json").read_text())["unet_graph"] == graph
        step = "unet" if graph == "plain" else "unet_kv"
        unet = configs[step]
        timestep = next(i for i in unet["input"] if i["name"] == "timestep")
        assert timestep["dims"] == ["1"] and timestep["reshape"] == {}  # (batch,) → dims [1], reshape []
        assert int(unet["maxBatchSize"]) == contracts[step]["max_batch"]
        if (
            graph == "kv"
        ):  # the context's K/V: unet_context's outputs are unet_kv's inputs after sample, timestep
            outputs = [(o["name"], o["dims"]) for o in configs["unet_context"]["output"]]
            assert outputs == [(i["name"], i["dims"]) for i in unet["input"][2:]] and len(outputs) >= 2
        bls = configs["brainrecon"]
        assert bls["backend"] == "python"
        assert [i["dims"] for i in bls["input"]] == [
            [str(contracts["ridge"]["inputs"][0]["shape"][1])],
            ["1"],
        ]
        assert {o["name"]: o["dims"] for o in bls["output"]} == runtime_layout
        params = {key: p["stringValue"] for key, p in bls["parameters"].items()}
        assert params["unet_graph"] == graph and sorted(params["models"].split(",")) == models[1:]
        assert params["preset"] == ("fast" if name == "cpu" else "paper")
        for model_name in models[1:]:
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


@pytest.mark.serve
def test_a_config_that_disagrees_with_the_contract_is_refused(repos, model, tmp_path):
    repo = tmp_path / "edited"
    shutil.copytree(repos["gpu"], repo)
    config = repo / "vae_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [3, 64, 64]", "dims: [3, 32, 32]", 1))
    with pytest.raises(AssertionError, match=r"vae_encoder/config.pbtxt: expected images dims \[3, 64, 64\]"):
        check_in_serve_env(repo, model)
    (repo / "unet_kv" / "1" / "model.onnx").write_bytes(b"not the exported file")
    config.write_text(config.read_text().replace("dims: [3, 32, 32]", "dims: [3, 64, 64]", 1))
    with pytest.raises(AssertionError, match=r"unet_kv/config.pbtxt: expected sha256 of 1/model.onnx"):
        check_in_serve_env(repo, model)
    shutil.copyfile(repos["gpu"] / "unet_kv" / "1" / "model.onnx", repo / "unet_kv" / "1" / "model.onnx")
    bls = repo / "brainrecon" / "config.pbtxt"
    bls.write_text(bls.read_text().replace('string_value: "kv"', 'string_value: "plain"'))
    with pytest.raises(AssertionError, match=r"brainrecon/config.pbtxt: expected parameters"):
        check_in_serve_env(repo, model)


def test_a_folder_with_the_pair_only(model, tmp_path):
    """A folder exported with --unet-graph kv has no `unet`: its repository serves the pair, and a repository with
    the plain UNet is refused with a one-line error naming the missing entry and the export that writes it."""
    folder = tmp_path / "kv-only"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("unet.*"))  # unet_*.onnx stay
    write_manifest(folder, [a for a in load_manifest(model).artifacts if a.model != "unet"], merge=False)
    summary = write_triton_repository(folder, tmp_path / "kv", RepoOptions(variant="cpu"))
    assert summary["unet_graph"] == "kv" and sorted(summary["models"]) == MODELS
    with pytest.raises(
        InputError,
        match=r"a fp32 onnx entry for unet, found none \(export it with recon-export "
        r"--stage all --unet-graph plain\)",
    ):
        write_triton_repository(folder, tmp_path / "plain", RepoOptions(unet_graph="plain"))
    assert not (tmp_path / "plain").exists()


def test_usage_errors(model, tmp_path):
    run = recon_export("--model-dir", str(model), "--format", "triton")
    assert run.returncode == 2 and "--out" in run.stderr
    run = recon_export(
        "--model-dir", str(model), "--format", "triton", "--out", str(tmp_path / "r"), "--plans"
    )
    assert run.returncode == 1 and "a fp32 engine entry for ridge" in run.stderr  # no TensorRT plans here
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.serve
def test_cpu_variant_reconstructs_through_bls_in_a_real_tritonserver(
    repos, model, runtime_layout, tmp_path_factory, tmp_path
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
    process = subprocess.Popen(command, start_new_session=True, env=serve_env(tmp_path))
    try:
        for name in MODELS:
            wait_ready(ports[0], name, process)
        status, config = http(ports[0], "/v2/models/brainrecon/config")
        assert status == 200
        assert {o["name"]: [str(d) for d in o["dims"]] for o in config["output"]} == runtime_layout
        betas = np.load(tiny_betas_file(tmp_path_factory))
        status, body = infer(ports[0], betas[:2], [3, 4])  # two rows, the repository's fast preset (7 steps)
        assert status == 200, body
        served = images(body)
        # the same through the runtime API in this venv (ONNX Runtime sessions instead of Triton models)
        from brainrecon.runtime import Reconstructor, RuntimeOptions
        from brainrecon.sampling import PRESETS

        with Reconstructor.open(model, RuntimeOptions(threads=1)) as rec:
            assert (
                rec.pipeline.kv_once
            )  # recon-infer's default on this folder: the K/V pair, as the repository
            fast = rec.sampling.with_overrides(**PRESETS["fast"])
            direct = rec.reconstruct(betas[:2], fast, seeds=[3, 4], renormalize=False)
            steps = len(direct.timesteps)
            assert steps < len(rec.reconstruct(betas[:1], seeds=[3], renormalize=False).timesteps)
        assert np.abs(served["final_image"].astype(int) - direct.images).max() <= 1
        assert np.abs(served["stage1_image"].astype(int) - direct.stage1_images).max() <= 1

        # a NaN request gets its own error; a request batched with it is answered. The batch is made, not hoped
        # for: while the one BLS instance runs a 2-row request (its UNet steps count up in Triton's metrics), both
        # queue (the pending gauge says 2) and the batcher then takes them together (Triton's statistics)
        bad = betas[:1].copy()
        bad[0, 2] = np.nan
        before = model_stats(ports[0])
        unet_steps = metric(ports[2], "nv_inference_exec_count", "unet_kv")
        running = send(ports[0], infer_body(betas[:2], [3, 4]))
        wait_for(
            "the 2-row request's UNet steps",
            lambda: metric(ports[2], "nv_inference_exec_count", "unet_kv") > unet_steps,
            process,
        )
        queued = [send(ports[0], infer_body(x, [3])) for x in (bad, betas[:1])]
        wait_for("two queued requests", lambda: pending_requests(ports[2]) == 2, process)
        assert reply(running)[0] == 200
        bad_reply, good_reply = [reply(c) for c in queued]
        after = model_stats(ports[0])
        assert after["execution_count"] - before["execution_count"] == 2  # the 2-row request, then both
        assert after["inference_count"] - before["inference_count"] == 2 + 2
        message = "betas: expected finite betas, found 1 NaN/Inf values (first at row 0, voxel 2)"
        assert bad_reply == (400, {"error": message})
        assert good_reply[0] == 200
        assert np.array_equal(images(good_reply[1])["final_image"][0], served["final_image"][0])
        # real BLS calls on the pair, K/V once: unet_context on the unconditional context at the first request and
        # once per runtime call (3: the two-row request twice, the good one), unet_kv at every step of each
        executions = {
            name: model_stats(ports[0], name)["execution_count"] for name in ("unet_context", "unet_kv")
        }
        assert executions == {"unet_context": 1 + 3, "unet_kv": 3 * steps}
        # the admin APIs need the key (serve/tritonserver.py); inference did not
        assert http(ports[0], "/v2/models/unet_kv/stats") == (
            403,
            {"error": "This API is restricted, expecting header 'admin-key'"},
        )
    finally:
        seconds = stop_session(process)
    assert seconds < 15
