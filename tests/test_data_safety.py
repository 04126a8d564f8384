"""Nothing deletes what it did not make, and a killed or failing write loses nothing (issue 20, items 4 and 5).

Faults are real: exports run in a subprocess that is SIGKILLed at a point it reports itself (the
BRAINRECON_EXPORT_PAUSE_AT hook of export/subject.py: the export prints `paused at <point>` and waits on stdin, so
no timing is involved), "disk full" is a real write failing under RLIMIT_FSIZE, and the overwrite refusals run the
real commands. The model folders are copies of the tiny stage-1 GRU folder of tests/fixtures.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from brainrecon.errors import MissingFileError
from brainrecon.export.subject import PAUSE_ENV, export_model_dir
from brainrecon.io import OUTPUT_MARKER, sha256_file
from brainrecon.manifest import MANIFEST_FILE, MANIFEST_PREVIOUS, Artifact, load_manifest, verify_manifest
from tests.fixtures import build_tiny_stage1

REPO = Path(__file__).resolve().parents[1]
EXPORT = (
    "import sys; from brainrecon.export.subject import export_model_dir; "
    "export_model_dir(sys.argv[1], stage='gru', precision='fp16', validate=False)"
)
# The fake engine entry: an engine "built elsewhere" for a model the re-exports below do not touch.
ENGINE = "trt/vdvae_decoder.fp16.0123456789ab.plan"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_stage1(tmp_path_factory.getbasetemp() / "tiny-stage1")


@pytest.fixture
def model_dir(tiny, tmp_path) -> Path:
    """A copy of the tiny GRU folder whose manifest also lists an engine built on another machine."""
    from brainrecon.manifest import write_manifest

    model_dir = tmp_path / "model"
    shutil.copytree(tiny["gru"], model_dir)
    plan = model_dir / ENGINE
    plan.parent.mkdir()
    plan.write_bytes(b"a TensorRT plan built on another machine")
    entry = Artifact(
        ENGINE,
        sha256_file(plan),
        plan.stat().st_size,
        "engine",
        model="vdvae_decoder",
        precision="fp16",
        engine_key={"built": "elsewhere"},
        source="onnx/vdvae_decoder.fp16.onnx",
    )
    write_manifest(model_dir, [entry])
    return model_dir


def entries(model_dir: Path, name: str = MANIFEST_FILE) -> set[str]:
    return {a.path for a in load_manifest(model_dir, name).artifacts}


def snapshot(model_dir: Path) -> dict[str, bytes]:
    """Every published file of the folder (not the lock file, not staging folders), by relative path."""
    files = {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}
    return {rel: p.read_bytes() for rel, p in files.items() if not rel.startswith(".export")}


def start_export(model_dir: Path, pause_at: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: pause_at, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", EXPORT, str(model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 - the child holds it; closed when the child ends
        text=True,
        env=env,
        cwd=REPO,
    )


def wait_paused(proc: subprocess.Popen, point: str, log: Path) -> None:
    """Block until the export says it paused at `point` (a line on its stdout), or fail if it ended without."""
    for line in proc.stdout:
        if line.strip() == f"paused at {point}":
            return
    raise AssertionError(
        f"the export ended (rc {proc.wait()}) without pausing at {point}: {log.read_text()[-800:]}"
    )


def kill_at(model_dir: Path, point: str, tmp_path: Path) -> None:
    log = tmp_path / f"export-{point}.log"
    proc = start_export(model_dir, point, log)
    wait_paused(proc, point, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


# ----------------------------------------------------------------------------------------- export faults


def test_export_killed_after_staging_loses_nothing_and_the_next_export_cleans_up(model_dir, tmp_path):
    """SIGKILL with every file staged (lock held): the published folder is byte-identical, the staging folder is
    left behind (the fault is real), and the next export removes it and keeps every other entry."""
    before, listed = snapshot(model_dir), entries(model_dir)
    kill_at(model_dir, "staged", tmp_path)
    assert snapshot(model_dir) == before  # nothing published, nothing removed
    assert len(list(model_dir.glob(".export-*.tmp"))) == 1  # what a killed export leaves

    export_model_dir(model_dir, stage="gru", precision="fp16", validate=False)
    assert not list(model_dir.glob(".export-*.tmp"))  # the dead export's staging folder is gone
    assert entries(model_dir) == listed  # engines and the other models' and precisions' entries survive
    verify_manifest(model_dir)


def test_export_killed_mid_publish_keeps_the_old_manifest_aside_and_the_reexport_merges_it(
    model_dir, tmp_path
):
    """SIGKILL after the old manifest went aside and the new files moved in, before the new manifest: no manifest
    (the runtime says to re-export), the old one kept aside intact; the re-export merges its entries back."""
    from brainrecon.runtime import Reconstructor

    old_manifest, listed = (model_dir / MANIFEST_FILE).read_bytes(), entries(model_dir)
    kill_at(model_dir, "publishing", tmp_path)
    assert not (model_dir / MANIFEST_FILE).exists()
    assert (model_dir / MANIFEST_PREVIOUS).read_bytes() == old_manifest  # kept aside, not deleted
    with pytest.raises(MissingFileError, match="recon-export"):
        Reconstructor.open(model_dir, stage=1)

    export_model_dir(model_dir, stage="gru", precision="fp16", validate=False)  # the same command, again
    assert entries(model_dir) == listed  # the engine, vdvae_decoder fp32/fp16 and gru fp32 came back
    assert not (model_dir / MANIFEST_PREVIOUS).exists() and not list(model_dir.glob(".export-*.tmp"))
    verify_manifest(model_dir)
    Reconstructor.open(model_dir, stage=1).close()


def test_merging_from_the_kept_aside_manifest_drops_entries_whose_file_was_replaced(model_dir):
    """After a crash mid-publish a file may hold the killed export's bytes: its old entry must not vouch for it."""
    from brainrecon.manifest import ManifestWarning

    os.replace(model_dir / MANIFEST_FILE, model_dir / MANIFEST_PREVIOUS)  # the state a killed publish leaves
    with open(model_dir / "onnx/gru.fp16.onnx", "ab") as f:
        f.write(b"\0")  # "replaced" by the killed export
    with pytest.warns(ManifestWarning, match="gru.fp16.onnx"):
        export_model_dir(model_dir, stage="vdvae", precision="fp32", validate=False)
    listed = entries(model_dir)
    assert "onnx/gru.fp16.onnx" not in listed and {ENGINE, "onnx/gru.fp32.onnx"} <= listed
    verify_manifest(model_dir)


