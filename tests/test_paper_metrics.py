"""Brain-Diffuser's eight metrics (train/evaluation): the networks at their real sizes with random weights, saved in
the published formats, and every score checked against an independent computation written from
ozcelikfu/brain-diffuser `scripts/eval_extract_features.py` and `scripts/evaluate_reconstruction.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from brainrecon.errors import InputError, MissingFileError
from brainrecon.metrics import two_way_identification
from brainrecon.train.evaluation.feature_nets import (
    FEATURE_NETS,
    AlexNet,
    EfficientNetB1,
    InceptionV3,
    ResNet50,
    load_feature_net,
)
from brainrecon.train.evaluation.paper_metrics import (
    CLIP_FOLDER,
    METRICS,
    NETWORK,
    extract_features,
    load_clip_vision,
    mean_correlation_distance,
    metrics_table,
    paper_metrics,
    read_recon_folder,
    read_stimuli,
    required_file,
)

# torchvision's published parameter counts (the `num_params` of each IMAGENET1K_V1 weight entry)
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "inceptionv3": 27_161_264,
    "efficientnet": 7_794_184,
    "swav": 23_508_032,
}


def _calibrate_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BatchNorm statistics measured on a few images (one train-mode pass, cumulative averages): with PyTorch's
    default init and identity BN statistics, deep random networks map every image to almost the same pooled
    feature (pairwise r = 1 - 1e-14), and two-way identification would compare rounding noise."""
    from brainrecon.train.evaluation.paper_metrics import IMAGENET_MEAN, IMAGENET_STD, network_input

    x = network_input(_images(4, 64, seed), IMAGENET_MEAN, IMAGENET_STD)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.nn.functional.interpolate(x, size=160, mode="bilinear"))
    return model.eval()


def _swav_checkpoint(backbone: ResNet50) -> dict[str, torch.Tensor]:
    """SwAV's hub file as facebookresearch/swav main_swav.py saves it: DistributedDataParallel's "module." on every
    key, the projection head (2048 → 2048 → BN → 128) and 3000 prototypes, no `fc`."""
    g = torch.Generator().manual_seed(5)
    state = {f"module.{k}": v for k, v in backbone.state_dict().items()}
    head = {
        "projection_head.0.weight": torch.randn(2048, 2048, generator=g),
        "projection_head.0.bias": torch.zeros(2048),
        "projection_head.1.weight": torch.ones(2048),
        "projection_head.1.bias": torch.zeros(2048),
        "projection_head.1.running_mean": torch.zeros(2048),
        "projection_head.1.running_var": torch.ones(2048),
        "projection_head.1.num_batches_tracked": torch.tensor(0),
        "projection_head.3.weight": torch.randn(128, 2048, generator=g),
        "projection_head.3.bias": torch.zeros(128),
        "prototypes.weight": torch.randn(3000, 128, generator=g),
    }
    return {**state, **{f"module.{k}": v for k, v in head.items()}}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A --weights folder with the four torchvision-format files (random weights, real sizes) and the models."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    models = {
        "alexnet": AlexNet().eval(),
        "inceptionv3": _calibrate_bn(InceptionV3(), 1),
        "efficientnet": _calibrate_bn(EfficientNetB1(), 2),
        "swav": _calibrate_bn(ResNet50(num_classes=None), 3),
    }
    for name, model in models.items():
        state = _swav_checkpoint(model) if name == "swav" else model.state_dict()
        torch.save(state, folder / FEATURE_NETS[name].file)
    return {"folder": folder, "models": models}


