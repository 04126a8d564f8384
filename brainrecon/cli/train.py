"""`recon-train` (foundation models, a subject's regressors), `recon-reconstruct` (the torch reference) and
`recon-eval` (results tables). Thin: the logic lives in `brainrecon.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from brainrecon.choices import (
    IMAGE_KINDS,
    Engine,
    ImageKind,
    Precision,
    Regressor,
    Stage,
    TorchDevice,
    TrainStage,
)
from brainrecon.cli import print_summary, run_app

# torch devices of the training and reference commands (train/device.py checks that a GPU is there)
DEVICE_HELP = "Torch device: cpu or cuda (no GPU: a one-line error, never a silent CPU run)."
DeviceOption = Annotated[TorchDevice, typer.Option(help=DEVICE_HELP)]
EncodeBatchOption = Annotated[int, typer.Option(help="Images per VDVAE encoder call.")]
WeightsOption = Annotated[
    Path | None,
    typer.Option(
        help="Folder of the metric networks' weights (docs/metrics.md); without it: PixCorr and SSIM."
    ),
]


def check_device(device: str) -> None:
    """A one-line DeviceError unless `device` is here: called first, before any data is read."""
    from brainrecon.train.device import resolve_device

    resolve_device(device)


def prepared_train_images(data: Path, size: int):
    """A recon-prepare folder's training stimuli resized to `size` (what every foundation model trains on)."""
    from brainrecon.train.foundations.ldm_train import prepared_train_images as load

    return load(data, size)


train_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train foundation models (on stimuli) and subject models (on betas).",
)
foundation_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Foundation models trained on stimuli."
)
train_app.add_typer(foundation_app, name="foundation")


