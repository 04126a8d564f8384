"""One static HTML report of a fitted subject and the committed results (torch-free: json, html, shutil).

`build_report(model_dir, out, results=..., recon=...)` writes `out/index.html` and copies every image it shows
into `out/images/`, so the folder opens offline anywhere (no network, no server). Sections, each shown when its
inputs exist:

- model: data sizes (preprocess.json), stage 1 (regressor, K, parameters), stage 2 (CLIP ridges, sampling),
  foundations (source, sha256, file sizes), exported artifacts (manifest.json);
- final reconstructions: the recon-infer / recon-reconstruct folder's metrics.json and contact sheet;
- the results tables with their controls: stage1/, stage2/, noise/, layers/ (and layers/full-recipe/), blob/;
- speed: stage1_runtime.json and stage2_runtime.json (median seconds per part and engine).

Every number in a table cell carries its JSON value in `data-value` and is shown rounded to 3 decimals (counts as
integers), so a test can compare the page with the JSON files. A short inline script (no external resources)
counts the images that loaded and writes it to `<body data-images-total data-images-loaded>` for headless checks.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brainrecon import model_dir as layout
from brainrecon.choices import FILE_PRECISIONS
from brainrecon.errors import MissingFileError
from brainrecon.io import atomic_dir

Column = tuple[str, str, str]  # (key, header, kind: "text" | "num" | "int" | "pm")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: .4em 0; }
p.note { color: #555; font-size: .9em; max-width: 75em; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok.length));
});
"""


def fmt(value: Any, kind: str) -> str:
    """How a table shows a value: 3 decimals for metrics, thousands separators for counts."""
    if value is None or value == "":
        return ""
    if kind == "int" and isinstance(value, int | float):
        return f"{int(value):,}"
    if kind == "num" and isinstance(value, int | float):
        return f"{float(value):.3f}"
    return str(value)