def _tiny_clip(folder: Path, seed: int = 0):
    """A small CLIPModel at 224 px saved with save_pretrained (the layout of openai/clip-vit-large-patch14)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    return model


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (blurred noise), so that resizing filters and correlations are not degenerate."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BICUBIC)) for c in coarse]
    ) // 2 + rng.integers(0, 128, size=(n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- Brain-Diffuser's code, restated


def _count(score: float, n: int) -> int:
    """A two-way score as the number of successful (prediction, other ground truth) comparisons: n (n - 1) of them.
    The count is what must agree exactly; the float differs in the last bit with the order of the division."""
    count = score * n * (n - 1)
    assert abs(count - round(count)) < 1e-6
    return round(count)


def bd_pairwise_corr_all(ground_truth: np.ndarray, predictions: np.ndarray) -> float:
    """`pairwise_corr_all` of scripts/evaluate_reconstruction.py (the p-value dropped)."""
    r = np.corrcoef(ground_truth, predictions)
    r = r[: len(ground_truth), len(ground_truth) :]
    congruents = np.diag(r)
    success = r < congruents
    success_cnt = np.sum(success, 0)
    return np.mean(success_cnt) / (len(ground_truth) - 1)


def bd_loader(path: Path, mean, std) -> torch.Tensor:
    """The script's `batch_generator_external_images.__getitem__`, with torchvision's PIL `resize`, `to_tensor`
    and `Normalize` spelled out in numpy: PIL bilinear resize, uint8/255 in float32, (x - mean) / std."""
    img = Image.open(path).resize((224, 224), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return torch.from_numpy(x)


def bd_hook_features(net: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The script's feature capture: a forward hook on `module`, the whole network run, outputs reshaped (N, -1)."""
    feat_list = []
    handle = module.register_forward_hook(lambda m, i, o: feat_list.append(o.cpu().numpy().copy()))
    with torch.no_grad():
        net(x)
    handle.remove()
    out = np.concatenate(feat_list)
    return out.reshape(len(out), -1)


# ----------------------------------------------------------------------------- loading the published files


def test_published_files_load_strictly_with_the_published_sizes(published):
    """Each file loads into a fresh network with every key and shape checked, and the tensors arrive unchanged;
    the parameter counts are torchvision's published ones (SwAV: the ResNet-50 backbone without `fc`)."""
    for name, reference in published["models"].items():
        model = load_feature_net(name, published["folder"] / FEATURE_NETS[name].file)
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
        expected = reference.state_dict()
        loaded = model.state_dict()
        assert list(loaded) == list(expected)
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name


def _error(tmp_path: Path, name: str, state) -> str:
    path = tmp_path / FEATURE_NETS[name].file
    torch.save(state, path)
    with pytest.raises(InputError) as err:
        load_feature_net(name, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_wrong_or_missing_files_fail_in_one_line(tmp_path, published):
    """A missing file names itself and where it is published; a missing key, a wrong shape, an extra key, a
    pickle that is not a state dict and a truncated file each give one line naming the file and the misfit."""
    with pytest.raises(MissingFileError) as err:
        load_feature_net("alexnet", tmp_path / "alexnet-owt-7be5be79.pth")
    assert "download.pytorch.org/models/alexnet-owt-7be5be79.pth" in str(err.value)

    state = published["models"]["efficientnet"].state_dict()
    no_key = {k: v for k, v in state.items() if k != "features.3.1.block.2.fc1.weight"}
    assert "missing key features.3.1.block.2.fc1.weight" in _error(tmp_path, "efficientnet", no_key)
    wrong = {**state, "classifier.1.weight": torch.zeros(10, 1280)}
    assert "classifier.1.weight of shape 10x1280 (expected 1000x1280)" in _error(
        tmp_path, "efficientnet", wrong
    )
    extra = {**state, "features.9.weight": torch.zeros(1)}
    assert "unexpected key features.9.weight" in _error(tmp_path, "efficientnet", extra)
    assert "found list" in _error(tmp_path, "alexnet", [torch.zeros(1)])
    # an EfficientNet file where the Inception file belongs
    assert "missing key Conv2d_1a_3x3.conv.weight" in _error(
        tmp_path, "inceptionv3", published["models"]["efficientnet"].state_dict()
    )
    # SwAV: a checkpoint whose backbone misses a block is refused even though the heads are dropped
    swav = _swav_checkpoint(published["models"]["swav"])
    del swav["module.layer4.2.conv3.weight"]
    assert "missing key layer4.2.conv3.weight" in _error(tmp_path, "swav", swav)

    path = tmp_path / "truncated.pth"
    path.write_bytes((published["folder"] / FEATURE_NETS["efficientnet"].file).read_bytes()[:5000])
    with pytest.raises(InputError) as err:
        load_feature_net("efficientnet", path)
    assert "\n" not in str(err.value) and "a torch state dict" in str(err.value)


def test_checkpoints_without_batchnorm_counters_load(tmp_path, published):
    """Files saved before PyTorch 0.4.1 have no `num_batches_tracked`; BatchNorm's loader fills it in, so such a
    file loads and gives the same features."""
    model = published["models"]["efficientnet"]
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    loaded = load_feature_net("efficientnet", tmp_path / "old.pth")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in old.items())  # bytes copied: exact
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model.features_pooled(x)
        # two separately built networks need not run the same kernels (oneDNN and MKL choose by CPU and memory
        # layout): float32 rounding only (measured: equal, AMD EPYC and Intel Xeon)
        torch.testing.assert_close(
            loaded.features_pooled(x), want, rtol=0, atol=1e-5 * want.abs().max().item()
        )


