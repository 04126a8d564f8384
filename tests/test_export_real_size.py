"""Real size (benchmarks/real_size.py): the fp16 fallback on a tiny overflowing graph and the export routine's step
hook (fast), and the real-size models built, exported and validated through the command's own steps (slow: `pytest -m
slow`, minutes and GBs each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def load_real_size():
    from brainrecon.benchmarks import real_size

    return real_size


class Overflowing(torch.nn.Module):
    """A toy 'VAE decoder' (B, 8) -> (B, 8) whose last up block overflows fp16 inside (activations ~1e6 > 65504; scope names: /up_blocks.3/...)
    and scales back down before the output layer: what SD-family VAE decoders do with real weights."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Module()
        blocks = [torch.nn.Linear(8, 8) for _ in range(3)]
        blocks.append(torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3))))
        self.decoder.up_blocks = torch.nn.ModuleList(blocks)
        self.decoder.conv_out = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.decoder.up_blocks[3][0].weight.mul_(1e6)
            self.decoder.up_blocks[3][1].weight.mul_(1e-3)  # 1e-6 at once would be subnormal in fp16
            self.decoder.up_blocks[3][2].weight.mul_(1e-3)

    def forward(self, latents):
        x = latents  # (B, 8)
        for block in self.decoder.up_blocks:
            x = block(x)
        return self.decoder.conv_out(x)  # (B, 8)


def toy_contract():
    from brainrecon.export.contracts import ExportContract, ShapeProfile, TensorSpec, Tolerance

    return ExportContract(
        name="vae_decoder",  # the name FP16_FALLBACKS is keyed by
        inputs=(TensorSpec("latents", ("batch", 8)),),
        outputs=(TensorSpec("images", ("batch", 8)),),
        profile=ShapeProfile(),
        exporter="torchscript",
        opset=17,
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=1e-2),  # 8-wide layers: rounding barely averages
        why="toy",
        draws=(("latents", "latents"),),
    )


def test_fp16_overflow_is_found_from_fp32_ranges_and_kept_fp32(tmp_path):
    """ORT's CPU provider computes these fp16 Gemms in fp32 (the plain conversion passes parity on the CPU), so the
    overflow a GPU would hit is found from the fp32 graph's activation ranges and those nodes stay fp32."""
    import onnx

    from brainrecon.export.fp16 import FP16_MAX, activation_peaks, convert_to_fp16
    from brainrecon.export.onnx_export import export_fp16, export_torchscript, torch_reference
    from brainrecon.export.validate import validate_onnx

    torch.manual_seed(0)
    module = Overflowing().eval()
    contract = toy_contract()
    fp32 = tmp_path / "toy.fp32.onnx"
    export_torchscript(module, contract, fp32, external_threshold=2**31)
    reference = torch_reference(module, contract)
    feeds = [contract.sample_input(2, "random", seed=0)]
    peaks = activation_peaks(fp32, feeds)
    assert max(peaks.values()) > FP16_MAX  # the fp32 graph leaves fp16's range
    assert not list(tmp_path.glob(".*peaks*"))  # the probe file is removed

    def check(path):
        return validate_onnx(contract, path, reference, "fp16", batches=(1, 2))

    _, info = export_fp16(
        contract, fp32, tmp_path / "toy.fp16.onnx", external=False, check=check, feeds=feeds
    )
    assert info["activation_peak"] > FP16_MAX and info["fp32_prefixes"] == []
    assert info["fp32_overflow_nodes"] and all("up_blocks.3" in n for n in info["fp32_overflow_nodes"])
    graph = onnx.load(str(tmp_path / "toy.fp16.onnx")).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    kept = [n for n in graph.node if n.name in info["fp32_overflow_nodes"] and n.op_type == "Gemm"]
    assert len(kept) == 2  # both Linears of the overflowing block
    assert all(weights[n.input[1]] == onnx.TensorProto.FLOAT for n in kept)
    other = [n for n in graph.node if n.op_type == "Gemm" and n not in kept and "conv_out" not in n.name]
    assert other and all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in other)

    # the plain conversion would store those activations in fp16 (inf on a GPU); ORT's CPU provider computes the
    # fp16 Gemms in fp32 and returns finite values: a CPU-only parity check cannot see this overflow
    from brainrecon.export.validate import ort_session

    plain = tmp_path / "plain.fp16.onnx"
    onnx.save(convert_to_fp16(fp32), str(plain))
    assert np.isfinite(ort_session(plain).run(None, feeds[0])[0]).all()


