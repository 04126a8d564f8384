"""brainrecon.train: torch training, the torch reference and evaluation (imports nothing from runtime/ but its
public API, nothing from export/ or serve/).

    foundations/   the pretrained-model families and how they are loaded or trained: vdvae, clip_small,
                   clip_features, dual_unet (Versatile Diffusion's dual-guided UNet), ldm_train (VAE, UNet),
                   vdvae_train, loaders (every foundation from its spec, with provenance), checkpoint
    stage1/        fitting stage 1: ridge, gru, fit (betas → VDVAE latents; writes model_dir/stage1/)
    stage2/        fitting stage 2: clip_ridge, fit (betas → CLIP contexts; writes model_dir/stage2/), and
                   img2img (the one torch img2img loop: encode, denoise, decode)
    reference.py   a fitted model folder loaded back (Stage1Model, Stage2Model) and reconstructed: the torch
                   reference the runtime must match and export exports from
    evaluation/    test-set runs and results tables (stage1, stage2), Brain-Diffuser's eight metrics
                   (paper_metrics, feature_nets)
    experiments/   studies on a fitted subject: noise sensitivity, latent layers, training curves
    device.py      the torch device of a command (`--device`)
"""