@foundation_app.command("vdvae")
def train_foundation_vdvae(
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder; its train images (resized to 64) are used.")
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder: checkpoints, then model.safetensors + config.json.")
    ],
    config: Annotated[str, typer.Option(help="VDVAE config name (small64, imagenet64).")] = "small64",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.")] = False,
    fp16: Annotated[bool, typer.Option(help="Store the final weights in fp16 (half the size).")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Train a VDVAE on the stimuli with EMA weights and resumable checkpoints.

    Example: recon-train foundation vdvae --data data/subj01 --out data/vdvae-small64 --steps 1500 --device cuda
    """
    check_device(device)
    from brainrecon.train.foundations.vdvae import vdvae_config
    from brainrecon.train.foundations.vdvae_train import train_vdvae

    cfg = vdvae_config(config)
    images = prepared_train_images(data, cfg.image_size)
    result = train_vdvae(
        images,
        cfg,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        resume=resume,
        device=device,
    )
    if fp16:  # smaller shipped weights: re-save the EMA model with fp16 storage
        from brainrecon.train.foundations.vdvae import save_vdvae

        save_vdvae(result.ema_model, cfg, out, fp16=True)
    last = result.history[-1] if result.history else {}
    summary = {
        "step": result.step,
        "skipped": result.skipped,
        **{k: round(float(v), 4) for k, v in last.items()},
    }
    print_summary(f"recon-train foundation vdvae -> {out}", summary)


@foundation_app.command("clip")
def train_foundation_clip(
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder with train images and train_captions.json.")
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder: a local Hugging Face CLIP folder + tokenizer.json.")
    ],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Image-caption pairs per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up, cosine).")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Train a small CLIP contrastively on the stimuli and their captions (word-level tokenizer).

    Example: recon-train foundation clip --data data/subj01 --out data/clip-small --steps 2000
    """
    check_device(device)
    from brainrecon.io import read_json
    from brainrecon.train.foundations.clip_small import SmallCLIPConfig, train_small_clip

    config = SmallCLIPConfig()
    images = prepared_train_images(data, config.image_size)
    captions = read_json(data / "train_captions.json", "train captions from recon-prepare")
    summary = train_small_clip(
        images,
        captions,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        config=config,
        overwrite=overwrite,
        device=device,
    )
    print_summary(
        f"recon-train foundation clip -> {out}",
        {k: v for k, v in summary.items() if not isinstance(v, (list, dict))},
    )


@foundation_app.command("vae")
def train_foundation_vae(
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder; its train images (resized to 64) are used.")
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder: checkpoint/, then vae/ (diffusers AutoencoderKL).")
    ],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Train the small latent-diffusion VAE (64x64 images -> 8x8x4 latents) on the stimuli.

    Example: recon-train foundation vae --data data/subj01 --out data/vae-small --steps 1000
    """
    check_device(device)
    from brainrecon.train.foundations.ldm_train import small_vae_config, train_vae

    config = small_vae_config()
    images = prepared_train_images(data, config["sample_size"])
    result = train_vae(
        images,
        config,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        resume=resume,
        device=device,
    )
    print_summary(
        f"recon-train foundation vae -> {out}/vae",
        {"step": result["step"], "final_loss": result["final_loss"]},
    )


@foundation_app.command("vae-refit")
def train_foundation_vae_refit(
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder; its train images (at the VAE's size) are used.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint/, then vae/.")],
    teacher: Annotated[str, typer.Option(help="VAE whose latent space to keep.")] = "builtin:small",
    groups: Annotated[int, typer.Option(help="Normalisation groups of the new VAE.")] = 8,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 600,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Re-fit a VAE with other normalisation groups in the latent space of TEACHER (the UNet stays valid).

    Example: recon-train foundation vae-refit --data data/subj01 --out data/vae-small-g8 --steps 600
    """
    check_device(device)
    from brainrecon.train.foundations.ldm_train import refit_vae
    from brainrecon.train.foundations.loaders import load_vae

    vae, _ = load_vae(teacher)
    images = prepared_train_images(data, vae.config.sample_size)
    result = refit_vae(
        vae,
        images,
        out,
        norm_num_groups=groups,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        resume=resume,
        checkpoint_every=100,
        device=device,
    )
    print_summary(
        f"recon-train foundation vae-refit -> {out}/vae",
        {"step": result["step"], "final_loss": result["final_loss"]},
    )


@foundation_app.command("unet")
def train_foundation_unet(
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder with train images and train_captions.json.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint/, then unet/ (dual-guided UNet).")],
    clip: Annotated[
        str, typer.Option(help="CLIP for the contexts: builtin:small or a folder.")
    ] = "builtin:small",
    vae: Annotated[
        str, typer.Option(help="VAE for the latents: builtin:small or a folder.")
    ] = "builtin:small",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 5000,
    batch_size: Annotated[int, typer.Option(help="Latents per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 2e-4,
    cond_drop: Annotated[float, typer.Option(help="Probability of the unconditional context (CFG).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.")] = False,
    device: DeviceOption = "cpu",
    encode_batch: Annotated[
        int, typer.Option(help="Images (or captions) per VAE or CLIP encoder call.")
    ] = 64,
) -> None:
    """Train the small dual-guided latent UNet on the stimuli's VAE latents, conditioned on CLIP tokens.

    --device runs the VAE and CLIP encoding and the UNet training.

    Example: recon-train foundation unet --data data/subj01 --out data/unet-small --steps 5000 --device cuda
    """
    check_device(device)
    from brainrecon.train.foundations.ldm_train import train_unet_on_prepared

    result = train_unet_on_prepared(
        data,
        out,
        clip,
        vae,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        cond_drop=cond_drop,
        seed=seed,
        resume=resume,
        device=device,
        encode_batch=encode_batch,
    )
    print_summary(
        f"recon-train foundation unet -> {out}/unet",
        {"step": result["step"], "final_loss": result["final_loss"]},
    )


@train_app.command("subject")
def train_subject(
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject.")],
    model_dir: Annotated[Path, typer.Option(help="Subject model folder (created; stages add subfolders).")],
    stage: Annotated[
        TrainStage, typer.Option(help="vdvae (stage 1), clip (stage 2's CLIP regressors) or all (both).")
    ] = "all",
    regressor: Annotated[
        Regressor, typer.Option(help="gru (the seed paper) or ridge (Brain-Diffuser).")
    ] = "gru",
    vdvae: Annotated[
        str, typer.Option(help="builtin:small64, a recon-train foundation folder, or an openai .th.")
    ] = "builtin:small64",
    layers: Annotated[
        int | None, typer.Option(help="Latent layers K (default 15 for imagenet64, 13 for small64).")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Stage-1 ridge alpha; 0 picks one on a validation split.")
    ] = 5e4,
    max_epochs: Annotated[
        int, typer.Option(help="GRU epoch cap (early stopping usually ends sooner).")
    ] = 200,
    clip: Annotated[str, typer.Option(help="CLIP: builtin:small or a local Hugging Face folder.")] = (
        "builtin:small"
    ),
    vae: Annotated[str, typer.Option(help="VAE: builtin:small, an AutoencoderKL or VD folder.")] = (
        "builtin:small"
    ),
    unet: Annotated[
        str, typer.Option(help="UNet: builtin:small, a foundation unet folder or a VD folder.")
    ] = "builtin:small",
    text_alpha: Annotated[float, typer.Option(help="CLIP-text ridge alpha.")] = 1e5,
    vision_alpha: Annotated[float, typer.Option(help="CLIP-vision ridge alpha.")] = 6e4,
    clip_rank: Annotated[
        int | None, typer.Option(help="CLIP ridge rank (default: within 1% of full rank on validation).")
    ] = None,
    renormalize: Annotated[
        bool, typer.Option(help="Re-normalise predictions to training-target statistics.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOption = "cpu",
    encode_batch: EncodeBatchOption = 64,
) -> None:
    """Fit the subject's regressors: betas -> VDVAE latents (stage 1) and betas -> CLIP tokens (stage 2).

    --device runs the VDVAE encoding, the GRU training and the CLIP features (ridges are CPU solves).

    Example: recon-train subject --data data/subj01 --model-dir engines/subj01 --stage all --regressor gru --device cuda
    """
    check_device(device)
    if stage in ("vdvae", "all"):
        from brainrecon.train.stage1.fit import Stage1Config, fit_stage1

        config = Stage1Config(
            regressor=regressor,
            num_layers=layers,
            alpha=alpha or None,
            renormalize=renormalize,
            seed=seed,
            max_epochs=max_epochs,
            vdvae=vdvae,
        )
        summary = fit_stage1(data, model_dir, config, device=device, encode_batch=encode_batch)
        print_summary(
            f"recon-train subject {regressor} -> {model_dir}/stage1",
            {k: v for k, v in summary.items() if k not in ("config", "foundation", "alpha_search")},
        )
    if stage in ("clip", "all"):
        from brainrecon.train.stage2.fit import Stage2Config, fit_stage2

        config2 = Stage2Config(
            clip=clip,
            vae=vae,
            unet=unet,
            text_alpha=text_alpha,
            vision_alpha=vision_alpha,
            rank=clip_rank,
            renormalize=renormalize,
            seed=seed,
        )
        summary2 = fit_stage2(data, model_dir, config2, device=device)
        ridge = summary2["clip_ridge"]
        print_summary(
            f"recon-train subject clip -> {model_dir}/stage2",
            {
                **{f"{k} rank": v["rank"] for k, v in ridge.items()},
                **{f"{k} parameters": v["parameters"] for k, v in ridge.items()},
                "fit_seconds": summary2["fit_seconds"],
            },
        )


reconstruct_app = typer.Typer(
    add_completion=False, help="Torch reference reconstruction (what the runtime must match)."
)


@reconstruct_app.command()
def reconstruct(
    model_dir: Annotated[Path, typer.Option(help="Subject model folder from recon-train subject.")],
    data: Annotated[Path, typer.Option(help="recon-prepare folder; its test betas (and images) are used.")],
    out: Annotated[Path, typer.Option(help="Output folder: PNGs, contact_sheet.png, metrics.json.")],
    stage: Annotated[Stage, typer.Option(help="1: VDVAE stage only; 2: both stages.")] = 2,
    seed: Annotated[int | None, typer.Option(help="Noise seed (default: the one fitted with).")] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps of the full schedule (50).")] = None,
    strength: Annotated[float | None, typer.Option(help="Fraction of the schedule re-noised (0.75).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (7.5).")] = None,
    mix: Annotated[float | None, typer.Option(help="Vision weight of the dual guidance (0.6).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Reconstruct the test set with the torch models (the reference the runtime must match).

    Example: recon-reconstruct --model-dir engines/subj01 --data data/subj01 --out data/recon-torch --stage 2
    """
    check_device(device)
    if stage == 1:
        from brainrecon.train.evaluation.stage1 import reconstruct_test_set

        summary = reconstruct_test_set(model_dir, data, out, overwrite=overwrite, device=device)
    else:
        import dataclasses

        from brainrecon.io import read_json
        from brainrecon.model_dir import STAGE2_SUMMARY
        from brainrecon.sampling import SamplingConfig
        from brainrecon.train.evaluation.stage2 import reconstruct_test_set as reconstruct_two_stage

        info = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary (recon-train subject)")
        changes = {
            "seed": seed,
            "num_inference_steps": steps,
            "strength": strength,
            "guidance_scale": guidance,
            "mix_ratio": mix,
        }
        sampling = dataclasses.replace(
            SamplingConfig(**info["sampling"]), **{k: v for k, v in changes.items() if v is not None}
        )
        metrics = reconstruct_two_stage(
            model_dir, data, out, overwrite=overwrite, sampling=sampling, device=device
        )
        summary = {
            "n": metrics["n"],
            "seconds": metrics["seconds"],
            **{f"{s} {m}": round(v, 4) for s in IMAGE_KINDS for m, v in metrics[s].items()},
        }
    print_summary(f"recon-reconstruct stage {stage} -> {out}", summary)


eval_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Evaluate and compare reconstructions."
)


@eval_app.callback()
def eval_group() -> None:
    """Evaluate and compare reconstructions (subcommands keep their names even while there is one)."""


@eval_app.command("stage1")
def eval_stage1(
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject.")],
    out: Annotated[
        Path, typer.Option(help="Results folder: stage1.json, stage1.md, stage1_sheet.png, models/.")
    ],
    layers: Annotated[str, typer.Option(help="Comma-separated latent-layer counts K to compare.")] = "13,19",
    vdvae: Annotated[
        str, typer.Option(help="Foundation VDVAE (as recon-train subject).")
    ] = "builtin:small64",
    max_epochs: Annotated[int, typer.Option(help="GRU epoch cap.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOption = "cpu",
    encode_batch: EncodeBatchOption = 64,
    weights: WeightsOption = None,
) -> None:
    """Stage-1 PixCorr/SSIM of ridge vs GRU at several K, beside mean-image and shuffled-betas controls, and
    Brain-Diffuser's eight metrics as far as --weights holds their networks (docs/metrics.md).

    Example: recon-eval stage1 --data data/subj01 --out benchmarks/results/stage1
    """
    check_device(device)
    from brainrecon.train.evaluation.stage1 import compare_stage1

    ks = tuple(int(k) for k in layers.split(","))
    compare_stage1(
        data,
        out,
        ks,
        vdvae=vdvae,
        max_epochs=max_epochs,
        seed=seed,
        device=device,
        encode_batch=encode_batch,
        weights=weights,
    )
    Console().print((out / "stage1.md").read_text())


@eval_app.command("stage2")
def eval_stage2(
    model_dir: Annotated[Path, typer.Option(help="Subject model folder with both stages fitted.")],
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject.")],
    out: Annotated[Path, typer.Option(help="Results folder: stage2.json, stage2.md, stage2_sheet.png.")],
    device: DeviceOption = "cpu",
    weights: WeightsOption = None,
) -> None:
    """Stage 1 vs stage 1+2 (PixCorr, SSIM, CLIP 2-way identification) with guidance, oracle and shuffle controls,
    and Brain-Diffuser's eight metrics as far as --weights holds their networks (docs/metrics.md).

    Example: recon-eval stage2 --model-dir engines/subj01 --data data/subj01 --out benchmarks/results/stage2
    """
    check_device(device)
    from brainrecon.train.evaluation.stage2 import compare_stage2

    compare_stage2(model_dir, data, out, device=device, weights=weights)
    Console().print((out / "stage2.md").read_text())


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers for {what}, found {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers for {what}, found {text!r}") from None


@eval_app.command("noise")
def eval_noise(
    model_dir: Annotated[Path, typer.Option(help="Subject model folder (stage 1, or both stages).")],
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject.")],
    out: Annotated[
        Path, typer.Option(help="Results folder: noise.json, noise.md, noise.png, noise_sheet.png.")
    ],
    levels: Annotated[
        str, typer.Option(help="Noise std as multiples of the test betas' std, comma-separated.")
    ] = "0,0.25,0.5,1,2,4",
    seeds: Annotated[str, typer.Option(help="Noise seeds, comma-separated.")] = "0,1,2",
    images: Annotated[int, typer.Option(help="Use the first N test images (0: all).")] = 0,
    roles: Annotated[
        bool, typer.Option(help="Also noise the stage-1 input alone and the CLIP input alone.")
    ] = True,
    steps: Annotated[int, typer.Option(help="DDIM steps (0: the fitted 50).")] = 0,
    device: DeviceOption = "cpu",
) -> None:
    """Noise sensitivity: Gaussian noise on the test betas; PixCorr, SSIM, CLIP 2-way per stage and input.

    Example: recon-eval noise --model-dir engines/subj01 --data data/subj01 --out benchmarks/results/noise
    """
    check_device(device)
    from brainrecon.train.experiments.noise import NoiseConfig, noise_sensitivity, noise_table

    config = NoiseConfig(
        levels=_floats(levels, "--levels"),
        seeds=_ints(seeds, "--seeds"),
        n_images=images or None,
        roles=roles,
        num_inference_steps=steps or None,
    )
    result = noise_sensitivity(model_dir, data, out, config, log=Console(stderr=True).print, device=device)
    Console().print(noise_table(result))


@eval_app.command("quality")
def eval_quality(
    model_dir: Annotated[
        Path, typer.Option(help="Exported subject model folder (recon-export --stage all).")
    ],
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject; its test set is used.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Results folder: quality.json, quality.md, quality.png, quality_sheet.png, sheets/."
        ),
    ],
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=key=value,key=value: SamplingConfig fields (num_inference_steps, strength, guidance_scale, "
            "sampler, guidance_stop, ...) and RuntimeOptions fields (engine, precision, ...); repeat for more. "
            "'paper' (the fitted sampling, first) is the reference; a setting named paper changes it."
        ),
    ] = None,
    settings: Annotated[
        Path | None,
        typer.Option(help="JSON file {NAME: {key: value, ...}, ...}, run before the --setting ones."),
    ] = None,
    images: Annotated[int, typer.Option(help="Use the first N test images (0: all).")] = 0,
    real_size_times: Annotated[
        Path | None,
        typer.Option(
            help='JSON of real-size seconds per call: {"machine", "unet_rows_s": {"ort fp32": {"1": s, "2": s}}, '
            '"vae_encode_s", "vae_decode_s", "stage1_s"}; adds the estimated real-size seconds per image.'
        ),
    ] = None,
    engine: Annotated[Engine, typer.Option(help="Engine of the settings that name none.")] = "ort",
    precision: Annotated[Precision, typer.Option(help="Precision of the settings that name none.")] = "fp32",
    device: DeviceOption = "cpu",
    weights: WeightsOption = None,
    seed: Annotated[
        int | None,
        typer.Option(help="img2img seed of every setting, the paper's included (default: the fitted one)."),
    ] = None,
) -> None:
    """The quality map: the torch-free runtime on the test set once per setting; seconds per image, UNet calls,
    PixCorr, SSIM, CLIP 2-way (ours), the difference from the paper setting's images, and which settings stay
    within 0.01 CLIP 2-way and 0.02 PixCorr and SSIM of it. --device runs the CLIP and the metric networks.

    Example: recon-eval quality --model-dir engines/subj01 --data data/subj01 --out benchmarks/results/quality
    --setting ddim20=num_inference_steps=20 --setting dpm20=sampler=dpmpp_2m,num_inference_steps=20
    --setting ov-bf16=engine=openvino,precision=bf16
    """
    check_device(device)
    from brainrecon.train.experiments.quality import parse_setting, quality_map, quality_table, read_settings

    specs = (read_settings(settings) if settings is not None else []) + [
        parse_setting(s) for s in setting or []
    ]
    result = quality_map(
        model_dir,
        data,
        out,
        specs,
        n_images=images or None,
        real_size_times=real_size_times,
        weights=weights,
        engine=engine,
        precision=precision,
        device=device,
        seed=seed,
    )
    Console().print(quality_table(result), highlight=False, markup=False, soft_wrap=True)


@eval_app.command("int8")
def eval_int8(
    model_dir: Annotated[
        Path, typer.Option(help="Exported subject model folder (recon-export --stage all).")
    ],
    data: Annotated[
        Path, typer.Option(help="recon-prepare folder: training trials calibrate, the test set is scored.")
    ],
    out: Annotated[
        Path, typer.Option(help="Results folder: int8.json, int8.md, int8_sheet.png, models/ (the IR).")
    ],
    recipe: Annotated[
        list[str] | None, typer.Option(help="Sampling presets to run (brainrecon.sampling.PRESETS).")
    ] = None,
    images: Annotated[int, typer.Option(help="Use the first N test images (0: all).")] = 0,
    calibration: Annotated[int, typer.Option(help="Training trials to calibrate on.")] = 16,
    static_check: Annotated[
        bool, typer.Option(help="Also check OpenVINO's static-shape compile on repeated calls.")
    ] = True,
    device: DeviceOption = "cpu",
) -> None:
    """INT8 on the CPU: NNCF post-training quantization of the stage-2 UNet and VAE (OpenVINO IR, calibrated on
    training trials), the test set through the runtime beside ORT fp32 and OpenVINO fp32 / bf16, per-call seconds,
    and OpenVINO's static-shape compile on repeated calls. Needs `pip install "brainrecon[int8]"`.

    Example: recon-eval int8 --model-dir engines/subj01 --data data/subj01 --out benchmarks/results/int8
    """
    check_device(device)
    from brainrecon.train.experiments.int8 import int8_experiment, int8_table

    result = int8_experiment(
        model_dir,
        data,
        out,
        recipes=recipe or ("paper", "fast"),
        n_images=images or None,
        calibration_trials=calibration,
        device=device,
        static_check=static_check,
    )
    Console().print(int8_table(result), highlight=False, markup=False, soft_wrap=True)


@eval_app.command("quality-seeds")
def eval_quality_seeds(
    runs: Annotated[list[Path], typer.Argument(help="Quality-map folders of one model, one per --seed.")],
    out: Annotated[Path, typer.Option(help="Results folder: seeds.json, seeds.md.")],
) -> None:
    """The quality maps of one model at several img2img seeds, summarised: per setting the mean ± SD over the seeds
    of PixCorr, SSIM, CLIP 2-way and of their change from the same seed's reference; how many seeds stay within the
    bounds, and whether the mean change does.

    Example: recon-eval quality-seeds benchmarks/results/quality benchmarks/results/quality/seed1
    benchmarks/results/quality/seed2 --out benchmarks/results/quality/seeds
    """
    from brainrecon.io import write_json, write_text
    from brainrecon.train.experiments.quality import across_seeds, across_seeds_table

    out.mkdir(parents=True, exist_ok=True)
    summary = across_seeds(runs)
    write_json(out / "seeds.json", summary)
    write_text(out / "seeds.md", across_seeds_table(summary))
    Console().print(across_seeds_table(summary), highlight=False, markup=False, soft_wrap=True)


@eval_app.command("layers")
def eval_layers(
    data: Annotated[Path, typer.Option(help="recon-prepare folder of the subject.")],
    out: Annotated[Path, typer.Option(help="Results folder: layers.json, layers.md, layers.png, models/.")],
    layers: Annotated[str, typer.Option(help="Latent-layer counts K, comma-separated.")] = "1,4,8,13,17,21",
    regressors: Annotated[str, typer.Option(help="Comma-separated: ridge, gru.")] = "ridge,gru",
    max_epochs: Annotated[int, typer.Option(help="GRU epoch cap (the paper: 200, early stopping).")] = 200,
    vdvae: Annotated[
        str, typer.Option(help="Foundation VDVAE (as recon-train subject).")
    ] = "builtin:small64",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOption = "cpu",
    encode_batch: EncodeBatchOption = 64,
    resume: Annotated[
        bool, typer.Option(help="Keep the K already finished in OUT/layers.json; fit only the others.")
    ] = False,
) -> None:
    """Latent layers: ridge and GRU over K, with metrics, parameters, fit time and the true-latent ceiling.

    Example: recon-eval layers --data data/subj01 --out benchmarks/results/layers
    """
    check_device(device)
    from brainrecon.train.experiments.layers import latent_layers, layers_table

    result = latent_layers(
        data,
        out,
        layers=_ints(layers, "--layers"),
        regressors=tuple(r.strip() for r in regressors.split(",")),
        max_epochs=max_epochs,
        vdvae=vdvae,
        seed=seed,
        log=Console(stderr=True).print,
        device=device,
        encode_batch=encode_batch,
        resume=resume,
    )
    Console().print(layers_table(result))


@eval_app.command("curves")
def eval_curves(
    run: Annotated[
        list[str], typer.Option(help="LABEL=FOLDER of a recon-train foundation output; repeat for more runs.")
    ],
    out: Annotated[Path, typer.Option(help="Results folder: training.json, training_curves.png.")],
    window: Annotated[int, typer.Option(help="Steps per plotted mean.")] = 50,
) -> None:
    """Training curves of foundation models, from the loss history their checkpoints keep.

    Example: recon-eval curves --run vae=data/vae-small --run unet=data/unet-small --out benchmarks/results/foundations
    """
    from brainrecon.train.experiments.curves import training_curves

    runs = {}
    for item in run:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise typer.BadParameter(f"expected LABEL=FOLDER, found {item!r}", param_hint="--run")
        runs[label] = folder
    result = training_curves(runs, out, window)
    for label, r in result["runs"].items():
        last = {term: values[-1] for term, values in r["curves"].items()}
        Console().print(f"{label}: {r['steps']} steps, last {r['window']}-step means {last}")
    Console().print(f"-> {out / 'training_curves.png'}")


@eval_app.command("report")
def eval_report(
    model_dir: Annotated[Path, typer.Option(help="Subject model folder (both stages fitted).")],
    out: Annotated[Path, typer.Option(help="Report folder: index.html and its images.")],
    results: Annotated[
        Path, typer.Option(help="Committed results folder (stage1/, stage2/, noise/, layers/, *.json).")
    ] = Path("benchmarks/results"),
    recon: Annotated[
        Path | None, typer.Option(help="A recon-infer or recon-reconstruct output folder (image grid).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = True,
) -> None:
    """One static HTML page (opens offline): model summary, metric tables, experiment plots, image grids, speed.

    Example: recon-eval report --model-dir engines/subj01 --recon data/recon --out report/
    """
    from brainrecon.report import build_report

    index = build_report(model_dir, out, results=results, recon=recon, overwrite=overwrite)
    Console().print(f"report: {index}")


@eval_app.command("metrics")
def eval_metrics(
    recon: Annotated[
        Path, typer.Option(help="recon-infer / recon-reconstruct output folder: its KIND_NNNNN.png images.")
    ],
    stimuli: Annotated[
        Path, typer.Option(help="Ground truth, one image per row: recon-prepare's test_images.npy.")
    ],
    weights: Annotated[
        Path, typer.Option(help="Folder with the feature networks' published files (docs/metrics.md).")
    ],
    metrics: Annotated[
        str,
        typer.Option(
            help="Comma-separated: pixcorr,ssim,alexnet2,alexnet5,inceptionv3,clip,effnet,swav (default: all)."
        ),
    ] = "all",
    kind: Annotated[ImageKind, typer.Option(help="Which images of the folder: final or stage1.")] = "final",
    out: Annotated[
        Path | None, typer.Option(help="JSON results file (default: RECON/paper_metrics.json).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per feature-network call.")] = 16,
    device: DeviceOption = "cpu",
) -> None:
    """Brain-Diffuser's eight metrics (PixCorr, SSIM, AlexNet(2), AlexNet(5), InceptionV3, CLIP, EffNet-B, SwAV)
    with the networks whose files are in --weights; says which file each missing one needs.

    Example: recon-eval metrics --recon data/recon --stimuli data/subj01/test_images.npy --weights ~/eval-weights
    """
    check_device(device)
    from brainrecon.errors import InputError
    from brainrecon.io import write_json
    from brainrecon.train.evaluation.paper_metrics import (
        METRICS,
        check_metric_names,
        metrics_table,
        paper_metrics,
        read_recon_folder,
        read_stimuli,
    )

    try:
        names = METRICS if metrics == "all" else check_metric_names([m.strip() for m in metrics.split(",")])
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--metrics") from None
    rows, recon_images = read_recon_folder(recon, kind)
    gt_images = read_stimuli(stimuli, rows)
    result = paper_metrics(
        gt_images, recon_images, weights, names, device=device, batch_size=batch_size, show_progress=True
    )
    target = out if out is not None else recon / "paper_metrics.json"
    write_json(
        target,
        {
            **result.to_json(),
            "recon": str(recon),
            "kind": kind,
            "stimuli": str(stimuli),
            "rows": rows.tolist(),
        },
    )
    Console().print(metrics_table(result, f"{recon.name} {kind}"), highlight=False)
    Console().print(f"-> {target}")


train_main = run_app(train_app)
reconstruct_main = run_app(reconstruct_app)
eval_main = run_app(eval_app)
