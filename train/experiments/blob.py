"""Measures of a recurring, fixed-position artifact ("blob") in reconstructions and in the VAE's decoder.

The first shipped small VAE drew a bright multicoloured spot near the top right of most images, stage 2's
final images included. Diagnosis (the numbers are in benchmarks/results/blob/): the spot is in the VAE round trip
of the ground-truth images themselves, with no UNet involved, and the VAE's latents have no outlier there; the
decoder's activations do: at its last 64x64 block the largest activation sits at the same pixel in most images,
about 15x the median. That is the "water droplet" of StyleGAN (Karras et al. 2020, "Analyzing and Improving the
Image Quality of StyleGAN", section 2): with one channel per normalisation group (32 groups on 32 channels) a
GroupNorm is an instance norm and removes every channel's mean, so the decoder makes a strong local spike to carry
flat colours past it. The fix is in `train/foundations/ldm_train.py` (`small_vae_config`, `refit_vae`).

- `decoder_peak_ratio`: per image, max / median over positions of the largest absolute channel of the
  decoder's last up block; averaged over images (an instance-norm droplet gives > 10).
- `recurring_error`: where the reconstruction error is high *in the same place* across images: the error
  map averaged over images, box-filtered, max / median, and where that max is.
"""

from __future__ import annotations

import numpy as np


def decoder_peak_ratio(vae, images: np.ndarray, batch_size: int = 50) -> dict:
    """{"ratio": mean max/median, "mode_fraction": share of images whose peak is at the most common pixel,
    "mode_position": (row, col) of that pixel} for uint8 (N, S, S, 3) images through `vae` (diffusers
    AutoencoderKL, posterior mean)."""
    import torch

    from brainrecon.train.stage2.img2img import encode_images

    captured: list[torch.Tensor] = []
    hook = vae.decoder.up_blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                z = encode_images(vae, images[i : i + batch_size], 1.0)
                vae.decode(z)
    finally:
        hook.remove()
    act = torch.cat(captured).abs().amax(dim=1).flatten(1)  # (N, H*W)
    side = int(round(act.shape[1] ** 0.5))
    ratio = (act.max(dim=1).values / act.median(dim=1).values.clamp_min(1e-8)).mean()
    peaks = act.argmax(dim=1).numpy()
    values, counts = np.unique(peaks, return_counts=True)
    mode = int(values[counts.argmax()])
    return {
        "ratio": round(float(ratio), 3),
        "mode_fraction": round(float(counts.max() / len(peaks)), 3),
        "mode_position": [mode // side, mode % side],
    }


def recurring_error(gt: np.ndarray, recon: np.ndarray, window: int = 5) -> dict:
    """{"ratio", "position"}: the per-pixel absolute error (grey levels, channels averaged) averaged over the
    images and box-filtered over `window` px; its max / median, and where the max is (row, col) at recon's size."""
    from scipy.ndimage import uniform_filter

    from brainrecon.images import resize

    gt = resize(np.asarray(gt), recon.shape[1])
    err = np.abs(gt.astype(np.float64) - recon.astype(np.float64)).mean(axis=(0, 3))  # (S, S)
    smooth = uniform_filter(err, size=window, mode="nearest")
    pos = np.unravel_index(int(smooth.argmax()), smooth.shape)
    return {
        "ratio": round(float(smooth.max() / max(np.median(smooth), 1e-8)), 3),
        "position": [int(pos[0]), int(pos[1])],
    }