# ----------------------------------------------------------------------------- layer taps


def test_layer_taps_equal_the_hooked_outputs(published):
    """Our taps equal the outputs Brain-Diffuser hooks (features[4], features[11], avgpool) while the whole
    network runs, exactly (same operators, same order)."""
    models = published["models"]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    alex = models["alexnet"]
    with torch.no_grad():
        tap2, tap5 = alex.taps(x)
    assert tap2.shape == (1, 192 * 27 * 27) and tap5.shape == (1, 256 * 13 * 13)
    assert np.array_equal(tap2.numpy(), bd_hook_features(alex, alex.features[4], x))
    assert np.array_equal(tap5.numpy(), bd_hook_features(alex, alex.features[11], x))
    for name, method in (
        ("inceptionv3", "features"),
        ("efficientnet", "features_pooled"),
        ("swav", "features"),
    ):
        net = models[name]
        with torch.no_grad():
            ours = getattr(net, method)(x).numpy()
        assert ours.shape == (1, 1280 if name == "efficientnet" else 2048)
        assert np.array_equal(ours, bd_hook_features(net, net.avgpool, x)), name


# ----------------------------------------------------------------------------- scores on hand-made features


def test_two_way_identification_known_answers_and_brain_diffusers_loop():
    """Identical features: 100%. Independent features: chance (0.5 ± 0.03 for 300 items: the mean of 300 × 299
    weakly dependent Bernoulli(0.5) draws has sd ≈ 0.017). On AlexNet(2)-sized features the score equals
    Brain-Diffuser's np.corrcoef loop exactly, as a count."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 64)).astype(np.float32)
    assert two_way_identification(feats, feats) == 1.0
    assert abs(two_way_identification(feats, rng.normal(size=(300, 64))) - 0.5) < 0.03
    assert abs(two_way_identification(feats, feats[rng.permutation(300)]) - 0.5) < 0.03

    gt = rng.normal(size=(24, 192 * 27 * 27)).astype(np.float32)
    pred = (0.003 * gt + rng.normal(size=gt.shape)).astype(np.float32)  # r ≈ 0.003: partly identified
    ours = two_way_identification(gt, pred)
    assert 0.0 < ours < 1.0
    assert _count(ours, 24) == _count(bd_pairwise_corr_all(gt, pred), 24)
    assert ours == pytest.approx(bd_pairwise_corr_all(gt, pred), abs=1e-12)


def test_correlation_distance_is_scipys():
    """The mean of scipy.spatial.distance.correlation over pairs, exactly; and 1 - Pearson r to 1e-6 (float32
    features, float64 reference)."""
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(7, 1280)).astype(np.float32)
    pred = (gt + rng.normal(size=gt.shape)).astype(np.float32)
    expected = np.array([correlation(gt[i], pred[i]) for i in range(7)]).mean()
    assert mean_correlation_distance(gt, pred) == expected
    pearson = np.mean(
        [np.corrcoef(gt[i].astype(np.float64), pred[i].astype(np.float64))[0, 1] for i in range(7)]
    )
    assert mean_correlation_distance(gt, pred) == pytest.approx(1 - pearson, abs=1e-6)
    assert mean_correlation_distance(gt, gt) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- CLIP


def test_clip_folder_gives_the_projected_unnormalised_class_token(tmp_path):
    """A CLIPModel folder (save_pretrained) and a vision-tower folder both load; the feature is
    visual_projection(post_layernorm(CLS)), not L2-normalised, as OpenAI's `model.visual` output (float32, 1e-6:
    the same module run twice). A folder that is not ViT-L/14 is refused in one line when the real one is
    required."""
    from transformers import CLIPVisionModelWithProjection

    full = _tiny_clip(tmp_path / "clip")
    images = _images(3, 96, seed=2)
    model = load_clip_vision(tmp_path / "clip", require_vit_l14=False)
    feats = extract_features("clip", model, images, batch_size=2)["clip"]
    x = torch.stack([bd_loader_array(im) for im in images])
    with torch.no_grad():
        hidden = full.vision_model(pixel_values=x).last_hidden_state
        expected = full.visual_projection(full.vision_model.post_layernorm(hidden[:, 0])).numpy()
    assert feats.shape == (3, 24)
    np.testing.assert_allclose(feats, expected, rtol=0, atol=1e-6)
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0)

    tower = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip", config=model.config)
    tower.save_pretrained(tmp_path / "image_encoder")
    again = extract_features(
        "clip", load_clip_vision(tmp_path / "image_encoder", require_vit_l14=False), images
    )
    np.testing.assert_allclose(again["clip"], feats, rtol=0, atol=1e-6)

    with pytest.raises(InputError) as err:
        load_clip_vision(tmp_path / "clip")
    assert "\n" not in str(err.value) and "ViT-L/14" in str(err.value)
    with pytest.raises(MissingFileError):
        load_clip_vision(tmp_path / "nothing")


def openai_visual(vision, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's `VisionTransformer.forward` (openai/CLIP `clip/model.py`), restated on a transformers
    CLIPVisionModelWithProjection's weights under OpenAI's names: conv1 → class token + positional embedding →
    ln_pre → residual blocks (nn.MultiheadAttention with the q/k/v weights stacked as `in_proj_weight`, QuickGELU
    MLP) → ln_post of the class token → `@ proj` (proj = visual_projection.weight.T)."""
    vm = vision.vision_model
    width = vm.config.hidden_size
    x = torch.nn.functional.conv2d(x, vm.embeddings.patch_embedding.weight, stride=vm.config.patch_size)
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)  # (N, grid², width)
    cls = vm.embeddings.class_embedding.expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + vm.embeddings.position_embedding.weight
    x = vm.pre_layrnorm(x).permute(1, 0, 2)  # NLD -> LND
    for layer in vm.encoder.layers:
        attn = torch.nn.MultiheadAttention(width, vm.config.num_attention_heads)
        sa = layer.self_attn
        attn.in_proj_weight.data = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
        attn.in_proj_bias.data = torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])
        attn.out_proj.weight.data, attn.out_proj.bias.data = sa.out_proj.weight, sa.out_proj.bias
        h = layer.layer_norm1(x)
        x = x + attn(h, h, h, need_weights=False)[0]
        h = layer.mlp.fc1(layer.layer_norm2(x))
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU
    x = vm.post_layernorm(x.permute(1, 0, 2)[:, 0, :])
    return x @ vision.visual_projection.weight.T


