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


def test_every_set_of_choices_is_defined_once_in_choices_py():
    """brainrecon/choices.py names each set of choices once (a `Literal` and the tuple derived from it). Elsewhere,
    a `Literal[`, a module-level constant holding a tuple, list or set literal with the strings of one of its sets
    (in any order), or a module-level name of one of its tuples (`STAGES = ...`: one name, one meaning) is a second
    definition that would drift from it. The failure names file, line and set."""
    import ast

    from brainrecon import choices

    tuples = {name: v for name, v in vars(choices).items() if name.isupper() and isinstance(v, tuple)}
    assert {"STAGES", "ENGINES", "PRECISIONS", "DEVICES", "UNET_GRAPHS", "TRITON_ENGINES"} <= set(tuples)
    string_sets = {
        frozenset(v): name for name, v in tuples.items() if len(v) > 1 and all(isinstance(x, str) for x in v)
    }
    root = Path(__file__).parents[1]
    found = []
    for folder in ("brainrecon", "train", "export", "runtime", "serve", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == root / "brainrecon" / "choices.py":
                continue
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                value = getattr(node, "value", None)
                if isinstance(node, ast.Subscript) and "Literal" in (
                    getattr(value, "id", None),
                    getattr(value, "attr", None),
                ):
                    found.append(f"{rel}:{node.lineno} Literal[...]")
            for stmt in tree.body:  # module-level constants
                if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
                    continue
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                found += [
                    f"{rel}:{stmt.lineno} a new meaning of choices.{n.id}"
                    for t in targets
                    for n in ast.walk(t)  # NAME = ... and A, NAME = ...
                    if isinstance(n, ast.Name) and n.id in tuples
                ]
                for node in ast.walk(stmt.value):
                    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(
                        isinstance(e, ast.Constant) for e in node.elts
                    ):
                        name = string_sets.get(frozenset(e.value for e in node.elts))
                        if name:
                            found.append(f"{rel}:{node.lineno} the values of choices.{name}")
    assert not found, "sets of choices defined outside brainrecon/choices.py: " + "; ".join(found)