def test_fp16_fallback_retries_with_prefixes_after_a_parity_error(tmp_path, monkeypatch):
    from brainrecon.export import fp16
    from brainrecon.export.onnx_export import export_fp16, export_torchscript
    from brainrecon.export.validate import ParityError

    torch.manual_seed(0)
    contract = toy_contract()
    fp32 = tmp_path / "toy.fp32.onnx"
    export_torchscript(Overflowing().eval(), contract, fp32, external_threshold=2**31)
    seen = []

    def check(path):  # a parity failure unless the up block is fp32 (as a GPU would fail)
        graph = onnx_graph(path)
        ok = any(
            n.name.startswith("/up_blocks.3/") and n.op_type == "Gemm" and is_fp32(graph, n)
            for n in graph.node
        )
        seen.append(ok)
        if not ok:
            stats = dict.fromkeys(("max_abs", "max_abs_kept", "median_abs", "scale"), float("inf"))
            raise ParityError("vae_decoder", "fp16", 1, "images", "random", stats, "test")
        return {"max_abs": 0.0}

    monkeypatch.setitem(fp16.FP16_FALLBACKS, "vae_decoder", (("/up_blocks.3/",), ("/",)))
    with pytest.warns(UserWarning, match="more layers kept fp32"):
        _, info = export_fp16(contract, fp32, tmp_path / "toy.fp16.onnx", external=False, check=check)
    assert info["fp32_prefixes"] == ["/up_blocks.3/"] and seen == [False, True]
    assert info["fallbacks_tried"][0]["fp32_prefixes"] == [] and "inf" in info["fallbacks_tried"][0]["error"]

    monkeypatch.setitem(fp16.FP16_FALLBACKS, "vae_decoder", ())
    with pytest.raises(ParityError):
        export_fp16(contract, fp32, tmp_path / "plain.fp16.onnx", external=False, check=check)


def test_export_routine_reports_each_step_to_its_hook(tmp_path):
    """stage_contract's `on_step` (what benchmarks/real_size.py times and measures memory with): the fp32 file
    written, then validated; the fp16 file converted (checked and validated inside the conversion, torchscript)."""
    from brainrecon.export.onnx_export import ExportSource, stage_contract, torch_reference

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8)).eval()
    contract = toy_contract()
    source = ExportSource(contract, torch_reference(module, contract), module=module)
    steps = []
    staged = stage_contract(source, tmp_path, ("fp32", "fp16"), True, 2**31, lambda *step: steps.append(step))
    assert steps == [("export", "fp32"), ("validate", "fp32"), ("export", "fp16")]
    assert [f.precision for f in staged] == ["fp32", "fp16"] and all(f.validation for f in staged)


def onnx_graph(path):
    import onnx

    return onnx.load(str(path)).graph


def is_fp32(graph, node) -> bool:
    import onnx

    weights = {t.name: t.data_type for t in graph.initializer}
    return weights.get(node.input[1]) == onnx.TensorProto.FLOAT


def test_make_distinct_leaves_no_constant_tensor():
    rs = load_real_size()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    torch.nn.init.zeros_(module[2].weight)
    before = [p.detach().clone() for p in module.parameters()]
    rs.make_distinct(module, seed=1)
    for b, p in zip(before, module.parameters(), strict=True):
        assert float(p.detach().std()) > 0  # zeros, ones and biases all perturbed
        if float(b.std()) > 0:
            assert torch.equal(b, p)  # random tensors untouched unless relative > 0


def test_model_dir_assembles_the_kept_files_with_a_verified_manifest(tmp_path):
    """`--model-dir`: the kept files of the folder's models linked under onnx/ with their names (an .onnx names its
    .data), the data files the runtime reads, scheduler.json from the sampling, and a manifest that verifies. The
    files here are stand-ins (the folder's layout and hashes are what is checked; recon-infer on the real files is
    the docs' two-stage run)."""
    from brainrecon import model_dir as layout
    from brainrecon.manifest import verify_manifest

    rs, work = load_real_size(), tmp_path / "work"
    for name in rs.FOLDER_MODELS:
        (work / name).mkdir(parents=True)
        for precision in ("fp32", "fp16"):
            path = work / name / f"{rs.contract(name).name}.{precision}.onnx"
            path.write_bytes(f"{name} {precision}".encode())
            if name == "unet":
                path.with_name(path.name + ".data").write_bytes(b"weights")
    out = rs.assemble_model_dir(work, tmp_path / "model")
    manifest = verify_manifest(out)
    onnx = {a.path for a in manifest.artifacts if a.kind == "onnx"}
    assert onnx == {
        f"onnx/{rs.contract(n).name}.{p}.onnx" for n in rs.FOLDER_MODELS for p in ("fp32", "fp16")
    }
    assert {a.path for a in manifest.artifacts if a.kind == "onnx_data"} == {
        f"onnx/unet.{p}.onnx.data" for p in ("fp32", "fp16")
    }
    for rel in (*layout.PREPROCESS_FILES, *layout.STAGE1_FILES, *layout.STAGE2_FILES, layout.SCHEDULER):
        assert (out / rel).is_file(), rel
    assert np.load(out / layout.uncond_context("vision")).shape == (1, 257, 768)


