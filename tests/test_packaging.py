"""Every module imports through the installed `brainrecon` namespace, not through the repo's folder names."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import brainrecon


def test_all_modules_import_outside_the_repo(tmp_path):
    names = [m.name for m in pkgutil.walk_packages(brainrecon.__path__, "brainrecon.")]
    names += [
        m.name
        for sub in ("train", "export", "runtime", "benchmarks")
        for m in pkgutil.walk_packages(
            __import__(f"brainrecon.{sub}", fromlist=["x"]).__path__, f"brainrecon.{sub}."
        )
    ]
    assert "brainrecon.train.stage2.img2img" in names and "brainrecon.runtime.stage1" in names
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    # cwd outside the repo: a stray `from train.x import` only works when the repo root is on sys.path
    res = subprocess.run(
        [sys.executable, "-c", code, *sorted(set(names))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": "", "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-1500:]


def test_gpu_extras_bring_onnxruntime_gpu_and_never_both_wheels():
    """onnxruntime and onnxruntime-gpu install the same module; an extra that pulled both would break either."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def resolve(name: str) -> set[str]:
        out: set[str] = set()
        for req in extras[name]:
            nested = re.fullmatch(r"brainrecon\[(.+)\]", req)
            if nested:
                for sub in nested.group(1).split(","):
                    out |= resolve(sub.strip())
            else:
                out.add(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower())
        return out

    for name in extras:
        deps = resolve(name)
        assert not {"onnxruntime", "onnxruntime-gpu"} <= deps, name
    assert "onnxruntime-gpu" in resolve("all-gpu") and "onnxruntime" in resolve("all")
