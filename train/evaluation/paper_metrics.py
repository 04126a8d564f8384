"""The eight reconstruction metrics of Brain-Diffuser's Table 1, computed as its two evaluation scripts do.

Sources: ozcelikfu/brain-diffuser `scripts/eval_extract_features.py` (features) and
`scripts/evaluate_reconstruction.py` (scores); Ozcelik & VanRullen 2023. Columns, in the papers' order:

  PixCorr ↑      Pearson r of the flattened RGB values; the reconstruction resized to 425 px (Pillow's default
                 filter, bicubic), both in [0, 1]; mean over images                  (brainrecon.metrics.pixcorr)
  SSIM ↑         rgb2gray, skimage SSIM with multichannel=True on the gray image, gaussian_weights, sigma 1.5,
                 use_sample_covariance=False, data_range 1; mean over images    (brainrecon.metrics.ssim, see there)
  AlexNet(2) ↑   two-way identification on torchvision AlexNet `features[4]`
  AlexNet(5) ↑   two-way identification on `features[11]`
  InceptionV3 ↑  two-way identification on torchvision Inception v3 `avgpool` (transform_input=True)
  CLIP ↑         two-way identification on OpenAI CLIP ViT-L/14's visual output (the projected embedding)
  EffNet-B ↓     mean scipy.spatial.distance.correlation per image pair, torchvision EfficientNet-B1 `avgpool`
  SwAV ↓         the same on SwAV's ResNet-50 `avgpool`

Network input (the script's `batch_generator_external_images`): each PNG opened with Pillow, resized to 224×224
with torchvision's `T.functional.resize(img, (224, 224))` on a PIL image, i.e. Pillow's BILINEAR (no crop, the
aspect ratio is not kept), `to_tensor` (uint8 / 255 in float32), then `Normalize` with ImageNet's mean/std, or
CLIP's for CLIP. The ground truth goes through the same path. Two-way identification is `pairwise_corr_all`
(brainrecon.metrics.two_way_identification: for reconstruction j, the share of the other ground truths i with
r[i, j] < r[j, j], r the Pearson correlation of the flattened features; chance 0.5). The script reports fractions;
the papers print the identification columns as percentages.

CLIP: the script takes `clip.load("ViT-L/14").visual` (OpenAI's `clip` package), cast to float32, and hooks its
output: `ln_post(x[:, 0]) @ proj`, the class token after the final LayerNorm times the visual projection, NOT
L2-normalised (the hook is on the module, before `CLIPModel.forward` would normalise). transformers'
`CLIPVisionModelWithProjection(...).image_embeds` is the same computation: `visual_projection(post_layernorm(
last_hidden_state[:, 0]))`, `visual_projection.weight` being `proj.T`, and openai/clip-vit-large-patch14 on the
Hugging Face Hub is the conversion of the same checkpoint. The input differs from CLIP's own preprocessing (bicubic
resize of the short side + centre crop): the script feeds the bilinear 224×224 resize with CLIP's mean/std, and so
does this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy.spatial.distance import correlation

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.metrics import pixcorr, ssim, two_way_identification
from brainrecon.train.evaluation.feature_nets import FEATURE_NETS, load_feature_net

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The papers' column order, with the feature network each needs (None: no network).
METRICS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inceptionv3", "clip", "effnet", "swav")
LABELS = {
    "pixcorr": "PixCorr ↑",
    "ssim": "SSIM ↑",
    "alexnet2": "AlexNet(2) ↑",
    "alexnet5": "AlexNet(5) ↑",
    "inceptionv3": "InceptionV3 ↑",
    "clip": "CLIP ↑",
    "effnet": "EffNet-B ↓",
    "swav": "SwAV ↓",
}
NETWORK = {
    "pixcorr": None,
    "ssim": None,
    "alexnet2": "alexnet",
    "alexnet5": "alexnet",
    "inceptionv3": "inceptionv3",
    "clip": "clip",
    "effnet": "efficientnet",
    "swav": "swav",
}
IDENTIFICATION = ("alexnet2", "alexnet5", "inceptionv3", "clip")  # two-way identification, printed as %
DISTANCE = ("effnet", "swav")  # mean correlation distance, lower is better

CLIP_FOLDER = "clip-vit-large-patch14"
CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14"
# OpenAI CLIP ViT-L/14 (Radford et al. 2021): what the published CLIP column needs
VIT_L14 = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}


def required_file(network: str) -> str:
    """What a --weights folder must hold for one network, and where it is published."""
    if network == "clip":
        return f"{CLIP_FOLDER}/ (a Hugging Face CLIP ViT-L/14 folder: {CLIP_URL})"
    spec = FEATURE_NETS[network]
    return f"{spec.file} ({spec.url})"


def weights_path(weights: Path, network: str) -> Path:
    return weights / (CLIP_FOLDER if network == "clip" else FEATURE_NETS[network].file)


# ----------------------------------------------------------------------------- network input


def network_input(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, 224, 224) float32, as the script's data loader (see the module docstring)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    batch = []
    for image in images:
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR
        )
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        batch.append(pixels.to(dtype=torch.float32).div(255).sub_(mean_t).div_(std_t))
    return torch.stack(batch)


# ----------------------------------------------------------------------------- CLIP


def load_clip_vision(folder: str | Path, device: str | torch.device = "cpu", require_vit_l14: bool = True):
    """CLIPVisionModelWithProjection (fp32, eval) from a CLIPModel folder (openai/clip-vit-large-patch14) or a
    vision-tower folder (Versatile Diffusion's image_encoder/). Every vision key must load (no re-initialised
    layer); with `require_vit_l14` the architecture must be ViT-L/14 at 224 px, as the published CLIP column."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from brainrecon.train.foundations.clip_features import weight_files

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(
            config_path, "CLIP config", f"expected a Hugging Face CLIP ViT-L/14 folder ({CLIP_URL})"
        )
    weight_files(folder)  # a one-line MissingFileError before transformers' own message
    raw = json.loads(config_path.read_text())
    if "vision_config" in raw:
        # a CLIPModel folder: the projection size lives at the top level, not in vision_config
        vision = {**raw["vision_config"], "projection_dim": raw.get("projection_dim", 512)}
        config = CLIPVisionConfig(
            **{k: v for k, v in vision.items() if k not in ("model_type", "architectures")}
        )
    else:
        config = CLIPVisionConfig.from_pretrained(folder)
    found = {key: getattr(config, key) for key in VIT_L14}
    if found["image_size"] != INPUT_SIZE or (require_vit_l14 and found != VIT_L14):
        raise InputError(
            config_path, f"CLIP ViT-L/14 {VIT_L14}" if require_vit_l14 else "image_size 224", str(found)
        )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's keys are "unexpected" here by design
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            folder, config=config, output_loading_info=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = sorted(info["missing_keys"]) + sorted(str(k[0]) for k in info["mismatched_keys"])
    if bad:
        raise InputError(
            folder,
            "CLIPVisionModelWithProjection weights (vision_model.*, visual_projection)",
            f"missing or mis-shaped {bad[0]} (and {len(bad) - 1} more)",
        )
    return model.eval().to(device)