@pytest.mark.slow
@pytest.mark.parametrize("num_layers", [31])
def test_imagenet64_decoder_exports_with_parity(tmp_path, num_layers):
    from brainrecon.export.contracts import vdvae_decoder_contract
    from brainrecon.export.onnx_export import check_onnx, export_torchscript, torch_reference
    from brainrecon.export.validate import validate_onnx
    from brainrecon.train.foundations.vdvae import VDVAE, VDVAEDecoder, latent_dims, vdvae_config

    torch.manual_seed(0)
    config = vdvae_config("imagenet64")
    decoder = VDVAEDecoder(VDVAE(config).eval(), num_layers).eval()
    assert decoder.latent_dims == latent_dims(config, num_layers) == 91168
    contract = vdvae_decoder_contract(decoder.latent_dims, config.image_size)
    path = tmp_path / "vdvae_decoder.fp32.onnx"
    export_torchscript(decoder, contract, path, external_threshold=2**31 - 2**27)
    check_onnx(path)
    report = validate_onnx(contract, path, torch_reference(decoder, contract), "fp32", batches=(1, 2))
    assert report["max_abs_kept"] <= 0.05  # the contract's fp32 bound (validate_onnx raises beyond it)


@pytest.mark.slow
def test_real_size_gru_exports_with_parity(tmp_path):
    """The seed paper's mapper at NSD size: 15,724 voxels -> 13,344 latents, 12,400,344 parameters."""
    from brainrecon.export.contracts import gru_contract
    from brainrecon.export.onnx_export import check_onnx, export_torchscript, torch_reference
    from brainrecon.export.validate import check_gru_linear_before_reset, validate_onnx
    from brainrecon.train.stage1.gru import GRUMapper, GRUMapperConfig, count_parameters

    torch.manual_seed(0)
    model = GRUMapper(GRUMapperConfig(n_voxels=15724, n_outputs=13344)).eval()
    assert count_parameters(model) == 12_400_344
    contract = gru_contract(15724, 13344)
    path = tmp_path / "gru.fp32.onnx"
    export_torchscript(model, contract, path, external_threshold=2**31 - 2**27)
    check_onnx(path)
    import onnx

    check_gru_linear_before_reset(onnx.load(str(path)), "gru")
    report = validate_onnx(contract, path, torch_reference(model, contract), "fp32", batches=(1, 3))
    assert report["max_abs"] <= 1e-5 + 1e-4 * 10  # well inside the contract's fp32 bound


@pytest.mark.slow
def test_vd_unet_has_the_real_parameter_count_and_distinct_text_blocks():
    """1,126,760,324 parameters (SD 1.x image UNet + VD text blocks); no text block equals its image block."""
    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

    rs = load_real_size()
    source, parameters = rs.source("unet")
    assert parameters == 1_126_760_324
    unet = source.module.unet
    blocks = [m for m in unet.modules() if isinstance(m, DualTransformer2DModel)]
    assert len(blocks) == 16
    for block in blocks:
        image, text = (dict(t.named_parameters()) for t in block.transformers)
        assert image.keys() == text.keys()
        assert not any(torch.equal(image[k], text[k]) for k in image)