def test_image_embeds_are_openai_clips_visual_output(tmp_path):
    """`image_embeds` equals OpenAI's `model.visual(x)` restated on the same weights (max abs difference 1e-5:
    float32, attention kernels may differ; seen bit-identical on the small CLIP here), so a Hugging Face folder of the
    OpenAI checkpoint gives Brain-Diffuser's CLIP features."""
    _tiny_clip(tmp_path / "clip", seed=3)
    vision = load_clip_vision(tmp_path / "clip", require_vit_l14=False)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            vision(pixel_values=x).image_embeds, openai_visual(vision, x), rtol=0, atol=1e-5
        )


def bd_loader_array(image: np.ndarray) -> torch.Tensor:
    from brainrecon.train.evaluation.paper_metrics import CLIP_MEAN, CLIP_STD

    path = Path(f"/tmp/_bd_{id(image)}.png")
    Image.fromarray(image).save(path)
    try:
        return bd_loader(path, CLIP_MEAN, CLIP_STD)
    finally:
        path.unlink()


@pytest.mark.slow
def test_clip_vit_l14_size_folder_loads(tmp_path):
    """A randomly initialised CLIP ViT-L/14 vision tower (303 M parameters) in a CLIPModel-style folder passes the
    ViT-L/14 check and gives (N, 768) embeddings."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / CLIP_FOLDER)
    model = load_clip_vision(tmp_path / CLIP_FOLDER)
    feats = extract_features("clip", model, _images(2, 425, seed=3))["clip"]
    assert feats.shape == (2, 768) and np.isfinite(feats).all()


# ----------------------------------------------------------------------------- all eight, end to end


FAST_METRICS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "clip")


def test_fast_metrics_equal_an_independent_computation(tmp_path, published):
    """PixCorr, SSIM, AlexNet(2), AlexNet(5) and CLIP against the restated scripts (see _check_against_scripts);
    the three deep CNNs take ~30 s on 2 busy cores and are in the slow test below."""
    _check_against_scripts(tmp_path, published, FAST_METRICS)


@pytest.mark.slow
def test_eight_metrics_equal_an_independent_computation(tmp_path, published):
    """All eight columns against the restated scripts (InceptionV3, EffNet-B and SwAV add ~30 s on 2 cores)."""
    _check_against_scripts(tmp_path, published, METRICS)


def _check_against_scripts(tmp_path: Path, published: dict, metrics: tuple[str, ...]) -> None:
    """On the same PNGs and weights, each metric equals a computation restated from Brain-Diffuser's scripts:
    PNG files opened with PIL, its loader, forward hooks on the loaded networks, `pairwise_corr_all`, scipy's
    correlation distance, PixCorr with np.corrcoef after PIL's default resize and SSIM with scikit-image on the
    gray images (`channel_axis=-1`: what `multichannel=True` did in skimage 0.17). Identification: the same count
    of successes; distances, PixCorr, SSIM: 1e-6 (float32 features and pixels on both sides)."""
    n = 5
    gt = _images(n, 425, seed=10)
    recon = np.stack([np.asarray(Image.fromarray(im).resize((512, 512))) for im in gt])
    recon = np.clip(
        recon.astype(int) + np.random.default_rng(0).integers(-60, 60, recon.shape), 0, 255
    ).astype(np.uint8)
    for i in range(n):
        Image.fromarray(gt[i]).save(tmp_path / f"gt_{i}.png")
        Image.fromarray(recon[i]).save(tmp_path / f"final_{i:05d}.png")
    weights = published["folder"]
    _tiny_clip(weights / CLIP_FOLDER)
    rows, read_back = read_recon_folder(tmp_path, "final")
    assert rows.tolist() == list(range(n)) and np.array_equal(read_back, recon)

    result = paper_metrics(gt, read_back, weights, metrics, require_vit_l14=False, batch_size=4)
    assert result.missing == {} and [m for m in METRICS if result.values[m] is not None] == list(metrics)

    # ----- the independent computation
    from brainrecon.train.evaluation.paper_metrics import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    def loader(prefix: str, mean, std) -> torch.Tensor:
        names = (
            [f"gt_{i}.png" for i in range(n)] if prefix == "gt" else [f"final_{i:05d}.png" for i in range(n)]
        )
        return torch.stack([bd_loader(tmp_path / name, mean, std) for name in names])

    nets = published["models"]  # equal to the loaded files (test_published_files_load_strictly...)
    taps = {
        "alexnet2": (nets["alexnet"], nets["alexnet"].features[4]),
        "alexnet5": (nets["alexnet"], nets["alexnet"].features[11]),
        "inceptionv3": (nets["inceptionv3"], nets["inceptionv3"].avgpool),
        "effnet": (nets["efficientnet"], nets["efficientnet"].avgpool),
        "swav": (nets["swav"], nets["swav"].avgpool),
    }
    expected = {}
    for metric, (net, module) in taps.items():
        if metric not in metrics:
            continue
        g = bd_hook_features(net, module, loader("gt", IMAGENET_MEAN, IMAGENET_STD))
        p = bd_hook_features(net, module, loader("final", IMAGENET_MEAN, IMAGENET_STD))
        # the features themselves, not only the scores (a score can survive a wrong resize filter): float32
        # rounding of the same operators, 1e-5 relative
        ours = extract_features(NETWORK[metric], net, read_back)[metric]
        np.testing.assert_allclose(ours, p, rtol=1e-5, atol=1e-6 * np.abs(p).max())
        if metric in ("effnet", "swav"):
            expected[metric] = np.array([correlation(g[i], p[i]) for i in range(n)]).mean()
        else:
            expected[metric] = bd_pairwise_corr_all(g, p)
    clip = load_clip_vision(weights / CLIP_FOLDER, require_vit_l14=False)
    with torch.no_grad():
        g = clip(pixel_values=loader("gt", CLIP_MEAN, CLIP_STD)).image_embeds.numpy()
        p = clip(pixel_values=loader("final", CLIP_MEAN, CLIP_STD)).image_embeds.numpy()
    expected["clip"] = bd_pairwise_corr_all(g, p)
    pix, ssims = [], []
    for i in range(n):
        gen_image = np.array(Image.open(tmp_path / f"final_{i:05d}.png").resize((425, 425))) / 255.0
        gt_image = np.array(Image.open(tmp_path / f"gt_{i}.png")) / 255.0
        pix.append(np.corrcoef(gt_image.reshape(1, -1), gen_image.reshape(1, -1))[0, 1])
        ssims.append(
            structural_similarity(
                rgb2gray(gen_image),
                rgb2gray(gt_image),
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
        )
    expected["pixcorr"] = np.mean(pix)
    expected["ssim"] = np.mean(ssims)

    for metric in set(metrics) & {"alexnet2", "alexnet5", "inceptionv3", "clip"}:
        assert _count(result.values[metric], n) == _count(expected[metric], n), metric
    for metric in set(metrics) & {"pixcorr", "ssim", "effnet", "swav"}:
        assert result.values[metric] == pytest.approx(expected[metric], abs=1e-6), metric
    table = metrics_table(result)
    assert table.index("PixCorr") < table.index("SSIM") < table.index("AlexNet(2)") < table.index("SwAV")


def test_absent_weights_are_named_and_the_rest_computed(tmp_path):
    """With an empty --weights folder only PixCorr and SSIM are computed; every other column says the file it
    needs (the official name and where it is published)."""
    (tmp_path / "w").mkdir()
    gt = _images(3, 64, seed=4)
    result = paper_metrics(gt, gt[::-1].copy(), tmp_path / "w")
    assert result.values["pixcorr"] is not None and result.values["ssim"] is not None
    assert set(result.missing) == set(METRICS) - {"pixcorr", "ssim"}
    assert result.missing["alexnet5"] == required_file("alexnet")
    assert "swav_800ep_pretrain.pth.tar" in result.missing["swav"]
    assert CLIP_FOLDER in result.missing["clip"]
    assert "needs efficientnet_b1_rwightman-bac287d4.pth" in metrics_table(result)


def test_one_scorer_over_many_runs_equals_a_scorer_per_run(tmp_path, published):
    """`PaperScorer` loads the networks and extracts the ground truths' features once for all runs (as the
    recon-eval stage1/stage2 tables use it): each run's values equal a fresh `paper_metrics` call on that run,
    exactly (the same computation), and the table lists the runs in order with the missing files below."""
    from brainrecon.train.evaluation.paper_metrics import PaperScorer, paper_table_rows

    weights = tmp_path / "w"
    weights.mkdir()
    alexnet = FEATURE_NETS["alexnet"].file
    (weights / alexnet).symlink_to(published["folder"] / alexnet)
    gt = _images(4, 64, seed=11)
    runs = {"same": gt.copy(), "reversed": gt[::-1].copy(), "other": _images(4, 64, seed=12)}
    scorer = PaperScorer(gt, weights)
    scored = {name: scorer.score(recon, name) for name, recon in runs.items()}
    for name, recon in runs.items():
        alone = paper_metrics(gt, recon, weights)
        assert scored[name].values == alone.values, name
    assert scored["same"].values["alexnet2"] == 1.0 and scored["same"].values["pixcorr"] > 0.999
    assert scorer.info()["computed"] == ["pixcorr", "ssim", "alexnet2", "alexnet5"]
    lines = paper_table_rows(list(scored.items()))
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| same", "| reversed", "| other"]
    assert lines[2].split(" | ")[3] == "100.0%" and any("SwAV" in line and "needs" in line for line in lines)


def test_bad_runs_and_stimuli_fail_in_one_line(tmp_path):
    """No folder, no reconstructions of the kind, a non-RGB PNG, two sizes in one folder, too few or non-uint8
    stimuli, an unknown metric name, a missing weights folder: each a one-line error naming the file or option."""
    gt = _images(3, 32, seed=6)

    def message(exc_type, fn, *args, **kwargs) -> str:
        with pytest.raises(exc_type) as err:
            fn(*args, **kwargs)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "reconstruction folder" in message(MissingFileError, read_recon_folder, tmp_path / "none")
    run = tmp_path / "run"
    run.mkdir()
    Image.fromarray(gt[0]).save(run / "stage1_00000.png")
    assert "final_NNNNN.png" in message(MissingFileError, read_recon_folder, run)
    Image.fromarray(gt[0]).convert("RGBA").save(run / "final_00000.png")
    assert "expected an RGB PNG, found mode RGBA" in message(InputError, read_recon_folder, run)
    Image.fromarray(gt[0]).save(run / "final_00000.png")
    Image.fromarray(_images(1, 48, seed=7)[0]).save(run / "final_00002.png")
    assert "final_00002.png" in message(InputError, read_recon_folder, run)
    (run / "final_00002.png").unlink()
    Image.fromarray(gt[1]).save(run / "final_00004.png")
    rows, _ = read_recon_folder(run)
    np.save(tmp_path / "stimuli.npy", gt)
    assert "up to 4" in message(InputError, read_stimuli, tmp_path / "stimuli.npy", rows)
    np.save(tmp_path / "float.npy", gt.astype(np.float32))
    assert "uint8" in message(InputError, read_stimuli, tmp_path / "float.npy", rows[:1])
    assert "--metrics" in message(InputError, paper_metrics, gt, gt, None, ["pixcorr", "alexnet"])
    assert "weights folder" in message(MissingFileError, paper_metrics, gt, gt, tmp_path / "no-weights")


def test_recon_eval_metrics_command(tmp_path, published):
    """`recon-eval metrics` on a recon-infer-style folder: the table, the JSON, and the files the absent metrics
    need; a corrupt weight file is a one-line error with exit 1 and no JSON written."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / FEATURE_NETS["alexnet"].file).symlink_to(published["folder"] / FEATURE_NETS["alexnet"].file)
    gt = _images(4, 64, seed=5)
    recon = tmp_path / "recon"
    recon.mkdir()
    for i in range(4):
        Image.fromarray(gt[(i + 1) % 4] // 2 + gt[i] // 2).save(recon / f"final_{i:05d}.png")
    np.save(tmp_path / "test_images.npy", gt)
    cmd = [
        Path(sys.executable).parent / "recon-eval",
        "metrics",
        "--recon",
        recon,
        "--stimuli",
        tmp_path / "test_images.npy",
        "--weights",
        weights,
        "--metrics",
        "pixcorr,alexnet2,alexnet5,swav",
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "COLUMNS": "200"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    saved = json.loads((recon / "paper_metrics.json").read_text())
    assert saved["n"] == 4 and saved["rows"] == [0, 1, 2, 3]
    assert saved["metrics"]["alexnet2"] is not None and saved["metrics"]["ssim"] is None
    assert set(saved["missing"]) == {"swav"}
    assert "needs swav_800ep_pretrain.pth.tar" in res.stdout and "AlexNet(5)" in res.stdout

    (weights / FEATURE_NETS["swav"].file).write_bytes(b"not a checkpoint")
    (recon / "paper_metrics.json").unlink()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "swav_800ep_pretrain.pth.tar" in last
    assert not (recon / "paper_metrics.json").exists()


# ----------------------------------------------------------------------------- against torchvision itself


def _torchvision():
    try:
        import torchvision.models as tvm
    except Exception as exc:  # the registries' CUDA build fails at import beside a CPU torch
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {str(exc)[:120]})")
    return tvm


@pytest.mark.slow
def test_same_state_dict_same_outputs_as_torchvision():
    """Where torchvision imports: its alexnet, inception_v3 (transform_input=True, aux_logits=True, as
    `pretrained=True` builds it), efficientnet_b1 and resnet50 have our key names in our order and shapes, and
    with the same state dict give the same eval outputs (max abs difference 1e-6: the same operators in the same
    order; seen bit-identical on CPU). Slow: ~16 s on 2 busy cores."""
    tvm = _torchvision()
    torch.manual_seed(0)
    pairs = [
        (tvm.alexnet(), AlexNet()),
        (tvm.inception_v3(aux_logits=True, transform_input=True, init_weights=False), InceptionV3()),
        (tvm.efficientnet_b1(), EfficientNetB1()),
        (tvm.resnet50(), ResNet50()),
    ]
    x = torch.randn(2, 3, 224, 224)
    for theirs, ours in pairs:
        state = _calibrate_bn(ours, 7).state_dict()
        assert [(k, v.shape) for k, v in state.items()] == [
            (k, v.shape) for k, v in theirs.state_dict().items()
        ]
        theirs.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=0, atol=1e-6)


def test_network_input_equals_torchvisions_transforms():
    """Where torchvision imports: our input path equals the script's `T.functional.resize(img, (224, 224))`,
    `to_tensor(...).float()` and `Normalize` on PIL images, bit for bit (seen so with torchvision 0.29.1)."""
    _torchvision()
    import torchvision.transforms as T

    from brainrecon.train.evaluation.paper_metrics import (
        CLIP_MEAN,
        CLIP_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        network_input,
    )

    for images in (_images(2, 425, seed=0), _images(2, 512, seed=1)):
        for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)):
            normalize = T.Normalize(mean=list(mean), std=list(std))
            expected = torch.stack(
                [
                    normalize(
                        T.functional.to_tensor(T.functional.resize(Image.fromarray(im), (224, 224))).float()
                    )
                    for im in images
                ]
            )
            assert torch.equal(network_input(images, mean, std), expected)
