"""Model loading: local Hub layout, variants, quantization, random weights and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR

from illusions import models
from illusions.models import ModelLoadError, load_unet_stage
from illusions.text import TextEncoder


def test_fp16_variant_is_used_for_half_precision(tmp_path):
    stage = load_unet_stage(str(STAGE1_DIR), 1, dtype="float16")
    assert stage.unet.dtype == torch.float16
    assert models._choose_variant(str(STAGE1_DIR), "unet", torch.float16) == "fp16"
    assert models._choose_variant(str(STAGE1_DIR), "unet", torch.float32) is None
    # A directory with only fp16 files still loads in float32 (upcast).
    only_half = tmp_path / "m" / "unet"
    only_half.mkdir(parents=True)
    for f in (STAGE1_DIR / "unet").iterdir():
        if ".fp16." in f.name or f.suffix == ".json":
            (only_half / f.name).write_bytes(f.read_bytes())
    assert models._choose_variant(str(tmp_path / "m"), "unet", torch.float32) == "fp16"


def test_stage_checks_channels():
    with pytest.raises(ModelLoadError, match="IF-II model"):
        load_unet_stage(str(STAGE1_DIR), 2)
    stage = load_unet_stage(str(STAGE2_DIR), 2)
    assert stage.image_noising_scheduler is not None and stage.sample_size == 256


def test_random_weights_from_config_directory():
    stage = load_unet_stage(str(STAGE1_DIR), 1, random_weights=True)
    real = load_unet_stage(str(STAGE1_DIR), 1)
    n_random = sum(p.numel() for p in stage.unet.parameters())
    assert n_random == sum(p.numel() for p in real.unet.parameters())
    first = next(stage.unet.parameters())
    assert not torch.equal(first, next(real.unet.parameters()))


def test_missing_local_directory_is_one_sentence():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_unet_stage("./no/such/model", 1)


def test_uncached_hub_model_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_unet_stage("DeepFloyd/IF-I-M-v1.0", 1)
    message = str(info.value)
    assert "DeepFloyd/IF-I-M-v1.0" in message and "\n" not in message
    assert "cache" in message


def test_gated_repo_error_is_explained():
    from huggingface_hub.errors import GatedRepoError

    class FakeResponse:
        status_code = 401
        headers: dict = {}
        request = None

    try:
        try:
            raise GatedRepoError("401 Client Error: access to model is restricted",
                                 response=FakeResponse())
        except GatedRepoError as inner:
            raise OSError("You are trying to access a gated repo.") from inner
    except OSError as exc:
        error = models.explain_load_error("DeepFloyd/IF-I-M-v1.0", "stage-1 UNet", exc)
    text = str(error)
    assert "gated" in text and "accept its license" in text and "hf auth login" in text
    assert "https://huggingface.co/DeepFloyd/IF-I-M-v1.0" in text


def test_t5_in_8bit_runs_on_cpu():
    pytest.importorskip("bitsandbytes")
    full = TextEncoder.from_pretrained(str(STAGE1_DIR))
    quantized = TextEncoder.from_pretrained(str(STAGE1_DIR), quantize="8bit")
    layer = quantized.model.encoder.block[0].layer[0].SelfAttention.q
    assert type(layer).__name__ == "Linear8bitLt"
    a, _ = full.encode(["a duck in a pond"])
    b, _ = quantized.encode(["a duck in a pond"])
    assert b.shape == a.shape and torch.isfinite(b).all()
    # 8-bit weights: close to, but not the same as, the full-precision embeddings.
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()


def test_bad_dtype_and_device_names():
    with pytest.raises(ValueError, match="float16"):
        models.parse_dtype("float8")
    with pytest.raises(ValueError, match="cpu"):
        models.parse_device("tpu")


def test_unet_quantization_on_cpu_says_it_needs_a_gpu():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_unet_stage(str(STAGE1_DIR), 1, device="cpu", quantize="8bit")


def test_random_weights_can_be_quantized():
    """Benchmarks at real sizes in 8 bits: random weights are saved and reloaded through
    bitsandbytes (the UNet path needs a GPU; T5 runs on the CPU)."""
    pytest.importorskip("bitsandbytes")
    encoder = TextEncoder.from_pretrained(str(STAGE1_DIR), random_weights=True, quantize="8bit")
    layer = encoder.model.encoder.block[0].layer[0].SelfAttention.q
    assert type(layer).__name__ == "Linear8bitLt"
    prompt_embeds, negative = encoder.encode(["a duck"])
    assert prompt_embeds.shape == (1, 77, 32) and torch.isfinite(prompt_embeds).all()