@pytest.mark.slow
def test_real_size_command_measures_the_clip_regressor(tmp_path):
    """The command's steps end to end on the CLIP-text ridge (rank 256, 77 x 768): export, fp16, parity, load,
    latency, memory and file sizes in the results file, per step of the export routine."""
    rs = load_real_size()
    out, work = tmp_path / "real_size.json", tmp_path / "work"
    assert rs.main(["--out", str(out), "--only", "clip_text", "--work", str(work)]) == 0
    results = json.loads(out.read_text())
    assert results["machine"]["cores"] and results["machine"]["date"]
    entry = results["models"]["clip_text"]
    assert entry["parameters"] == 15724 * 256 + 256 * 77 * 768 + 77 * 768
    for precision, bound in (("fp32", 1e-5), ("fp16", 2e-3)):
        r = entry[precision]
        assert "error" not in r, r
        assert r["validation"]["max_abs"] <= bound * r["validation"].get("scale", 1) + 1e-6 or r["validation"]
        assert r["file_bytes"] > entry["parameters"] * (4 if precision == "fp32" else 2) * 0.99
        # the builder's steps: the file written, then checked and validated, each with its time and peak
        assert (
            r["export_s"] > 0
            and r["export_peak_gb"] > 0
            and r["validate_s"] > 0
            and r["validate_peak_gb"] > 0
        )
        assert r["load_peak_gb"] > 0
        assert r["latency"]["1"]["median_s"] > 0 and r["latency"]["2"]["median_s"] > 0
    assert entry["fp32"]["reference_s"] > 0  # the numpy reference, computed once for both precisions
    assert not (work / "clip_text").exists()  # removed without --keep
    assert np.isfinite(entry["wall_s"])


@pytest.mark.slow
def test_real_size_steps_load_retimes_kept_files_and_keeps_the_rest(tmp_path):
    """`--keep` then `--steps load`: the latency and load figures are measured again on the kept files, the export
    and parity figures of the first run stay, and the files stay; --table renders the result."""
    rs = load_real_size()
    out, work = tmp_path / "real_size.json", tmp_path / "work"
    base = ["--out", str(out), "--only", "gru", "--work", str(work)]
    assert rs.main([*base, "--keep"]) == 0
    first = json.loads(out.read_text())["models"]["gru"]
    assert first["fp16"]["validation"]["fp16_fp32_prefixes"] == []  # the fp16 conversion's record
    assert rs.main([*base, "--steps", "load"]) == 0
    again = json.loads(out.read_text())["models"]["gru"]
    assert again["rerun"]["steps"] == ["load"] and again["wall_s"] == first["wall_s"]
    for precision in ("fp32", "fp16"):
        assert again[precision]["validation"] == first[precision]["validation"]
        assert again[precision]["export_s"] == first[precision]["export_s"]
        assert again[precision]["latency"]["1"]["median_s"] > 0
        assert (work / "gru" / f"gru.{precision}.onnx").is_file()
    with pytest.raises(SystemExit):
        rs.main([*base, "--steps", "load,fit"])
    table = rs.markdown_table(json.loads(out.read_text())).splitlines()
    assert len(table) == 4 and table[2].startswith("| gru | fp32 | 12,400,344 | 50 MB |")


@pytest.mark.slow
def test_real_size_curve_times_every_pipeline_and_compares_with_torch(tmp_path):
    """`--curve` on the real-size GRU (the UNet's command, minutes less): every pipeline at every batch, rows/s,
    peak memory, speedups over torch eager, output errors against it, and the plot; the timing step also runs on
    given inputs (what --kv-step feeds it)."""
    rs = load_real_size()
    work, out = tmp_path / "work", tmp_path / "curve.json"
    assert rs.main(["--out", str(tmp_path / "rs.json"), "--only", "gru", "--work", str(work), "--keep"]) == 0
    pipelines = "torch,torch_bf16,ort_fp32,openvino_bf16"
    args = ["--curve", "1,3", "--model", "gru", "--pipelines", pipelines, "--repeats", "2", "--threads", "1"]
    assert rs.main([*args, "--work", str(work), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["pipelines"]) == pipelines.split(",")
    for name, r in result["pipelines"].items():
        assert sorted(r["batches"]) == ["1", "3"], (name, r)
        assert r["peak_gb"] > 0.05
        for b in r["batches"].values():
            assert 0 < b["p50_s"] <= b["p95_s"] and b["speedup_vs_torch"] > 0
    err = result["error_vs_torch_fp32"]
    assert err["torch"]["max_over_scale"] == 0 and err["ort_fp32"]["max_over_scale"] < 1e-5
    assert 0 < err["torch_bf16"]["max_over_scale"] < 0.1 and 0 < err["openvino_bf16"]["max_over_scale"] < 0.1
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # torch is the reference
        rs.main(["--curve", "1", "--pipelines", "ort_fp32", "--work", str(work), "--out", str(out)])
    inputs = tmp_path / "x.npz"
    np.savez(inputs, betas=np.ones((2, 15724), np.float32))
    step = ["--step", "time", "--pipeline", "ort_fp32", "--model", "gru", "--batches", "2", "--repeats", "1"]
    assert rs.main([*step, "--work", str(work), "--inputs", str(inputs)]) == 0
    assert np.load(work / "curve_gru_ort_fp32.npy").shape == (2, 13344)