def test_a_second_export_into_the_same_folder_is_refused_in_one_line(
    model_dir, tmp_path, monkeypatch, capsys
):
    from brainrecon.cli.deploy import export_main

    log = tmp_path / "first.log"
    first = start_export(model_dir, "staged", log)
    try:
        wait_paused(first, "staged", log)
        monkeypatch.setattr(sys, "argv", ["recon-export", "--model-dir", str(model_dir), "--stage", "vdvae"])
        with pytest.raises(SystemExit) as e:
            export_main()
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {first.pid}" in err and "wait for it to finish" in err
        assert (
            len(list(model_dir.glob(".export-*.tmp"))) == 1
        )  # the live export's staging folder is untouched
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait() == 0, log.read_text()[-800:]
    finally:
        if first.poll() is None:
            first.kill()
    verify_manifest(model_dir)


# ----------------------------------------------------------------------------------------- disk full


def limit_file_size(limit: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG

    return set_limit


def test_disk_full_while_rewriting_a_file_keeps_the_old_one(tmp_path):
    """write_json (used for manifests, summaries, recon-batch markers) past a 4 KiB file-size limit."""
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')
    script = (
        "import sys; from brainrecon.io import write_json; from brainrecon.errors import BrainReconError\n"
        "try:\n    write_json(sys.argv[1], {'rows': list(range(10000))})\n"
        "except BrainReconError as e:\n    print(e, file=sys.stderr); sys.exit(1)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size(4096),
        cwd=REPO,
    )
    assert run.returncode == 1, run.stderr
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and "File too large" in err and str(target) in err
    assert target.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == [
        "summary.json"
    ]


def test_disk_full_during_recon_infer_overwrite_keeps_the_old_output(tiny, tmp_path):
    """recon-infer --overwrite of its own output under a 16 KiB file-size limit (its arrays are larger): the command
    fails in one line, the old output stays whole and no temporary folder is left."""
    out = tmp_path / "recon"
    infer = [sys.executable, "-c", "from brainrecon.cli.deploy import infer_main; infer_main()"]
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(tiny["gru"]), "--out", str(out)]
    subprocess.run([*infer, *args], check=True, capture_output=True, cwd=REPO)
    before = snapshot(out)
    run = subprocess.run(
        [*infer, *args, "--overwrite"],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size(16 * 1024),
        cwd=REPO,
    )
    assert run.returncode == 1, run.stderr
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and f"{out}: expected to write it" in err, err
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["recon"]


# ----------------------------------------------------------------------------------------- --overwrite and --out