# ----------------------------------------------------------------------------- features and scores


def _feature_fn(network: str, model):
    """network → a function (N, 3, 224, 224) → list of (N, D) taps, in the order of `_taps(network)`."""
    if network == "alexnet":
        return lambda x: model.taps(x, (4, 11))
    if network == "inceptionv3":
        return lambda x: [model.features(x)]
    if network == "efficientnet":
        return lambda x: [model.features_pooled(x)]
    if network == "swav":
        return lambda x: [model.features(x)]
    if network == "clip":
        return lambda x: [model(pixel_values=x).image_embeds]
    raise ConfigError(f"unknown feature network {network!r}")


def _taps(network: str) -> tuple[str, ...]:
    return tuple(m for m in METRICS if NETWORK[m] == network)


def extract_features(
    network: str,
    model,
    images: np.ndarray,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    label: str = "",
) -> dict[str, np.ndarray]:
    """{metric: (N, D) float32 features} of one network on uint8 images, in batches; no gradients."""
    mean, std = (CLIP_MEAN, CLIP_STD) if network == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    fn = _feature_fn(network, model)
    parts: list[list[np.ndarray]] = [[] for _ in _taps(network)]
    task = progress.add_task(label or network, total=len(images)) if progress is not None else None
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = network_input(images[start : start + batch_size], mean, std).to(device)
            for i, out in enumerate(fn(x)):
                parts[i].append(out.float().cpu().numpy())
            if progress is not None:
                progress.update(task, advance=len(x))
    return {m: np.concatenate(p) for m, p in zip(_taps(network), parts, strict=True)}


