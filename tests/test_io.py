"""Atomic writes: a failure inside the block never touches the final path, and an overwrite keeps the old output
until the new one is whole."""

from __future__ import annotations

import pytest

from brainrecon.io import atomic_dir, atomic_path, write_json


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
