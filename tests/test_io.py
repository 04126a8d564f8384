"""Atomic writes: a failure inside the block never touches the final path, an overwrite keeps the old output
until the new one is whole, data is fsynced before the rename that publishes it, and an overwrite replaces only an
output folder this tool marked as the same kind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from brainrecon.errors import InputError
from brainrecon.io import (
    OUTPUT_MARKER,
    RECON_INFER_OUTPUT,
    TRITON_REPOSITORY,
    atomic_dir,
    atomic_path,
    check_output_dir,
    output_kind,
    write_json,
)


class Crash(Exception):
    pass


def test_atomic_path_writes_under_another_name_until_the_block_ends(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible yet
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_crash_inside_atomic_path_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.write_text('{"v": ')  # half-written
        raise Crash
    assert target.read_text().strip().endswith("}") and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_crash_inside_atomic_dir_with_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "recon"
    with atomic_dir(out) as tmp:
        (tmp / "a.png").write_text("old")
    with pytest.raises(Crash), atomic_dir(out, overwrite=True) as tmp:
        assert (out / "a.png").read_text() == "old"  # the old output stays while the new one is built
        (tmp / "a.png").write_text("new, half")
        raise Crash
    assert (out / "a.png").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["recon"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.png").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b.png"]  # replaced whole, not merged


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """Spy (the real calls still run) on os.fsync and os.replace: ("fsync", path) and ("replace", destination)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """A power loss after the rename must not publish an empty file: data, then rename, then directory entry."""
    target = tmp_path / "out.json"
    events = record_fsyncs_and_renames(monkeypatch)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert events == [("fsync", str(tmp)), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_atomic_dir_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "recon"
    events = record_fsyncs_and_renames(monkeypatch)
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.png").write_bytes(b"png")
        (tmp / "b.npy").write_bytes(b"npy")
    rename = events.index(("replace", str(out)))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert synced_before == {str(tmp / "sub" / "a.png"), str(tmp / "b.npy"), str(tmp / "sub"), str(tmp)}
    assert events[rename + 1 :] == [("fsync", str(tmp_path))]


def test_overwrite_replaces_only_a_folder_marked_as_the_same_kind_of_output(tmp_path):
    out = tmp_path / "recon"
    with atomic_dir(out, kind=RECON_INFER_OUTPUT) as tmp:
        (tmp / "a.png").write_text("old")
    assert output_kind(out) == RECON_INFER_OUTPUT
    with atomic_dir(out, overwrite=True, kind=RECON_INFER_OUTPUT) as tmp:
        (tmp / "b.png").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b.png"]

    refused = pytest.raises(InputError, match="found a recon-infer output folder: not replaced")
    with refused, atomic_dir(out, overwrite=True, kind=TRITON_REPOSITORY):
        raise AssertionError("never reached: refused before the block")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for kind in (RECON_INFER_OUTPUT, TRITON_REPOSITORY):
        with (
            pytest.raises(InputError, match="delete it by hand"),
            atomic_dir(user, overwrite=True, kind=kind),
        ):
            raise AssertionError("never reached")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="found a file"):
        check_output_dir(tmp_path / "file", RECON_INFER_OUTPUT, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine" and (out / "b.png").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "recon"]  # no temporary left


def test_output_folders_that_hold_an_input_the_working_directory_home_or_root_are_refused(
    tmp_path, monkeypatch
):
    model = tmp_path / "engines" / "subj01"
    model.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    for out, found in (
        (tmp_path / "engines", "it is or holds the input"),
        (model, "it is or holds the input"),
        (Path("."), "the working directory"),
        (tmp_path, "the working directory"),
        (tmp_path / "home", "your home folder"),
        (Path("/"), "the working directory"),
    ):
        with pytest.raises(InputError, match=found):
            check_output_dir(out, RECON_INFER_OUTPUT, overwrite=True, inputs=(tmp_path / "elsewhere", model))
    check_output_dir(tmp_path / "new", RECON_INFER_OUTPUT, overwrite=False, inputs=(model,))  # fine