def run_main(monkeypatch, main, name: str, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def refusal(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_recon_infer_refuses_outputs_that_would_destroy_inputs_or_folders_it_did_not_make(
    tiny, model_dir, tmp_path, monkeypatch, capsys
):
    from brainrecon.cli.deploy import infer_main

    betas = tmp_path / "in" / "test_betas.npy"
    betas.parent.mkdir()
    shutil.copyfile(tiny["prep"] / "test_betas.npy", betas)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    before = snapshot(model_dir)

    def infer(out: str | Path, *extra: str) -> int:
        args = [str(betas), "--model-dir", str(model_dir), "--out", str(out), "--trials", "0-1", *extra]
        return run_main(monkeypatch, infer_main, "recon-infer", *args)

    for out, expected in (
        (model_dir, "it is or holds the input"),  # the model folder
        (tmp_path, "the working directory"),  # holds the model and the betas, and is the working directory
        (".", "the working directory"),
        (home, "your home folder"),
        ("/", "the working directory"),  # `/` holds every folder, the working directory first
        (betas.parent, "it is or holds the input"),
        (mine, "delete it by hand"),  # made by hand, or by a version before the marker
    ):
        assert infer(out, "--overwrite") == 1, out
        assert expected in refusal(capsys), out
    assert snapshot(model_dir) == before and (mine / "notes.txt").is_file()

    out = tmp_path / "recon"
    assert infer(out) == 0 and (out / OUTPUT_MARKER).is_file()
    assert infer(out) == 1 and "--overwrite" in refusal(capsys)
    assert infer(out, "--overwrite") == 0  # its own kind of output: replaced
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "recon-infer output"
    capsys.readouterr()

    from brainrecon.cli.deploy import export_main

    for repo, expected in ((model_dir, "it is or holds the input"), (out, "a recon-infer output folder")):
        args = ["--model-dir", str(model_dir), "--format", "triton", "--out", str(repo), "--overwrite"]
        assert run_main(monkeypatch, export_main, "recon-export", *args) == 1
        assert expected in refusal(capsys)
    assert snapshot(model_dir) == before and (out / "summary.json").is_file()


def test_recon_sim_and_prepare_refuse_folders_they_did_not_make(tmp_path, monkeypatch, capsys):
    from brainrecon.cli.data import prepare_main, sim_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    assert run_main(monkeypatch, sim_main, "recon-sim", "--out", str(mine), "--overwrite") == 1
    assert "delete it by hand" in refusal(capsys) and (mine / "notes.txt").is_file()

    sim = tmp_path / "sim"
    assert run_main(monkeypatch, sim_main, "recon-sim", "--out", str(sim), "--preset", "tiny") == 0
    capsys.readouterr()
    for out, expected in ((sim, "it is or holds the input"), (mine, "delete it by hand")):
        args = ["--nsd-root", str(sim), "--out", str(out), "--overwrite"]
        assert run_main(monkeypatch, prepare_main, "recon-prepare", *args) == 1
        assert expected in refusal(capsys)
    assert (sim / OUTPUT_MARKER).is_file() and (mine / "notes.txt").is_file()
    prep = tmp_path / "prep"
    args = ["--nsd-root", str(sim), "--out", str(prep)]
    assert run_main(monkeypatch, prepare_main, "recon-prepare", *args) == 0
    capsys.readouterr()
    assert run_main(monkeypatch, sim_main, "recon-sim", "--out", str(prep), "--overwrite") == 1
    assert "a prepared subject folder" in refusal(capsys)  # another kind of output: not replaced
    assert run_main(monkeypatch, prepare_main, "recon-prepare", *args, "--overwrite") == 0


# ----------------------------------------------------------------------------------------- make clean


def test_make_clean_keeps_trained_model_folders_and_prepared_data(tmp_path):
    """`make clean` in a folder laid out as the README says: the venvs, caches and demo outputs go, the trained
    model folder and the prepared subject stay."""
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    made = [
        ".venv/bin/python",
        ".venv-serve/bin/python",
        ".pytest_cache/x",
        ".bench-check/model/manifest.json",
    ]
    made += ["data/sim-demo/x", "data/recon/x", "data/report/index.html"]
    kept = [
        "engines/subj01/manifest.json",
        "engines/real-size-model/x",
        "data/subj01/test_betas.npy",
        "data/nsd/x",
    ]
    for rel in made + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path), "clean"], check=True)
    assert [rel for rel in kept if not (tmp_path / rel).is_file()] == []
    assert [rel for rel in made if (tmp_path / rel).exists()] == []
