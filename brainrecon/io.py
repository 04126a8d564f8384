"""Atomic, durable writes; output folders that only this tool's own kind of output may replace; safe reads.

A crash never leaves a half-written artifact at its final path: every writer builds under a temporary name, then
`fsync`s the file (or every file of a folder) and renames it into place, then `fsync`s the directory, so the rename
that publishes it survives a power loss too (the POSIX rename-then-fsync-the-directory pattern; see the LWN article
"Ensuring data reaches disk", 2011). A write that fails (disk full, a file-size limit) raises a one-line WriteError
and leaves the previous file as it was.

Output folders: `atomic_dir(path, overwrite, kind=...)` writes a small marker file (OUTPUT_MARKER) naming its kind
("recon-infer output", "triton repository", ...). `--overwrite` replaces only a folder that carries the marker of
that kind; anything else (a model folder, a folder made by hand or by a version before the markers) is refused,
and so is an output folder that is the working directory, home, `/`, or that is or holds one of the command's
inputs (`check_output_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError, InputError, MissingFileError

# The marker file of an output folder this tool made; its content names the kind of output (OUTPUT_KINDS).
OUTPUT_MARKER = ".brainrecon-output"
RECON_INFER_OUTPUT = "recon-infer output"
TRITON_REPOSITORY = "triton repository"
SIMULATED_SUBJECT = "simulated subject"
PREPARED_SUBJECT = "prepared subject"
OUTPUT_KINDS = (RECON_INFER_OUTPUT, TRITON_REPOSITORY, SIMULATED_SUBJECT, PREPARED_SUBJECT)


# errnos of a write the disk or a limit refused (ENOSPC disk full, EDQUOT quota, EFBIG file-size limit, EROFS)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class WriteError(BrainReconError):
    """A write that the disk or a limit refused (disk full, quota, file-size limit); nothing was replaced."""

    def __init__(self, path: str | Path, error: OSError):
        self.error = error
        found = (
            f"{os.strerror(error.errno)} (errno {error.errno})"
            if error.errno
            else f"a failed write ({' '.join(str(error).split())})"  # numpy reports a short write without errno
        )
        super().__init__(
            f"{path}: expected to write it, found {found}; the previous output, if any, is unchanged"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (its rename can then never publish an empty or partial file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename or an unlink in it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (bottom-up, `root` last), before `root` is renamed into place."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                fsync_file(file)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, fsync it, rename it onto `path` and fsync the
    directory. A failed write (OSError: disk full, file-size limit) is a WriteError; the old `path` is untouched and
    the temporary is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        try:
            yield tmp_path
            fsync_file(tmp_path)
            os.replace(tmp_path, path)
            fsync_dir(path.parent)
        except OSError as e:
            if e.errno is not None and e.errno not in _WRITE_ERRNOS:
                raise
            raise WriteError(path, e) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    path: str | Path, kind: str, overwrite: bool, inputs: tuple[str | Path | None, ...] = ()
) -> None:
    """Refuse, before any work, an output folder that writing `kind` there could destroy something with.

    Refused: the working directory, home, `/` or a folder holding one of them; a folder that is or holds one of
    `inputs` (a model folder, a betas file; None entries are skipped); an existing path without `overwrite`; with
    `overwrite`, an existing path that is not a folder carrying this tool's OUTPUT_MARKER for `kind`.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind: expected one of {OUTPUT_KINDS}, found {kind!r}")
    path = Path(path)
    resolved = path.expanduser().resolve()
    for name, protected in (("the working directory", Path.cwd()), ("your home folder", Path.home())):
        if _same_or_inside(protected.resolve(), resolved):
            raise InputError(path, f"a {kind} folder of its own", f"{name} ({protected}) would be inside it")
    if resolved == Path(resolved.anchor):
        raise InputError(path, f"a {kind} folder of its own", "the filesystem root")
    for given in inputs:
        if given is not None and _same_or_inside(Path(given).expanduser().resolve(), resolved):
            raise InputError(
                path, f"a {kind} folder apart from the inputs", f"it is or holds the input {given}"
            )
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise InputError(path, "a new output directory (or --overwrite)", "an existing path")
    found = output_kind(path)
    if found is None:
        what = "a file" if not path.is_dir() or path.is_symlink() else f"a folder without {OUTPUT_MARKER}"
        raise InputError(
            path,
            f"a {kind} folder made by brainrecon (it holds {OUTPUT_MARKER}) to replace with --overwrite",
            f"{what}: not replaced (if it is an output of an earlier version, delete it by hand)",
        )
    if found != kind:
        raise InputError(
            path, f"a {kind} folder to replace with --overwrite", f"a {found} folder: not replaced"
        )


def output_kind(path: str | Path) -> str | None:
    """The kind of output this tool recorded in folder `path` (its OUTPUT_MARKER), or None."""
    marker = Path(path) / OUTPUT_MARKER
    if Path(path).is_symlink() or not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        return None
    return kind if kind in OUTPUT_KINDS else None


def mark_output(path: str | Path, kind: str) -> None:
    """Record in folder `path` that this tool made it as a `kind` (what `--overwrite` checks)."""
    from brainrecon import __version__

    write_json(Path(path) / OUTPUT_MARKER, {"kind": kind, "brainrecon": __version__})


@contextlib.contextmanager
def output_dir(
    path: str | Path, kind: str, overwrite: bool, inputs: tuple[str | Path | None, ...] = ()
) -> Iterator[Path]:
    """For commands whose library function writes the folder itself: check `path` first (check_output_dir), run the
    block (which writes `path` atomically), then mark it as `kind`."""
    check_output_dir(path, kind, overwrite, inputs)
    yield Path(path)
    mark_output(path, kind)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    overwrite: bool = False,
    kind: str | None = None,
    inputs: tuple[str | Path | None, ...] = (),
) -> Iterator[Path]:
    """Build a directory under a temporary name; when complete, fsync it and move it into place.

    An existing `path` is an error unless `overwrite`; then it is replaced only after the new one is whole. With
    `kind` (a user-named output folder: OUTPUT_KINDS), `path` is checked first (check_output_dir, with `inputs`) and
    the new folder carries the marker of `kind`. Without it (a folder inside one the caller owns, such as a model
    folder's stage1/), `overwrite` replaces whatever is there. A failed write is a WriteError.
    """
    path = Path(path)
    if kind is not None:
        check_output_dir(path, kind, overwrite, inputs)
    elif path.exists() and not overwrite:
        raise InputError(path, "a new output directory (or --overwrite)", "an existing path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        try:
            yield tmp
            if kind is not None:
                mark_output(tmp, kind)
            fsync_tree(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                fsync_dir(path.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
                fsync_dir(path.parent)
        except WriteError as e:  # a file inside: name the output the user asked for, not its temporary folder
            raise WriteError(path, e.error) from None
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            raise WriteError(path, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, "valid JSON", f"a parse error ({e})") from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_npy(path: str | Path, what: str = "array", mmap: bool = False) -> np.ndarray:
    """np.load without pickle; a pickled or corrupt file is a one-line InputError."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what)
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InputError(path, "a plain .npy array", "a pickled object array (refused)") from None
        raise InputError(path, "a valid .npy file", f"an unreadable file ({e})") from None
    except (OSError, EOFError) as e:
        raise InputError(path, "a valid .npy file", f"an unreadable file ({e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
