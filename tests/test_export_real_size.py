"""The full-size imagenet64 VDVAE decoder (random weights) exports and matches torch: slow, run with -m slow."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


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
    report = validate_onnx(
        contract, path, torch_reference(decoder, "vdvae_latents", "images"), "fp32", batches=(1, 2)
    )
    assert report  # validate_onnx raises ParityError beyond the contract's fp32 tolerance


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
    assert validate_onnx(
        contract, path, torch_reference(model, "betas", "vdvae_latents"), "fp32", batches=(1, 3)
    )
