"""Model loading: local Hub layout, variants, quantization, random weights and clear errors."""

from __future__ import annotations

import logging

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


def _sample(stage, n_steps: int = 8):
    """Stage-1 sample with fixed embeddings and seed, 2 views."""
    from illusions.sampling import SamplingParams, sample_stage_1
    from illusions.views import build_views

    dim = int(stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    return sample_stage_1(stage, prompt, negative, build_views(["identity", "flip"]),
                          torch.Generator().manual_seed(1),
                          SamplingParams(num_inference_steps=n_steps, guidance_scale=3.0))


def test_int8_weights_quantize_convolutions_too():
    """optimum-quanto weights: every Linear *and* Conv2d layer holds int8 weights (most of a UNet
    is convolutions), on the CPU; the picture stays close to the full-precision one."""
    pytest.importorskip("optimum.quanto")
    full = load_unet_stage(str(STAGE1_DIR), 1)
    small = load_unet_stage(str(STAGE1_DIR), 1, quantize="int8")
    convs = [m for m in small.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in small.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert convs and linears
    assert all(type(m).__name__ == "QConv2d" for m in convs)
    assert all(type(m).__name__ == "QLinear" for m in linears)
    stored = {type(m.weight).__name__ for m in convs + linears}
    assert stored == {"WeightQBytesTensor"}
    assert all(m.weight._data.dtype == torch.int8 for m in convs + linears)
    a, b = _sample(full), _sample(small)
    diff = (a - b).abs().max().item()
    assert 0 < diff < 0.1, diff


def test_int8_stage_2_and_t5():
    pytest.importorskip("optimum.quanto")
    stage = load_unet_stage(str(STAGE2_DIR), 2, quantize="int8")
    assert all(type(m).__name__ == "QConv2d" for m in stage.unet.modules()
               if isinstance(m, torch.nn.Conv2d))
    full = TextEncoder.from_pretrained(str(STAGE1_DIR))
    small = TextEncoder.from_pretrained(str(STAGE1_DIR), quantize="int8")
    assert type(small.model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    a, _ = full.encode(["a duck in a pond"])
    b, _ = small.encode(["a duck in a pond"])
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()


def test_random_weights_in_int8():
    """Benchmarks at real sizes: random weights are built on the CPU and quantized there."""
    pytest.importorskip("optimum.quanto")
    stage = load_unet_stage(str(STAGE1_DIR), 1, random_weights=True, quantize="int8")
    assert type(stage.unet.conv_in).__name__ == "QConv2d"
    assert torch.isfinite(_sample(stage, n_steps=2)).all()


def test_unknown_quantize_names_the_choices():
    with pytest.raises(ValueError, match="int8"):
        load_unet_stage(str(STAGE1_DIR), 1, quantize="int4")


def test_random_weights_are_the_same_in_every_process():
    """Benchmarks compare a baseline, services and quantized variants: one model for all, and
    loading leaves the caller's RNG alone."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_unet_stage(str(STAGE1_DIR), 1, random_weights=True)
    after = torch.rand(3)
    b = load_unet_stage(str(STAGE1_DIR), 1, random_weights=True)
    assert torch.equal(after, expected)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_compiled_unet_is_what_sampling_runs(text_encoder):
    """``UNetStage.compile`` routes every UNet call through torch.compile (here with a backend
    that records the graphs dynamo hands it and runs them as traced): the sample is unchanged
    (bit for bit without the inductor rewrites, within float rounding with them). The rows are a
    symbol of the one graph, so another row count is not traced again."""
    from illusions.sampling import SamplingParams, new_generator, sample_stage_1
    from illusions.views import build_views

    traced: list[object] = []  # the rows of each traced graph's sample: an int, or a symbol

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        traced.append(next(v.shape[0] for v in values if torch.is_tensor(v) and v.ndim == 4))
        return gm.forward

    stage = load_unet_stage(str(STAGE1_DIR), 1)
    prompt, negative = text_encoder.encode(["a", "b"])
    views = build_views(["identity", "flip"])
    params = SamplingParams(num_inference_steps=2, guidance_scale=7.0)
    eager = sample_stage_1(stage, prompt, negative, views, new_generator(0), params)
    torch._dynamo.reset()
    stage.compile(backend=recording_backend, rewrites=False)
    compiled = sample_stage_1(stage, prompt, negative, views, new_generator(0), params)
    assert traced, "the UNet did not go through torch.compile"
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
    stage.compile(backend=recording_backend)  # rewrites on, as `serve --compile` runs
    rewritten = sample_stage_1(stage, prompt, negative, views, new_generator(0), params)
    assert torch.allclose(rewritten, eager, rtol=0, atol=1e-4)
    assert len(traced) == 2 and all(isinstance(rows, torch.SymInt) for rows in traced)
    sample_stage_1(stage, prompt[:1], negative, views[:1], new_generator(0), params)  # 2 rows
    assert len(traced) == 2
    torch._dynamo.reset()


def test_compile_asks_inductor_for_its_deterministic_mode(monkeypatch):
    """Compiled replicas give one picture for one seed only if every process compiles the same
    kernels: the default compile runs inductor's deterministic mode (no kernel chosen by timing)."""
    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    stage = load_unet_stage(str(STAGE1_DIR), 1)
    del calls[:]  # loading may compile helpers of its own
    stage.compile()
    stage.compile(mode="max-autotune")  # other modes carry their own options
    assert calls[0]["options"] == {"deterministic": True} and "mode" not in calls[0]
    assert calls[1]["mode"] == "max-autotune" and "options" not in calls[1]
    assert all(kw["dynamic"] is False for kw in calls)


def test_concurrent_tokenizing_gives_every_caller_its_own_ids(text_encoder):
    """A service's request threads tokenize at once; a fast tokenizer's padding and truncation
    settings are shared state, so each call must still get 77 ids of its own prompts."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [["a waterfall"], ["an old man with a very long beard " * 12, "a deer"],
               ["a teapot", "an owl", "a cat on a mat"], [""]]
    expected = [text_encoder._tokenize(p) for p in prompts]

    def tokenize(k: int) -> bool:
        ids, mask = text_encoder._tokenize(prompts[k % len(prompts)])
        want_ids, want_mask = expected[k % len(prompts)]
        return torch.equal(ids, want_ids) and torch.equal(mask, want_mask)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(tokenize, range(800)))
    assert all(ids.shape[-1] == 77 for ids, _ in expected)
    assert all(results), f"{results.count(False)} of {len(results)} calls got other ids"


def test_bitsandbytes_kernels_hint_is_dropped_and_its_other_lines_kept():
    """bitsandbytes warns at every import, on CPUs with AVX-512 BF16, that an optional CPU kernel
    needs `pip install kernels`; that one line is dropped, its other warnings are not."""
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(message: str) -> logging.LogRecord:
        return bnb.makeRecord(bnb.name, logging.WARNING, __file__, 1, message, (), None)

    assert not bnb.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: "
                                 "No module named 'kernels'. Please make sure you already `pip "
                                 "install kernels` and the kernels >= 0.11.1"))
    assert bnb.filter(record("some other bitsandbytes warning"))


def test_a_model_folder_without_the_needed_subfolder_says_which(tmp_path):
    """--encoder-model pointing at a folder without text_encoder/ (a UNet-only download, say)."""
    from illusions.models import load_text_encoder_parts

    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=f"{tmp_path} has no text_encoder/ folder for the T5 "
                                             "text encoder: pass a model directory in Hub layout"):
        load_text_encoder_parts(str(tmp_path))
