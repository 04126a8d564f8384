"""Image helpers (torch-free): resizing, PNG writing, contact sheets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from brainrecon.errors import InputError
from brainrecon.io import atomic_path


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """(N, H, W, 3) uint8, or float in [0, 255] which is rounded; anything else is an InputError."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(name, "(N, H, W, 3) images", f"shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind != "f":
        raise InputError(name, "uint8 or float images", f"dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise InputError(name, "finite pixel values", "NaN/Inf")
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def resize(
    images: np.ndarray, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images to (N, size, size, 3) with PIL."""
    images = check_images(images)
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in images])


def png_name(kind: str, row: int) -> str:
    """`stage1_00003.png`, `final_00003.png`: one image per row of the input set, in recon-infer's output and in the
    torch reference's (recon-reconstruct), so the two folders compare file by file."""
    return f"{kind}_{int(row):05d}.png"


def save_png(path: str | Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(check_images(image[None])[0]).save(tmp, format="PNG")


def contact_sheet(
    rows: Sequence[tuple[str, np.ndarray]], path: str | Path, tile: int = 96, max_cols: int = 12
) -> None:
    """PNG grid: one labelled row per (label, images (N, H, W, 3)); columns are the same items across rows."""
    n = min(min(len(imgs) for _, imgs in rows), max_cols)
    label_w, pad = 90, 2
    sheet = Image.new("RGB", (label_w + n * (tile + pad), len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        tiles = resize(check_images(imgs[:n], label), tile)
        y = r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        for c in range(n):
            sheet.paste(Image.fromarray(tiles[c]), (label_w + c * (tile + pad), y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