def mean_correlation_distance(gt_feats: np.ndarray, pred_feats: np.ndarray) -> float:
    """Mean over image pairs of scipy.spatial.distance.correlation(gt_i, pred_i), features flattened per image."""
    gt = np.asarray(gt_feats).reshape(len(gt_feats), -1)
    pred = np.asarray(pred_feats).reshape(len(pred_feats), -1)
    if gt.shape != pred.shape:
        raise InputError("pred_feats", f"shape {gt.shape} (as gt_feats)", f"{pred.shape}")
    return float(np.array([correlation(gt[i], pred[i]) for i in range(len(gt))]).mean())


def check_metric_names(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise InputError(
            "--metrics", f"comma-separated names from {', '.join(METRICS)}", ", ".join(unknown) or "none"
        )
    return tuple(m for m in METRICS if m in names)  # the papers' order, duplicates dropped


@dataclass
class PaperMetrics:
    """values: metric → value (fractions for identification, as the script), None where not computed;
    missing: metric → the file it needs; files: network → the file it was computed with."""

    n: int
    values: dict[str, float | None]
    missing: dict[str, str]
    files: dict[str, str]

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "metrics": self.values,
            "missing": self.missing,
            "files": self.files,
            "order": list(METRICS),
            "units": {
                m: ("fraction (two-way identification)" if m in IDENTIFICATION else "") for m in METRICS
            },
        }


