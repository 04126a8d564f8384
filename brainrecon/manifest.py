"""`model_dir/manifest.json`: every deployable artifact of a subject model directory, with its hash.

Torch-free: written by `brainrecon.export`, read and verified by `brainrecon.runtime` before anything is loaded.
Engine files are executable code in all but name (TensorRT developer guide: a plan file is deserialised into executable kernels): the runtime loads only what this file vouches for.

Layout (version 1):

    {
      "manifest_version": 1,
      "created": "2026-05-09T12:00:00+00:00",
      "producer": {"brainrecon": "0.1.0", "torch": "2.13.0", "onnx": ..., "onnxruntime": ..., "tensorrt": null},
      "preprocess": {... the content of model_dir/preprocess.json ...},
      "artifacts": [
        {"path": "onnx/gru.fp32.onnx", "sha256": "...", "size": 123, "kind": "onnx", "model": "gru",
         "precision": "fp32", "opset": 17, "exporter": "torchscript", "io": {...contract I/O spec...},
         "validation": {...}, "external_data": ["onnx/gru.fp32.onnx.data"] | [], "engine_key": null},
        {"path": "stage1/latent_mean.npy", "sha256": "...", "size": 123, "kind": "data", ...},
        ...
      ]
    }

Paths are relative to the model directory, POSIX-style, and must stay inside it: an absolute path, a `..` part
(`check_relative`, at load) or a symbolic link resolving outside the folder (`confined`, before a file is read) is
refused in one line. Kinds: "onnx", "onnx_data" (external weights of an ONNX file), "engine" (a TensorRT plan;
`engine_key` says what it was built for), "data" (arrays and configs the runtime reads: preprocessing, latent
statistics, stage summaries).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from brainrecon import __version__
from brainrecon.errors import BrainReconError, ConfigError, InputError, MissingFileError
from brainrecon.io import read_json, sha256_file, write_json
from brainrecon.model_dir import MANIFEST, PREPROCESS

MANIFEST_VERSION = 1
MANIFEST_FILE = MANIFEST  # brainrecon/model_dir.py
# The previous manifest, kept aside while an export publishes (export/subject.py `publish`); it exists after the
# export only when that was killed mid-publish, and the next export merges from it.
MANIFEST_PREVIOUS = "manifest.previous.json"
KINDS = ("onnx", "onnx_data", "engine", "data")
# Distribution names whose versions are recorded; onnxruntime-gpu installs the same `onnxruntime` module.
_PRODUCERS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
}


class ManifestError(BrainReconError):
    """A missing, unreadable, tampered or incompatible manifest or artifact."""


def regenerate_hint(model_dir: str | Path) -> str:
    return f"regenerate with: recon-export --model-dir {model_dir} --stage all"


@dataclass(frozen=True)
class Artifact:
    """One file of the model directory and what it is."""

    path: str  # relative to the model directory, POSIX
    sha256: str
    size: int
    kind: str
    model: str | None = None  # export contract name ("gru", "ridge", "vdvae_decoder", "unet", ...)
    precision: str | None = None  # "fp32" | "fp16"
    opset: int | None = None
    exporter: str | None = None
    io: dict[str, Any] | None = None  # the contract's I/O spec and shape profile
    validation: dict[str, Any] | None = None  # parity numbers measured at export
    external_data: tuple[str, ...] = ()  # onnx: its external-data files (also listed as kind "onnx_data")
    engine_key: dict[str, Any] | None = None  # engine: EngineKey.to_dict()
    source: str | None = None  # engine: the ONNX path it was built from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"manifest artifact {self.path}: kind must be one of {KINDS}, found {self.kind!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["external_data"] = list(self.external_data)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Artifact:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted({"path", "sha256", "size", "kind"} - set(data))
        if unknown or missing:
            raise ManifestError(
                f"{source}: artifact entry expected keys {sorted(names)}, found unknown {unknown}, missing {missing}"
            )
        for key in ("path", "source"):
            if data.get(key) is not None:
                check_relative(source, f"artifact {key}", data[key])
        for extra in data.get("external_data") or ():
            check_relative(source, f"external_data of {data['path']}", extra)
        return cls(**{**data, "external_data": tuple(data.get("external_data") or ())})


def check_relative(source: str | Path, what: str, path: Any) -> None:
    """A manifest path must name a file inside the model folder: relative, POSIX, no `..`, no empty part.

    Checked on the text, before any file is opened; `confined` checks where it resolves (symlinks)."""
    ok = isinstance(path, str) and path and "\\" not in path and "\x00" not in path
    parts = PurePosixPath(path).parts if ok else ()
    if not ok or PurePosixPath(path).is_absolute() or ".." in parts or path != PurePosixPath(path).as_posix():
        raise ManifestError(
            f"{source}: {what}: expected a relative POSIX path inside the model folder (no absolute path, "
            f"no '..'), found {path!r}"
        )


def confined(model_dir: str | Path, relpath: str, what: str = "artifact") -> Path:
    """`model_dir / relpath`, refused (one line) when it resolves outside the model folder (a symlink leaving it)."""
    model_dir = Path(model_dir)
    check_relative(model_dir / MANIFEST_FILE, what, relpath)
    path = model_dir / relpath
    root, resolved = model_dir.resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise ManifestError(
            f"{model_dir / MANIFEST_FILE}: {what} {relpath}: expected a file inside {root}, found a link to "
            f"{resolved}"
        )
    return path


@dataclass(frozen=True)
class Manifest:
    manifest_version: int
    created: str
    producer: dict[str, str | None]
    preprocess: dict[str, Any]
    artifacts: tuple[Artifact, ...] = field(default_factory=tuple)

    def find(self, kind: str, model: str | None = None, precision: str | None = None) -> Artifact | None:
        """The artifact of this kind (and model, precision), or None."""
        for a in self.artifacts:
            if a.kind == kind and model in (None, a.model) and precision in (None, a.precision):
                return a
        return None

    def get(self, path: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.path == path), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "created": self.created,
            "producer": dict(self.producer),
            "preprocess": self.preprocess,
            "artifacts": [a.to_dict() for a in self.artifacts],
        }


def producer_versions() -> dict[str, str | None]:
    """Installed versions of the tools that made (or will read) the artifacts; None when absent. No imports."""
    versions: dict[str, str | None] = {"brainrecon": __version__}
    for key, dists in _PRODUCERS.items():
        versions[key] = None
        for dist in dists:
            try:
                versions[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def describe_file(model_dir: str | Path, relpath: str | Path, kind: str, **meta: Any) -> Artifact:
    """Hash one file of the model directory into an Artifact."""
    model_dir = Path(model_dir)
    rel = Path(relpath).as_posix()
    path = model_dir / rel
    if not path.is_file():
        raise MissingFileError(path, f"{kind} artifact to record in {MANIFEST_FILE}")
    return Artifact(path=rel, sha256=sha256_file(path), size=path.stat().st_size, kind=kind, **meta)


def load_manifest(model_dir: str | Path, name: str = MANIFEST_FILE) -> Manifest:
    """Parse `model_dir/manifest.json` (or `name`); an unknown version or malformed entry is refused (no hashing)."""
    model_dir = Path(model_dir)
    path = model_dir / name
    if not path.is_file():
        raise MissingFileError(path, "deployment manifest", regenerate_hint(model_dir))
    data = read_json(path, "deployment manifest")
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: expected manifest_version {MANIFEST_VERSION}, found {version!r} ({regenerate_hint(model_dir)})"
        )
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, list):
        raise ManifestError(f"{path}: expected a list of artifacts, found {type(artifacts).__name__}")
    return Manifest(
        manifest_version=version,
        created=str(data.get("created", "")),
        producer=dict(data.get("producer") or {}),
        preprocess=dict(data.get("preprocess") or {}),
        artifacts=tuple(Artifact.from_dict(a, str(path)) for a in artifacts),
    )


class ManifestWarning(UserWarning):
    """An existing manifest could not be merged (unreadable or of another version) and is replaced whole."""


def write_manifest(
    model_dir: str | Path,
    artifacts: Iterable[Artifact],
    merge: bool = True,
    out: str | Path | None = None,
    drop: Iterable[str] = (),
) -> Manifest:
    """Write the manifest of `model_dir` atomically to `out` (default `model_dir/manifest.json`). With `merge`,
    entries of the existing manifest whose paths are not among `artifacts` are kept (exporting one model leaves
    the others' entries alone) unless their file is gone or their path is in `drop` (superseded engines,
    `brainrecon.export.tensorrt.superseded_engines`); an existing manifest that cannot be read is replaced,
    with a ManifestWarning naming why (its entries are lost, so the models it listed must be exported again).

    Without `manifest.json` but with MANIFEST_PREVIOUS (an export killed while publishing), entries are merged
    from that one, each re-hashed first: an entry whose file the killed export had already replaced is dropped
    (with a ManifestWarning), the others are kept.
    """
    model_dir = Path(model_dir)
    new = {a.path: a for a in artifacts}
    dropped = set(drop)
    kept: dict[str, Artifact] = {}
    recovering = not (model_dir / MANIFEST_FILE).is_file() and (model_dir / MANIFEST_PREVIOUS).is_file()
    source = MANIFEST_PREVIOUS if recovering else MANIFEST_FILE
    if merge and (model_dir / source).is_file():
        try:
            old = load_manifest(model_dir, source)
        except BrainReconError as e:
            warnings.warn(
                f"{model_dir / source}: not merged, replaced ({e}); export the other models again",
                ManifestWarning,
                stacklevel=2,
            )
        else:
            kept = {
                a.path: a
                for a in old.artifacts
                if a.path not in new and a.path not in dropped and (model_dir / a.path).is_file()
            }
            if recovering:
                kept = _still_intact(model_dir, kept)
    preprocess_path = model_dir / PREPROCESS
    preprocess = (
        read_json(preprocess_path, "recon-prepare preprocess.json") if preprocess_path.is_file() else {}
    )
    manifest = Manifest(
        manifest_version=MANIFEST_VERSION,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        producer=producer_versions(),
        preprocess=preprocess,
        artifacts=tuple(sorted({**kept, **new}.values(), key=lambda a: a.path)),
    )
    write_json(Path(out) if out is not None else model_dir / MANIFEST_FILE, manifest.to_dict())
    return manifest


def _still_intact(model_dir: Path, entries: dict[str, Artifact]) -> dict[str, Artifact]:
    """The entries whose file still has the recorded size and sha256; a ManifestWarning names the others."""
    intact = {
        p: a
        for p, a in entries.items()
        if (model_dir / p).stat().st_size == a.size and sha256_file(model_dir / p) == a.sha256
    }
    if changed := sorted(set(entries) - set(intact)):
        warnings.warn(
            f"{model_dir / MANIFEST_PREVIOUS}: {len(changed)} entries not merged, their files were replaced by an "
            f"interrupted export ({', '.join(changed)}); export those models again",
            ManifestWarning,
            stacklevel=3,
        )
    return intact


def verify_artifact(model_dir: str | Path, artifact: Artifact) -> None:
    """Re-hash one artifact; a missing file or a size/hash mismatch is a one-line error saying how to regenerate."""
    model_dir = Path(model_dir)
    path = confined(model_dir, artifact.path, f"{artifact.kind} artifact")
    if not path.is_file():
        raise MissingFileError(
            path, f"{artifact.kind} artifact listed in {MANIFEST_FILE}", regenerate_hint(model_dir)
        )
    size = path.stat().st_size
    found = sha256_file(path) if size == artifact.size else None
    if found != artifact.sha256:
        raise InputError(
            path,
            f"sha256 {artifact.sha256[:16]}… and {artifact.size} bytes as recorded in {MANIFEST_FILE}",
            f"{'sha256 ' + found[:16] + '…' if found else f'{size} bytes'}, a modified file ({regenerate_hint(model_dir)})",
        )


def verify_manifest(model_dir: str | Path, paths: Iterable[str] | None = None) -> Manifest:
    """Load the manifest and re-hash every artifact (or only `paths`, which must be listed). Returns the manifest."""
    manifest = load_manifest(model_dir)
    if paths is None:
        selected = list(manifest.artifacts)
    else:
        selected = []
        for p in paths:
            artifact = manifest.get(Path(p).as_posix())
            if artifact is None:
                raise ManifestError(
                    f"{Path(model_dir) / MANIFEST_FILE}: expected an entry for {p}, found none ({regenerate_hint(model_dir)})"
                )
            selected.append(artifact)
    for artifact in selected:
        verify_artifact(model_dir, artifact)
    return manifest