def html_table(rows: Sequence[dict], columns: Sequence[Column], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, kind in columns:
            value = row.get(key)
            if kind == "pm":  # mean ± std over seeds
                std = row.get(f"{key}_std")
                text = f"{fmt(value, 'num')} ± {fmt(std, 'num')}" if value is not None else ""
                cells.append(
                    f'<td data-key="{key}" data-value="{value}" data-std="{std}">{html.escape(text)}</td>'
                )
            elif kind in ("num", "int") and isinstance(value, int | float):
                cells.append(
                    f'<td data-key="{key}" data-value="{value}">{html.escape(fmt(value, kind))}</td>'
                )
            else:
                cells.append(f'<td class="text" data-key="{key}">{html.escape(fmt(value, "text"))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _read(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Page:
    def __init__(self, out: Path):
        self.out = out
        self.parts: list[str] = []
        self.images = 0

    def h2(self, title: str, anchor: str) -> None:
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def p(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, rows: Sequence[dict], columns: Sequence[Column], table_id: str) -> None:
        self.parts.append(html_table(rows, columns, table_id))

    def image(self, src: Path, alt: str) -> None:
        """Copy `src` into images/ and show it; a missing file is skipped (the section says what it has)."""
        if not src.is_file():
            return
        self.images += 1
        name = f"{self.images:02d}-{src.parent.name}-{src.name}".replace(" ", "_")
        shutil.copyfile(src, self.out / "images" / name)
        self.parts.append(
            f'<figure><img src="images/{html.escape(name)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        )


METRIC_COLUMNS: list[Column] = [
    ("pixcorr", "PixCorr ↑", "num"),
    ("ssim", "SSIM ↑", "num"),
    ("clip_2way", "CLIP 2-way ↑ (subject's CLIP, ours)", "num"),
]
# The repository's guides, linked from the page when the package runs from a checkout (not from a wheel)
DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = (
    ("architecture", "architecture.md"),
    ("experiments", "experiments.md"),
    ("metrics", "metrics.md"),
    ("speed", "speed.md"),
)


def _guides_note(out: Path) -> str:
    """Links from the report folder to the repository's guides, or "" when there is no checkout beside it."""
    if not DOCS.is_dir():
        return ""
    links = [
        f'<a href="{html.escape(Path(os.path.relpath(DOCS / name, out)).as_posix())}">{label}</a>'
        for label, name in GUIDES
        if (DOCS / name).is_file()
    ]
    return f" Guides: {' · '.join(links)}." if links else ""


def _paper_table(page: _Page, data: dict, name_key: str, table_id: str) -> None:
    """Brain-Diffuser's eight metrics of every row, in the papers' order, when the results file has them
    (recon-eval stage1|stage2 since 2026-12-05), and which files the missing columns need."""
    info = data.get("paper_metrics")
    if not info:
        return
    order, labels = info["order"], info["labels"]
    rows = [
        {name_key: r[name_key], **{f"paper_{m}": r.get("paper", {}).get(m) for m in order}}
        for r in data["rows"]
    ]
    page.p(
        "Brain-Diffuser's eight metrics, in the papers' order (identification as a fraction; docs/metrics.md): "
        f"computed {', '.join(labels[m] for m in info['computed'])}."
        + "".join(f" {labels[m]}: needs {need}." for m, need in info["missing"].items())
    )
    page.table(
        rows, [(name_key, name_key, "text"), *((f"paper_{m}", labels[m], "num") for m in order)], table_id
    )


def build_report(
    model_dir: str | Path,
    out: str | Path,
    results: str | Path = "benchmarks/results",
    recon: str | Path | None = None,
    overwrite: bool = True,
) -> Path:
    """Write out/index.html (+ out/images/) for `model_dir` and the results folder; returns the index path."""
    model_dir, out, results = Path(model_dir), Path(out), Path(results)
    if not model_dir.is_dir():
        raise MissingFileError(model_dir, "subject model folder", "run recon-train subject first")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        page = _Page(tmp)
        sections: list[tuple[str, Callable[[_Page], bool]]] = [
            ("model", lambda pg: _model_section(pg, model_dir)),
            ("final", lambda pg: _final_section(pg, Path(recon)) if recon else False),
            ("stage1", lambda pg: _stage1_section(pg, results / "stage1")),
            ("stage2", lambda pg: _stage2_section(pg, results / "stage2")),
            ("blob", lambda pg: _blob_section(pg, results / "blob")),
            ("foundations", lambda pg: _foundations_section(pg, results / "foundations")),
            ("noise", lambda pg: _noise_section(pg, results / "noise")),
            ("layers", lambda pg: _layers_section(pg, results / "layers")),
            ("speed", lambda pg: _speed_section(pg, results)),
        ]
        shown = [name for name, fn in sections if fn(page)]
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        nav = " · ".join(f'<a href="#{s}">{s}</a>' for s in shown)
        doc = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>brainrecon report: {html.escape(model_dir.name)}</title><style>{_CSS}</style></head>"
            f'<body data-sections="{" ".join(shown)}"><h1>brainrecon report: {html.escape(str(model_dir))}</h1>'
            f'<p class="note">Generated {stamp} by recon-eval report from {html.escape(str(model_dir))} and '
            f"{html.escape(str(results))}. Sections: {nav}.{_guides_note(out.resolve())}</p>"
            + "\n".join(page.parts)
            + f"<script>{_SCRIPT}</script></body></html>\n"
        )
        (tmp / "index.html").write_text(doc, encoding="utf-8")
    return out / "index.html"


# ------------------------------------------------------------------------------------------------ sections


def _model_section(page: _Page, model_dir: Path) -> bool:
    page.h2("Model", "model")
    rows = []
    prep = _read(model_dir / layout.PREPROCESS) or {}
    for key in ("nsd_root", "subject", "n_trials", "n_voxels", "n_train", "n_test", "image_size"):
        if isinstance(prep, dict) and key in prep:
            rows.append({"item": f"data: {key}", "value": prep[key]})
    s1 = _read(model_dir / layout.STAGE1_SUMMARY)
    if s1:
        cfg = s1.get("config", {})
        rows += [
            {"item": "stage 1 regressor", "value": cfg.get("regressor")},
            {"item": "stage 1 latent layers K", "value": cfg.get("num_layers")},
            {"item": "stage 1 latent dims", "value": s1.get("latent_dims")},
            {"item": "stage 1 regressor parameters", "value": s1.get("regressor_parameters")},
            {"item": "voxels", "value": s1.get("n_voxels")},
            {"item": "training images", "value": s1.get("n_train")},
            {
                "item": "VDVAE",
                "value": f"{cfg.get('vdvae')} (sha256 {s1['foundation']['vdvae']['sha256'][:12]}…)",
            },
        ]
    s2 = _read(model_dir / layout.STAGE2_SUMMARY)
    if s2:
        for name, ridge in s2.get("clip_ridge", {}).items():
            rows.append(
                {
                    "item": f"CLIP-{name} ridge rank / parameters",
                    "value": f"{ridge['rank']} / {ridge['parameters']:,}",
                }
            )
        for name, info in s2.get("foundation", {}).items():
            rows.append(
                {
                    "item": f"foundation {name}",
                    "value": f"{info.get('source')} (sha256 {str(info.get('sha256'))[:12]}…)",
                }
            )
        sampling = s2.get("sampling", {})
        rows.append({"item": "sampling", "value": ", ".join(f"{k} {v}" for k, v in sampling.items())})
    page.table(rows, [("item", "item", "text"), ("value", "value", "text")], "model-summary")
    weights = Path(__file__).resolve().parent / "weights"
    sizes = []
    for folder in sorted(p for p in weights.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        sizes.append({"foundation": folder.name, "megabytes": round(size / 1e6, 2)})
    page.table(
        sizes, [("foundation", "shipped foundation", "text"), ("megabytes", "MB", "num")], "foundations"
    )
    manifest = _read(model_dir / layout.MANIFEST)
    if manifest and isinstance(manifest.get("artifacts"), list):
        # one row per file of the manifest (brainrecon/manifest.py Artifact: path, kind, size in bytes, and
        # model/precision for exported graphs and engines only); "n/a" where a field does not apply
        arts = [
            {
                "file": a.get("path"),
                "kind": a.get("kind"),
                "model": a.get("model") or "n/a",
                "precision": a.get("precision") or "n/a",
                "megabytes": a["size"] / 1e6 if isinstance(a.get("size"), int) else None,
            }
            for a in manifest["artifacts"]
            if isinstance(a, dict)
        ]
        page.table(
            arts,
            [
                ("file", "file", "text"),
                ("kind", "kind", "text"),
                ("model", "exported model", "text"),
                ("precision", "precision", "text"),
                ("megabytes", "MB", "num"),
            ],
            "artifacts",
        )
    return True


def _final_section(page: _Page, recon: Path) -> bool:
    metrics = _read(recon / "metrics.json")
    if metrics is None and not (recon / "contact_sheet.png").is_file():
        return False
    page.h2("Final reconstructions", "final")
    page.p(f"{recon}: ground truth, stage 1 and the final two-stage images from the torch-free runtime.")
    if isinstance(metrics, dict):
        rows = [{"stage": k, **v} for k, v in metrics.items() if isinstance(v, dict)]
        page.table(rows, [("stage", "stage", "text"), *METRIC_COLUMNS], "final-metrics")
    page.image(recon / "contact_sheet.png", "ground truth / stage 1 / stage 1+2 (first 12 test images)")
    return True


def _stage1_section(page: _Page, folder: Path) -> bool:
    data = _read(folder / "stage1.json")
    if not data:
        return False
    page.h2("Stage 1: ridge vs GRU, with controls", "stage1")
    page.table(
        data["rows"],
        [
            ("model", "model", "text"),
            ("latent_dims", "latent dims", "int"),
            ("parameters", "parameters", "int"),
            ("pixcorr", "PixCorr ↑", "num"),
            ("ssim", "SSIM ↑", "num"),
        ],
        "stage1-table",
    )
    _paper_table(page, data, "model", "stage1-paper-table")
    page.image(folder / "stage1_sheet.png", "stage-1 reconstructions per regressor and K")
    return True


def _stage2_section(page: _Page, folder: Path) -> bool:
    data = _read(folder / "stage2.json")
    if not data:
        return False
    page.h2("Stage 1 vs stage 1+2, with controls", "stage2")
    page.p(
        f"{data.get('n_test')} test images; sampling {data.get('sampling')}. Oracle rows use the true CLIP "
        "embeddings of the test images; shuffled contexts belong to other images (chance 0.5). Recurring error: "
        "max / median of the error map averaged over the images; a fixed-position artifact raises it."
    )
    recurring = (
        [("recurring_error", "recurring error ↓", "num")] if "recurring_error" in data["rows"][0] else []
    )
    page.table(
        data["rows"],
        [("run", "run", "text"), *METRIC_COLUMNS, *recurring, ("seconds", "seconds", "num")],
        "stage2-table",
    )
    _paper_table(page, data, "run", "stage2-paper-table")
    page.image(folder / "stage2_sheet.png", "stage 1, stage 1+2 and oracle rows (first 12 test images)")
    return True


def _blob_section(page: _Page, folder: Path) -> bool:
    data = _read(folder / "blob.json")
    if not data:
        return False
    page.h2("The recurring blob: diagnosis, fix, before and after", "blob")
    for line in data.get("findings", []):
        page.p(line)
    if data.get("checks"):
        page.table(
            data["checks"],
            [("check", "check", "text"), ("before", "before", "num"), ("after", "after", "num")],
            "blob-checks",
        )
    if data.get("rows"):
        page.table(
            data["rows"],
            [("run", "run", "text"), ("model", "foundations", "text"), *METRIC_COLUMNS],
            "blob-table",
        )
    for name, alt in data.get("images", []):
        page.image(folder / name, alt)
    return True


def _foundations_section(page: _Page, folder: Path) -> bool:
    data = _read(folder / "training.json")
    if not data:
        return False
    page.h2("Training curves of the shipped foundation models", "foundations")
    rows = [
        {
            "run": label,
            "steps": r["steps"],
            "batch": r["train"].get("batch_size"),
            "lr": r["train"].get("lr"),
            "loss": r["curves"]["loss"][-1],
        }
        for label, r in data["runs"].items()
    ]
    page.table(
        rows,
        [
            ("run", "run", "text"),
            ("steps", "steps", "num"),
            ("batch", "batch", "num"),
            ("lr", "lr", "num"),
            ("loss", "last loss (window mean)", "num"),
        ],
        "foundations-table",
    )
    page.image(folder / "training_curves.png", "training loss against the step, one panel per model")
    return True


def _noise_section(page: _Page, folder: Path) -> bool:
    data = _read(folder / "noise.json")
    if not data:
        return False
    page.h2("Noise sensitivity", "noise")
    page.p(
        f"Gaussian noise of std = level × {data['betas_std']} (the test betas' std) added to the test betas; "
        f"{data['n_test']} test images, {len(data['config']['seeds'])} noise seeds (mean ± std). 'Noisy "
        "input' says which regressor got the noisy betas."
    )
    page.table(
        data["summary"],
        [
            ("stage", "stage", "text"),
            ("role", "noisy input", "text"),
            ("level", "level", "num"),
            ("sigma", "σ", "num"),
            ("pixcorr", "PixCorr ↑", "pm"),
            ("ssim", "SSIM ↑", "pm"),
            ("clip_2way", "CLIP 2-way ↑", "pm"),
        ],
        "noise-table",
    )
    page.image(folder / "noise.png", "metrics vs noise level")
    page.image(folder / "noise_sheet.png", "stage 1 and stage 1+2 per noise level (seed 0)")
    return True


def _layers_section(page: _Page, folder: Path) -> bool:
    shown = False
    for sub, title, table_id in (
        (folder, "Latent layers K: ridge vs GRU", "layers-table"),
        (folder / "full-recipe", "GRU vs ridge, the paper's full recipe", "recipe-table"),
    ):
        data = _read(sub / "layers.json")
        if not data:
            continue
        if not shown:
            page.h2("Latent layers", "layers")
        shown = True
        page.p(
            f"{title}: {data['n_test']} test images, VDVAE {data['vdvae']} ({data['vdvae_latent_layers']} "
            f"latent layers), GRU cap {data['max_epochs']} epochs with early stopping. 'true latents' decodes "
            "the test images' own first K layers: the ceiling for any regressor."
        )
        page.table(
            data["rows"],
            [
                ("k", "K", "int"),
                ("regressor", "regressor", "text"),
                ("latent_dims", "latent dims", "int"),
                ("parameters", "parameters", "int"),
                ("fit_seconds", "fit s", "num"),
                ("epochs", "GRU epochs", "int"),
                *METRIC_COLUMNS,
            ],
            table_id,
        )
        page.image(sub / "layers.png", f"{title}: metrics, parameters and fit time vs K")
    return shown


def _speed_section(page: _Page, results: Path) -> bool:
    rows = []
    for name in ("stage1_runtime.json", "stage2_runtime.json"):
        data = _read(results / name) or {}
        inference = data.get("inference", {}) if isinstance(data.get("inference"), dict) else {}
        n = data.get("betas", {}).get("shape", [None])[0]
        bench = name.removesuffix(".json")
        if isinstance(inference.get("median_s"), dict):  # stage 2: {engine: {part: seconds}}
            for engine, parts in inference["median_s"].items():
                for part, seconds in parts.items() if isinstance(parts, dict) else []:
                    rows.append(
                        {"benchmark": bench, "trials": n, "engine": engine, "part": part, "seconds": seconds}
                    )
        else:  # stage 1: {engine: {"median_s": seconds, ...}}
            for engine, info in inference.items():
                if isinstance(info, dict) and isinstance(info.get("median_s"), int | float):
                    rows.append(
                        {
                            "benchmark": bench,
                            "trials": n,
                            "engine": engine,
                            "part": "stage 1 total",
                            "seconds": info["median_s"],
                        }
                    )
    if not rows:
        return False
    page.h2("Speed (median seconds per call, this machine)", "speed")
    page.table(
        rows,
        [
            ("benchmark", "benchmark", "text"),
            ("trials", "trials", "int"),
            ("engine", "engine", "text"),
            ("part", "part", "text"),
            ("seconds", "seconds", "num"),
        ],
        "speed-table",
    )
    curves = results / "stage2_runtime_curves.png"
    if curves.is_file():
        page.image(curves, "two-stage latency and throughput against the batch size, per pipeline")
    _real_size_table(page, results / "real_size.json")
    unet_curve = results / "real_size_unet_curve.png"
    if unet_curve.is_file():
        page.image(unet_curve, "the real-size UNet step against the batch size, per engine and precision")
    return True


def _real_size_table(page: _Page, path: Path) -> None:
    """The real-size models (benchmarks/real_size.py): file size and ONNX Runtime CPU latency per precision."""
    models = (_read(path) or {}).get("models", {})
    rows = []
    for name, entry in models.items():
        for precision in FILE_PRECISIONS:
            r = entry.get(precision) if isinstance(entry, dict) else None
            if not isinstance(r, dict) or "latency" not in r:
                continue
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "parameters": entry.get("parameters"),
                    "file_mb": r.get("file_bytes", 0) / 1e6,
                    "batch1_s": r["latency"].get("1", {}).get("median_s"),
                    "batch2_s": r["latency"].get("2", {}).get("median_s"),
                }
            )
    if not rows:
        return
    page.p(
        "Real size (random weights at NSD and Versatile Diffusion sizes, benchmarks/real_size.py): ONNX Runtime "
        "CPU latency per call on this machine; batch 2 is the UNet's classifier-free-guidance pair."
    )
    page.table(
        rows,
        [
            ("model", "model", "text"),
            ("precision", "precision", "text"),
            ("parameters", "parameters", "int"),
            ("file_mb", "file MB", "num"),
            ("batch1_s", "batch 1 s", "num"),
            ("batch2_s", "batch 2 s", "num"),
        ],
        "real-size-table",
    )
