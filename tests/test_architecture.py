"""The import rules of docs/architecture.md, checked on the source: every `import` and `from ... import` statement
of every module (at the top or inside a function), read with `ast`.

Each folder may import the project's folders listed in ALLOWED (and itself, and any third-party package except the
ones in FORBIDDEN_THIRD_PARTY). A rule broken names the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder on disk → the package it is installed as (pyproject.toml package-dir)
PACKAGES = {
    "brainrecon": "brainrecon",
    "train": "brainrecon.train",
    "export": "brainrecon.export",
    "runtime": "brainrecon.runtime",
    "serve": "brainrecon.serve",
    "benchmarks": "brainrecon.benchmarks",
}
PROJECT = tuple(PACKAGES.values())
CORE = "brainrecon"  # the torch-free core: brainrecon/ without cli/ (the commands wire everything together)

# What each part may import from the project besides itself and the core. "brainrecon.runtime" means the runtime's
# public API (its package __init__) only; "brainrecon.runtime.*" any runtime module.
ALLOWED = {
    CORE: set(),
    "brainrecon.runtime": set(),
    "brainrecon.train": {"brainrecon.runtime"},
    "brainrecon.export": {"brainrecon.train.*", "brainrecon.runtime.*"},
    # runtime.inputs: recon-stream applies the model folder's recorded preprocessing (Preprocessing) to its betas
    "brainrecon.serve": {"brainrecon.runtime", "brainrecon.runtime.inputs", "brainrecon.export.triton"},
    "brainrecon.benchmarks": {
        "brainrecon.train.*",
        "brainrecon.export.*",
        "brainrecon.runtime.*",
        "brainrecon.serve.*",
    },
}
HEAVY = {"torch", "torchvision", "diffusers", "transformers"}
FORBIDDEN_THIRD_PARTY = {
    CORE: HEAVY,
    "brainrecon.runtime": HEAVY,
    "brainrecon.serve": HEAVY,
    "brainrecon.train": set(),
    "brainrecon.export": set(),
    "brainrecon.benchmarks": set(),
}


def part_of(path: Path) -> str | None:
    """The part a source file belongs to (None for the CLI, which may import anything, lazily)."""
    rel = path.relative_to(ROOT)
    if rel.parts[:2] == ("brainrecon", "cli"):
        return None
    return PACKAGES[rel.parts[0]] if rel.parts[0] != "brainrecon" else CORE


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement; relative imports resolved against the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    return found


def owner(name: str) -> str | None:
    """The project part a module name belongs to, or None for a third-party module."""
    for package in sorted(PROJECT, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            return package
    return None


def allowed(importer: str, name: str) -> bool:
    target = owner(name)
    if target is None:
        return name.split(".")[0] not in FORBIDDEN_THIRD_PARTY[importer]
    if target in (importer, CORE):
        return target != CORE or not name.startswith("brainrecon.cli")
    for rule in ALLOWED[importer]:
        if rule.endswith(".*") and (name == rule[:-2] or name.startswith(rule[:-1])):
            return True
        if name == rule:  # the public API: the package itself, not its modules
            return True
    return False


def sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def test_every_part_imports_only_what_architecture_md_allows():
    broken = [
        f"{path.relative_to(ROOT)}:{line}: {part} imports {name}"
        for path in sources()
        if (part := part_of(path)) is not None
        for line, name in imports(path)
        if not allowed(part, name)
    ]
    assert not broken, "import rules of docs/architecture.md broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("importer", "name", "ok"),
    [
        ("brainrecon.runtime", "torch", False),
        ("brainrecon.runtime", "brainrecon.train.stage2.img2img", False),
        ("brainrecon.runtime", "brainrecon.errors", True),
        ("brainrecon.train", "brainrecon.runtime", True),
        ("brainrecon.train", "brainrecon.runtime.stage2", False),
        ("brainrecon.train", "brainrecon.serve.ray_batch", False),
        ("brainrecon.serve", "brainrecon.export.triton", True),
        ("brainrecon.serve", "brainrecon.train", False),
        (CORE, "brainrecon.runtime", False),
        (CORE, "brainrecon.cli", False),
        ("brainrecon.export", "brainrecon.serve", False),
    ],
)
def test_the_rule_checker_itself(importer, name, ok):
    """The checker refuses what the rules forbid (so the test above cannot pass by checking nothing)."""
    assert allowed(importer, name) is ok


def test_the_checker_sees_imports_inside_functions():
    src = ROOT / "runtime" / "api.py"
    names = {name for _, name in imports(src)}
    assert "numpy" in names and any(n.startswith("brainrecon.runtime") for n in names)
    assert len(sources()) > 50
