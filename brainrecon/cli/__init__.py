"""Thin command-line wiring: one module per command group (data: recon-sim, recon-prepare; train: recon-train,
recon-reconstruct, recon-eval; deploy: recon-export, recon-infer, recon-bench), and what they share here. Logic
lives in importable functions; exit codes: 0 ok, 1 failure (one-line error), 2 usage."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from brainrecon.errors import BrainReconError

console = Console(stderr=True)


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Entry point that turns BrainReconError into a one-line message and exit 1."""

    def main() -> None:
        try:
            app()  # standalone: usage errors print and exit 2, success exits 0
        except BrainReconError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return main


def print_summary(title: str, summary: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(escape(str(key)), escape(str(value)))  # values like "brainrecon[trt]" are not markup
    Console().print(table)