def _check_images(what: str, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(what, "(N, H, W, 3) uint8 images", f"shape {images.shape}, dtype {images.dtype}")
    return images


class PaperScorer:
    """The requested metrics against one set of ground truths `gt` ((N, H, W, 3) uint8), for many runs: every
    network file is loaded (and so checked) once, when the scorer is made, and the ground truths' features are
    extracted once. A network whose file is absent from `weights` is skipped and named in `missing`; a file that is
    there but wrong fails in one line, before any feature is extracted. `score(recon)` → PaperMetrics."""

    def __init__(
        self,
        gt: np.ndarray,
        weights: str | Path | None,
        metrics: Sequence[str] = METRICS,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        show_progress: bool = False,
        require_vit_l14: bool = True,
    ):
        self.names = check_metric_names(metrics)
        self.gt = _check_images("stimuli", gt)
        if len(self.gt) < 2:
            raise InputError(
                "stimuli", "at least 2 ground truths (two-way identification)", f"{len(self.gt)}"
            )
        if batch_size < 1:
            raise InputError("batch_size", "a positive integer", str(batch_size))
        weights = Path(weights) if weights is not None else None
        if weights is not None and not weights.is_dir():
            raise MissingFileError(weights, "weights folder", "see docs/metrics.md for its files")
        self.device, self.batch_size, self.show_progress = device, batch_size, show_progress
        self.missing: dict[str, str] = {}
        self.files: dict[str, str] = {}
        self.models = {}
        for network in dict.fromkeys(NETWORK[m] for m in self.names if NETWORK[m] is not None):
            path = weights_path(weights, network) if weights is not None else None
            if path is None or not path.exists():
                self.missing.update({m: required_file(network) for m in _taps(network) if m in self.names})
                continue
            if network == "clip":
                self.models[network] = load_clip_vision(path, device, require_vit_l14)
            else:
                self.models[network] = load_feature_net(network, path, device)
            self.files[network] = str(path)
        with self._progress() as progress:
            self.gt_features = {
                network: extract_features(
                    network, model, self.gt, batch_size, device, progress, f"{network}: ground truth"
                )
                for network, model in self.models.items()
            }

    def info(self) -> dict:
        """What a results file says about its `paper` columns: their order and labels, which were computed, the
        files used and the files the others need."""
        return {
            "order": list(METRICS),
            "labels": dict(LABELS),
            "computed": [m for m in self.names if m not in self.missing],
            "missing": dict(self.missing),
            "files": dict(self.files),
        }

    def _progress(self) -> Progress:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        return Progress(*columns, disable=not self.show_progress, transient=False)

    def score(self, recon: np.ndarray, label: str = "reconstructions") -> PaperMetrics:
        recon = _check_images("reconstructions", recon)
        if len(recon) != len(self.gt):
            raise InputError(
                "reconstructions", f"one per ground truth ({len(self.gt)} ground truths)", f"{len(recon)}"
            )
        values: dict[str, float | None] = {m: None for m in METRICS}
        if "pixcorr" in self.names:
            values["pixcorr"] = float(pixcorr(self.gt, recon))
        if "ssim" in self.names:
            values["ssim"] = float(ssim(self.gt, recon))
        with self._progress() as progress:
            for network, model in self.models.items():
                recon_feats = extract_features(
                    network, model, recon, self.batch_size, self.device, progress, f"{network}: {label}"
                )
                gt_feats = self.gt_features[network]
                for m in _taps(network):
                    if m not in self.names:
                        continue
                    if m in DISTANCE:
                        values[m] = mean_correlation_distance(gt_feats[m], recon_feats[m])
                    else:
                        values[m] = float(two_way_identification(gt_feats[m], recon_feats[m]))
        return PaperMetrics(len(recon), values, dict(self.missing), dict(self.files))


def paper_metrics(
    gt: np.ndarray,
    recon: np.ndarray,
    weights: str | Path | None,
    metrics: Sequence[str] = METRICS,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    show_progress: bool = False,
    require_vit_l14: bool = True,
) -> PaperMetrics:
    """The requested metrics of reconstructions `recon` against ground truths `gt` (both (N, H, W, 3) uint8, row i
    the same stimulus); one run of `PaperScorer`."""
    recon = _check_images("reconstructions", recon)
    if len(np.asarray(gt)) != len(recon) or len(recon) < 2:
        raise InputError(
            "reconstructions",
            f"one per ground truth, at least 2 ({len(np.asarray(gt))} ground truths)",
            f"{len(recon)}",
        )
    scorer = PaperScorer(gt, weights, metrics, device, batch_size, show_progress, require_vit_l14)
    return scorer.score(recon)


def paper_table_rows(rows: Sequence[tuple[str, PaperMetrics]]) -> list[str]:
    """Markdown lines: the eight columns in the papers' order, one row per run ("–" where not computed), then one
    line per metric that was not computed and the file it needs."""
    lines = ["| run | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [
        f"| {name} | " + " | ".join(format_value(m, r.values[m]) for m in METRICS) + " |" for name, r in rows
    ]
    if rows:
        lines += [f"- {LABELS[m]} not computed: needs {need}" for m, need in rows[0][1].missing.items()]
    return lines


# ----------------------------------------------------------------------------- reading a run, and the table

RECON_NAME = re.compile(r"^(?P<kind>[a-z0-9]+)_(?P<row>\d+)\.png$")


def read_recon_folder(folder: str | Path, kind: str = "final") -> tuple[np.ndarray, np.ndarray]:
    """(rows, images) of a recon-infer / recon-reconstruct folder's `{kind}_NNNNN.png` files, by row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(folder, "reconstruction folder", "a recon-infer or recon-reconstruct output")
    found = sorted(
        (int(match["row"]), path)
        for path in folder.glob(f"{kind}_*.png")
        if (match := RECON_NAME.match(path.name)) and match["kind"] == kind
    )
    if not found:
        raise MissingFileError(
            folder, f"{kind}_NNNNN.png reconstructions", "a recon-infer or recon-reconstruct output"
        )
    images = []
    for _, path in found:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise InputError(path, "an RGB PNG", f"mode {im.mode}")
            images.append(np.asarray(im))
        if images[-1].shape != images[0].shape:
            raise InputError(
                path, f"the size of {found[0][1].name} {images[0].shape[:2]}", f"{images[-1].shape[:2]}"
            )
    return np.array([r for r, _ in found]), np.stack(images)


def read_stimuli(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """The ground-truth images of the given rows from recon-prepare's test_images.npy ((N, H, W, 3) uint8)."""
    from brainrecon.io import load_npy

    stimuli = load_npy(path, "ground-truth stimuli (recon-prepare test_images.npy)", mmap=True)
    if stimuli.ndim != 4 or stimuli.shape[-1] != 3 or stimuli.dtype != np.uint8:
        raise InputError(path, "(N, H, W, 3) uint8 images", f"shape {stimuli.shape}, dtype {stimuli.dtype}")
    if rows.max() >= len(stimuli):
        raise InputError(
            path, f"an image for every reconstruction row (up to {int(rows.max())})", f"{len(stimuli)} images"
        )
    return np.asarray(stimuli[rows])


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if metric in IDENTIFICATION else f"{value:.3f}"


def metrics_table(result: PaperMetrics, title: str = "this run") -> str:
    """A Markdown table in the papers' column order, then one line per metric that was not computed."""
    return "\n".join(paper_table_rows([(f"{title} (n={result.n})", result)]))
