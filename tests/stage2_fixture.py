"""A tiny two-stage subject for stage-2 tests: the tiny stage-1 ridge subject of test_export, the shipped small CLIP
and VAE, and a seeded random dual UNet small enough for seconds-scale sampling."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from tests.test_export import build_tiny_stage1

FAST_STEPS = 8  # strength 0.75 -> 6 UNet calls


def tiny_unet_config():
    from brainrecon.train.foundations.dual_unet import DualUNetConfig

    # the shipped small CLIP's token layout (65 vision + 77 text, dim 128) on the small VAE's 8x8 latents
    return dataclasses.replace(
        DualUNetConfig.tiny(), cross_attention_dim=128, vision_tokens=65, text_tokens=77
    )


def save_tiny_unet(folder: Path, seed: int = 0) -> Path:
    from brainrecon.config import save_config
    from brainrecon.train.foundations.dual_unet import build_dual_unet
    from brainrecon.train.foundations.ldm_train import DUAL_UNET_CONFIG

    config = tiny_unet_config()
    torch.manual_seed(seed)
    unet = build_dual_unet(config).eval()
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(folder)
    save_config(config, folder / DUAL_UNET_CONFIG)
    return folder


def build_tiny_stage2(root: Path) -> dict[str, Path]:
    """Build (once per folder) a stage-1 + stage-2 model dir; returns its paths (model, prep, unet)."""
    from brainrecon.train.stage2.fit import Stage2Config, fit_stage2

    stage1 = build_tiny_stage1(root / "stage1")
    paths = {"prep": stage1["prep"], "unet": root / "unet", "model": root / "model-2"}
    if (root / "done").is_file():
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        save_tiny_unet(paths["unet"])
        if paths["model"].exists():
            shutil.rmtree(paths["model"])
        shutil.copytree(
            stage1["ridge"], paths["model"], ignore=shutil.ignore_patterns("onnx", "manifest.json")
        )
        fit_stage2(paths["prep"], paths["model"], Stage2Config(unet=str(paths["unet"]), rank=16))
    finally:
        torch.set_num_threads(threads)
    (root / "done").write_text("ok\n")
    return paths


def export_tiny_stage2(root: Path) -> Path:
    """A copy of the tiny stage-2 model dir exported with --stage all --precision both (once per folder), so the
    fitted model dir that other fixtures copy is never changed; `summary.json` beside it is the export summary."""
    import json

    from brainrecon.export.subject import export_model_dir

    paths = build_tiny_stage2(root)
    model_dir = root / "model-2-exported"
    if (root / "exported").is_file():
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(paths["model"], model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = export_model_dir(model_dir, stage="all", precision="both")
    finally:
        torch.set_num_threads(threads)
    (model_dir / "summary.json").write_text(json.dumps(summary, default=str))
    (root / "exported").write_text("ok\n")
    return model_dir
