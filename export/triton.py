"""`recon-export --format triton`: a Triton Inference Server model repository from an exported model folder.

Torch-free (numpy and the manifest only): it copies what `recon-export` already wrote and verified. Layout, as the
Triton docs describe a model repository (triton-inference-server/server `docs/user_guide/model_repository.md`,
`model_configuration.md`):

    REPO/
      <model>/config.pbtxt          one per served ONNX file (or TensorRT engine): ridge|gru, vdvae_decoder,
      <model>/1/model.onnx|.plan    clip_text, clip_vision, vae_encoder, vae_decoder, and one UNet graph:
                                    unet_context + unet_kv (K/V once) when exported, else unet
      brainrecon/config.pbtxt       the Python (BLS) model: betas (V,) [+ seed] → final_image, stage1_image
      brainrecon/1/model.py         the two-stage loop (brainrecon.runtime's numpy DDIM) calling the models above
      brainrecon/1/model_dir/       the manifest and the data files the loop reads (statistics, sampling, tables)
      repository.json               what was written, from which files (sha256), which UNet graph

UNet graph. The repository serves one form of the UNet step, as the runtime runs one: the K/V-once pair when the
folder has it (`unet_context` once per context, `unet_kv` at every step; export/contracts.py), else the plain `unet`
(`RepoOptions.unet_graph` "kv" or "plain" insists on one). The other form is not copied: its weights would double
the repository for a model no request reaches. The BLS config's parameters `unet_graph` and `models` say which.

Variants. "gpu": each model has `platform: "onnxruntime_onnx"` (or `"tensorrt_plan"` with `--engine trt`) and
`KIND_GPU` instances. "cpu": the same models as Python-backend wrappers that run the same ONNX file with ONNX
Runtime on the CPU (`serve/triton_models/onnx_model.py`), for a server that has only the Python backend (the
`tritonserver` bundled with PyTriton); every config differs from the GPU variant only in platform/backend and
instance kind. A loop cannot be an ensemble (ensembles are DAGs), hence the BLS model (python_backend README,
"Business Logic Scripting").

Configs follow Triton's schema (`model_config.proto`; tests parse them with `tritonclient.grpc.model_config_pb2`):
the batch axis is dropped from `dims` (`max_batch_size` = the contract's profile max), an input that is only the
batch axis (the UNet's `timestep`) is `dims: [1]` with `reshape: { shape: [] }`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainrecon import model_dir as layout
from brainrecon.choices import (
    FILE_PRECISIONS,
    PRESET_NAMES,
    REGRESSORS,
    TRITON_ENGINES,
    TRITON_VARIANTS,
    UNET_GRAPHS,
    FilePrecision,
    Preset,
    TritonEngine,
    TritonVariant,
    UnetGraph,
    check_choice,
)
from brainrecon.errors import ConfigError, InputError
from brainrecon.io import atomic_dir, read_json, write_json
from brainrecon.manifest import Artifact, Manifest, verify_manifest
from brainrecon.runtime.backends.tensorrt import MachineInfo

BLS_MODEL = "brainrecon"
TEMPLATES = importlib.resources.files("brainrecon.serve") / "triton_models"
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
}
# The BLS model's default queue delay: a 2-request batch is worth waiting 5 ms for when one request takes
# hundreds of milliseconds (the sub-models use a shorter one: their callers already send whole batches).
BLS_QUEUE_DELAY_US = 5000
MODEL_QUEUE_DELAY_US = 500


@dataclass(frozen=True)
class RepoOptions:
    variant: TritonVariant = "gpu"
    precision: FilePrecision = "fp32"
    # "trt": TensorRT plans from the manifest (built for the server's GPU and TensorRT)
    engine: TritonEngine = "onnx"
    instances: int = 1  # instances per model
    bls_instances: int = 1
    max_queue_delay_us: int = BLS_QUEUE_DELAY_US  # the BLS model's dynamic batcher
    bls_max_batch: int = 8
    unet_graph: UnetGraph = "auto"  # auto: kv when exported, else plain (as the runtime's unet_graph)
    preset: Preset = (
        "paper"  # the BLS model's sampling: the fitted recipe, or brainrecon/sampling.py PRESETS's
    )

    def __post_init__(self) -> None:
        check_choice("--variant", self.variant, TRITON_VARIANTS)
        check_choice("--engine", self.engine, TRITON_ENGINES)
        check_choice("--unet-graph", self.unet_graph, UNET_GRAPHS)
        check_choice("--precision", self.precision, FILE_PRECISIONS)
        check_choice("--preset", self.preset, PRESET_NAMES)
        if self.variant == "cpu" and self.engine == "trt":
            raise InputError("--engine", "onnx for the cpu variant (TensorRT plans need a GPU)", "trt")
        for name in ("instances", "bls_instances", "bls_max_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}", "an integer >= 1", str(getattr(self, name)))
        if self.max_queue_delay_us < 0:
            raise InputError("--max-queue-delay-us", "microseconds >= 0", str(self.max_queue_delay_us))


def _dims(shape: list[int | str]) -> tuple[list[int], bool]:
    """Contract shape ["batch", d1, ...] → Triton dims without the batch axis; True when only the batch was left."""
    if not shape or shape[0] != "batch" or any(isinstance(d, str) for d in shape[1:]):
        raise ConfigError(f"expected a shape with a leading 'batch' axis and fixed dims, found {shape}")
    dims = [int(d) for d in shape[1:]]
    return (dims or [1]), not dims


def _tensor_block(spec: dict[str, Any]) -> str:
    dtype = TRITON_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ConfigError(
            f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type in {TRITON_DTYPES}"
        )
    dims, scalar = _dims(spec["shape"])
    lines = [f'    name: "{spec["name"]}"', f"    data_type: {dtype}", f"    dims: {dims}"]
    if scalar:  # (batch,) tensors: Triton wants a non-empty dims, the model gets the batch axis only
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(
    name: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int,
    kind: str,
    count: int,
    max_queue_delay_us: int,
    platform: str | None = None,
    backend: str | None = None,
    optional: tuple[str, ...] = (),
    parameters: dict[str, str] | None = None,
    queue_policy: dict[str, int] | None = None,
    dynamic_batching: bool = True,
) -> str:
    """One `config.pbtxt` in protobuf text format (Triton's ModelConfig message).

    queue_policy: {"max_queue_size": requests (0: no limit), "default_timeout_microseconds": (0: none)} becomes the
    dynamic batcher's `default_queue_policy` (model_config.proto ModelQueuePolicy): a request beyond the queue size,
    or one that waited longer than its timeout (a request may set a shorter one), is rejected, not computed."""
    if (platform is None) == (backend is None):
        raise ConfigError(f"model {name}: expected exactly one of platform and backend")
    head = [f'name: "{name}"', f'platform: "{platform}"' if platform else f'backend: "{backend}"']
    head.append(f"max_batch_size: {max_batch_size}")
    blocks = []
    for spec in inputs:
        block = _tensor_block(spec)
        if spec["name"] in optional:
            block = block[:-4] + "\n    optional: true\n  }"
        blocks.append(block)
    text = "\n".join(head)
    text += "\ninput [\n" + ",\n".join(blocks) + "\n]"
    text += "\noutput [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]"
    if dynamic_batching:
        text += f"\ndynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}"
        if queue_policy is not None:
            text += "\n  default_queue_policy {\n    timeout_action: REJECT"
            text += f"\n    default_timeout_microseconds: {int(queue_policy['default_timeout_microseconds'])}"
            text += "\n    allow_timeout_override: true"
            text += f"\n    max_queue_size: {int(queue_policy['max_queue_size'])}\n  }}"
        text += "\n}"
    text += f"\ninstance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]"
    for key, value in (parameters or {}).items():
        text += f'\nparameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}'
    return text + "\n"


def served_unet_graph(manifest: Manifest, options: RepoOptions) -> str | None:
    """The UNet graph the repository serves, "kv" or "plain"; None when stage 2 is not exported (at this precision).

    "auto" takes the K/V-once pair over the plain unet, a graph whose files of the served kind (engines with
    --plans) exist over one exported as ONNX only (whose missing engines `repository_models` then names)."""
    kind = "engine" if options.engine == "trt" else "onnx"
    graphs = tuple(layout.UNET_GRAPH_MODELS) if options.unet_graph == "auto" else (options.unet_graph,)
    for found_kind in (kind, "onnx"):
        for graph in graphs:
            names = layout.UNET_GRAPH_MODELS[graph]
            if all(manifest.find(found_kind, n, options.precision) is not None for n in names):
                return graph
    return None if options.unet_graph == "auto" else options.unet_graph


def repository_models(manifest: Manifest, model_dir: Path, options: RepoOptions) -> dict[str, Artifact]:
    """{Triton model name: the artifact it serves}: the stage-1 regressor and decoder, and stage 2 if exported
    (the CLIP ridges, the VAE, and the UNet graph of `served_unet_graph`)."""
    summary = read_json(model_dir / layout.STAGE1_SUMMARY, "stage-1 summary")
    names = [summary["config"]["regressor"], layout.VDVAE_DECODER]
    unet_graph = served_unet_graph(manifest, options)
    if unet_graph is not None:
        names += [m for m in layout.STAGE2_MODELS if m != "unet"]
        names += layout.UNET_GRAPH_MODELS[unet_graph]
    kind = "engine" if options.engine == "trt" else "onnx"
    machine = serving_machine() if kind == "engine" else None
    chosen = {}
    for name in names:
        if kind == "engine":
            artifact = repository_engine(manifest, model_dir, name, options.precision, machine)
        else:
            artifact = manifest.find(kind, name, options.precision)
        if artifact is None:
            is_unet = unet_graph is not None and name in layout.UNET_GRAPH_MODELS[unet_graph]
            flag = f" --unet-graph {unet_graph}" if is_unet else ""
            raise InputError(
                model_dir / layout.MANIFEST,
                f"a {options.precision} {kind} entry for {name}",
                f"none (export it with recon-export --stage all{flag}"
                + (", on the GPU server, to build engines)" if kind == "engine" else ")"),
            )
        chosen[name] = artifact
    return chosen


def serving_machine() -> MachineInfo | None:
    """This machine's TensorRT version and GPU when TensorRT runs here (the repository is written on its server),
    else None (written elsewhere: the server's target is not known)."""
    from brainrecon.runtime.backends.tensorrt import current_machine, tensorrt_status

    return current_machine() if tensorrt_status()[0] else None


def repository_engine(
    manifest: Manifest, model_dir: Path, name: str, precision: str, machine: MachineInfo | None
) -> Artifact | None:
    """The engine entry a repository serves for (name, precision): the one whose key says it was built from the
    manifest's current ONNX entry (its bytes and external data), profile and build recipe, and for `machine` when
    known; never the first by path. None when no engine entry exists; a one-line InputError when entries exist
    but none fits, or when, `machine` unknown, engines for several targets fit (which GPU the server has is not
    known here)."""
    from brainrecon.runtime.backends.tensorrt import EngineKey, expected_key

    entries = [
        a for a in manifest.artifacts if a.kind == "engine" and a.model == name and a.precision == precision
    ]
    onnx = manifest.find("onnx", name, precision)
    if not entries:
        return None
    where = model_dir / layout.MANIFEST
    if onnx is None or not onnx.io or "profile" not in onnx.io:
        raise InputError(
            where, f"the {precision} ONNX entry of {name} its engines were built from", "none (re-export it)"
        )
    wanted = expected_key(manifest, onnx, precision, machine or MachineInfo("", "", ""))
    fresh = []
    for entry in entries:
        key = EngineKey.from_dict(entry.engine_key)
        if key is not None and key.same_build(wanted) and (machine is None or key.machine == machine):
            fresh.append((entry, key))
    targets = sorted({_target(key.machine) for _, key in fresh})
    if len(targets) == 1:
        return fresh[0][0]
    if not fresh:
        target = f" for {_target(machine)}" if machine is not None else ""
        raise InputError(
            where,
            f"a {precision} TensorRT engine of {name} built from the current {onnx.path}{target}",
            f"{len(entries)} stale or foreign ({', '.join(e.path for e in entries)}); rebuild with recon-export "
            f"--model-dir {model_dir} --stage all on the server",
        )
    raise InputError(
        where,
        f"one {precision} TensorRT engine of {name} (the server's target is unknown here: no TensorRT)",
        f"engines for {len(targets)} targets ({'; '.join(targets)}); write the repository on the server",
    )


def _target(machine: MachineInfo) -> str:
    return f"{machine.gpu_name} sm{machine.compute_capability} TensorRT {machine.tensorrt_version}"


def _io(artifact: Artifact, manifest: Manifest) -> dict[str, Any]:
    io = artifact.io
    if not io and artifact.source:  # an engine records its ONNX source, whose entry has the contract
        io = (manifest.get(artifact.source) or artifact).io
    if not io:
        raise ConfigError(f"manifest entry {artifact.path}: expected the contract's I/O spec, found none")
    return io


def bls_io(models: dict[str, Artifact], manifest: Manifest, model_dir: Path) -> tuple[list, list, int]:
    """The BLS model's inputs and outputs (per request, with the batch axis) from the exported contracts."""
    regressor = next(n for n in models if n in REGRESSORS)
    n_voxels = _io(models[regressor], manifest)["inputs"][0]["shape"][1]
    stage1_shape = _io(models[layout.VDVAE_DECODER], manifest)["outputs"][0]["shape"][1:]  # (s, s, 3)
    if "vae_decoder" in models:
        _, c, h, w = _io(models["vae_decoder"], manifest)["outputs"][0]["shape"]  # (batch, 3, S, S)
        final_shape = [h, w, c]
    else:
        final_shape = list(stage1_shape)
    inputs = [
        {"name": "betas", "shape": ["batch", n_voxels], "dtype": "float32"},
        {"name": "seed", "shape": ["batch", 1], "dtype": "int64"},
    ]
    outputs = [
        {"name": "final_image", "shape": ["batch", *final_shape], "dtype": "uint8"},
        {"name": "stage1_image", "shape": ["batch", *stage1_shape], "dtype": "uint8"},
    ]
    return inputs, outputs, int(n_voxels)


def bls_parameters(
    models: dict[str, Artifact], options: RepoOptions, unet_graph: str | None
) -> dict[str, str]:
    """The BLS model's config parameters: what serve/triton_models/bls_model.py builds its pipelines from."""
    return {
        "precision": options.precision,
        "models": ",".join(models),
        "unet_graph": unet_graph or "none",
        "preset": options.preset,  # sampling.PRESETS over the fitted sampling (older repositories: paper)
    }


def write_triton_repository(
    model_dir: str | Path, out: str | Path, options: RepoOptions | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the repository (atomically: complete or absent) and return a JSON-able summary."""
    options = options or RepoOptions()
    model_dir = Path(model_dir)
    manifest = verify_manifest(model_dir)  # every file it copies is the one the manifest vouches for
    models = repository_models(manifest, model_dir, options)
    unet_graph = served_unet_graph(manifest, options)
    kind = "KIND_GPU" if options.variant == "gpu" else "KIND_CPU"
    written: dict[str, Any] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, artifact in models.items():
            io = _io(artifact, manifest)
            version = tmp / name / "1"
            version.mkdir(parents=True)
            if artifact.kind == "engine":
                shutil.copyfile(model_dir / artifact.path, version / "model.plan")
                where = {"platform": "tensorrt_plan"}
            else:
                shutil.copyfile(model_dir / artifact.path, version / "model.onnx")
                for extra in artifact.external_data:  # ONNX names its weights file relative to itself
                    shutil.copyfile(model_dir / extra, version / Path(extra).name)
                where = {"platform": "onnxruntime_onnx"}
            if options.variant == "cpu":
                shutil.copyfile(TEMPLATES / "onnx_model.py", version / "model.py")
                where = {"backend": "python"}
            text = config_text(
                name,
                io["inputs"],
                io["outputs"],
                int(io["max_batch"]),
                kind,
                options.instances,
                MODEL_QUEUE_DELAY_US,
                **where,
            )
            (tmp / name / "config.pbtxt").write_text(text)
            written[name] = {"source": artifact.path, "sha256": artifact.sha256, **where}
        inputs, outputs, n_voxels = bls_io(models, manifest, model_dir)
        version = tmp / BLS_MODEL / "1"
        (version / "model_dir").mkdir(parents=True)
        shutil.copyfile(TEMPLATES / "bls_model.py", version / "model.py")
        shutil.copyfile(model_dir / layout.MANIFEST, version / "model_dir" / layout.MANIFEST)
        for artifact in manifest.artifacts:  # statistics, sampling, DDIM tables; the models are served above
            if artifact.kind == "data":
                target = version / "model_dir" / artifact.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model_dir / artifact.path, target)
        text = config_text(
            BLS_MODEL,
            inputs,
            outputs,
            options.bls_max_batch,
            "KIND_CPU",  # the loop is numpy; the models it calls run where their own instances are
            options.bls_instances,
            options.max_queue_delay_us,
            backend="python",
            optional=("seed",),
            parameters=bls_parameters(models, options, unet_graph),
        )
        (tmp / BLS_MODEL / "config.pbtxt").write_text(text)
        written[BLS_MODEL] = {"backend": "python", "calls": list(models)}
        summary = {
            "format": "brainrecon.triton_repository",
            "version": 1,
            "model_dir": str(model_dir),
            "options": dataclasses.asdict(options),
            "n_voxels": n_voxels,
            "unet_graph": unet_graph,  # "kv" | "plain" | None (stage 1 only)
            "models": written,
        }
        write_json(tmp / "repository.json", summary)
    return summary


def check_repository(repo: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """Parse every `config.pbtxt` with Triton's own schema (`tritonclient.grpc.model_config_pb2`, needs the serving
    environment) and check it against the model folder: names, dims, dtypes and max_batch_size from the export
    contracts, dynamic batching, instance kind, platform/backend per variant, the BLS model's parameters (which
    UNet graph) and each model file's sha256.
    Returns {model: parsed config as a dict}; a mismatch is a ConfigError naming the file, expected and found."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from brainrecon.io import sha256_file

    repo, model_dir = Path(repo), Path(model_dir)
    summary = read_json(repo / "repository.json", "Triton repository summary")
    options = RepoOptions(**summary["options"])
    manifest = verify_manifest(model_dir)
    models = repository_models(manifest, model_dir, options)
    unet_graph = served_unet_graph(manifest, options)
    if summary.get("unet_graph") != unet_graph:
        raise ConfigError(
            f"{repo / 'repository.json'}: expected unet_graph {unet_graph!r}, found {summary.get('unet_graph')!r}"
        )
    found_models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    if found_models != sorted([*models, BLS_MODEL]):
        raise ConfigError(f"{repo}: expected models {sorted([*models, BLS_MODEL])}, found {found_models}")
    kind = "KIND_GPU" if options.variant == "gpu" else "KIND_CPU"
    parsed: dict[str, Any] = {}

    def expect(path: Path, what: str, want: Any, got: Any) -> None:
        if want != got:
            raise ConfigError(f"{path}: expected {what} {want!r}, found {got!r}")

    def check_tensors(path: Path, what: str, specs: list[dict[str, Any]], tensors: Any) -> None:
        expect(path, f"{what} names", [s["name"] for s in specs], [t.name for t in tensors])
        for spec, tensor in zip(specs, tensors, strict=True):
            dims, scalar = _dims(spec["shape"])
            expect(path, f"{spec['name']} dims", dims, list(tensor.dims))
            expect(
                path,
                f"{spec['name']} data_type",
                TRITON_DTYPES[spec["dtype"]],
                model_config_pb2.DataType.Name(tensor.data_type),
            )
            expect(
                path,
                f"{spec['name']} reshape",
                [] if scalar else None,
                list(tensor.reshape.shape) if tensor.HasField("reshape") else None,
            )

    for name in found_models:
        path = repo / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        expect(path, "name", name, config.name)
        expect(path, "a dynamic_batching block", True, config.HasField("dynamic_batching"))
        if name == BLS_MODEL:
            inputs, outputs, _ = bls_io(models, manifest, model_dir)
            expect(path, "backend", "python", config.backend)
            expect(path, "max_batch_size", options.bls_max_batch, config.max_batch_size)
            expect(
                path,
                "instance kind",
                ["KIND_CPU"],
                [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group],
            )
            expect(path, "optional inputs", ["seed"], [t.name for t in config.input if t.optional])
            expect(
                path,
                "parameters",
                bls_parameters(models, options, unet_graph),
                {key: p.string_value for key, p in config.parameters.items()},
            )
            expect(path, "model.py", True, (repo / name / "1" / "model.py").is_file())
        else:
            artifact = models[name]
            io = _io(artifact, manifest)
            inputs, outputs = io["inputs"], io["outputs"]
            expect(path, "max_batch_size", int(io["max_batch"]), config.max_batch_size)
            expect(
                path,
                "instance kind",
                [kind],
                [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group],
            )
            filename = "model.plan" if artifact.kind == "engine" else "model.onnx"
            if options.variant == "cpu":
                expect(path, "backend", "python", config.backend)
                expect(path, "model.py", True, (repo / name / "1" / "model.py").is_file())
            else:
                platform = "tensorrt_plan" if artifact.kind == "engine" else "onnxruntime_onnx"
                expect(path, "platform", platform, config.platform)
            expect(
                path,
                f"sha256 of 1/{filename} (manifest: {artifact.path})",
                artifact.sha256,
                sha256_file(repo / name / "1" / filename),
            )
        check_tensors(path, "input", inputs, config.input)
        check_tensors(path, "output", outputs, config.output)
        parsed[name] = json_format.MessageToDict(config)
    return parsed
