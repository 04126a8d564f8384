"""recon-train foundation clip from a recon-prepare folder: the written folder feeds the CLIP feature extractor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from brainrecon.data.nsd import prepare_subject
from brainrecon.data.sim import SimConfig, simulate_subject


def test_recon_train_foundation_clip(tmp_path):
    simulate_subject(tmp_path / "sim", SimConfig.preset("tiny"), seed=0)
    prepare_subject(tmp_path / "sim", tmp_path / "prep", progress=False)
    cmd = [
        Path(sys.executable).parent / "recon-train",
        "foundation",
        "clip",
        "--data",
        tmp_path / "prep",
        "--out",
        tmp_path / "clip",
        "--steps",
        "3",
        "--batch-size",
        "8",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor

    extractor = CLIPFeatureExtractor.from_pretrained(tmp_path / "clip")
    images = np.load(tmp_path / "prep" / "test_images.npy")[:2]
    vision = extractor.vision_embeddings(images)
    text = extractor.text_embeddings([["a red circle"], ["two blue squares on a plain background"]])
    assert vision.shape == (2, 65, 128) and text.shape == (2, 77, 128)
    np.testing.assert_allclose(np.linalg.norm(vision[:, 0], axis=-1), 1.0, rtol=1e-5)
    # A second run into the same folder is refused, and the first result is kept.
    res = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error:")
    assert (tmp_path / "clip" / "model.safetensors").is_file()
