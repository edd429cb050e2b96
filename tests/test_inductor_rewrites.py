"""The UNet rewrites that `--compile` applies compute what diffusers' modules compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import STAGE2_DIR
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from illusions.inductor_rewrites import (
    ERFC_FIT_END,
    ChannelPaddedConv2d,
    ChannelsLastUpsample2D,
    ChannelStatsGroupNorm,
    ErfcFitGELU,
    apply_inductor_rewrites,
    channel_stats_group_norm,
    channel_var_mean,
    erfc_fit_gelu,
)
from illusions.models import load_unet_stage


def _inputs(shape: tuple[int, ...], offset: float, seed: int) -> torch.Tensor:
    """Random activations whose channels sit far from zero (mean ≫ spread), which a group
    variance computed as E[x²] - E[x]² would lose to cancellation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(1, shape[1], *([1] * (len(shape) - 2)), generator=g) * offset
    return torch.randn(*shape, generator=g) * 0.5 + means


@pytest.mark.parametrize("shape,groups", [((3, 64, 17, 9), 32), ((2, 12, 40), 3),
                                          ((1, 8, 4, 5, 6), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_channel_stats_group_norm_matches_group_norm_in_float64(shape, groups, affine):
    x = _inputs(shape, offset=300.0, seed=len(shape) + groups).double()
    weight = torch.randn(shape[1], dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], dtype=torch.float64) if affine else None
    expected = F.group_norm(x, groups, weight, bias, 1e-5)
    got = channel_stats_group_norm(x.float(), groups, None if weight is None else weight.float(),
                                   None if bias is None else bias.float(), 1e-5)
    assert got.dtype == torch.float32
    # Statistics in fp32 over channels offset by hundreds: still a few fp32 ulps of the inputs.
    assert (got.double() - expected).abs().max().item() < 2e-3
    ours = (got.double() - expected).norm() / expected.norm()
    fp32 = [None if t is None else t.float() for t in (weight, bias)]
    theirs = (F.group_norm(x.float(), groups, *fp32, 1e-5).double() - expected).norm() \
        / expected.norm()
    assert ours < max(4 * theirs, 1e-6)  # as close as PyTorch's own fp32 group norm, roughly


def test_channel_stats_group_norm_in_fp16_and_channels_last_rounds_like_group_norm():
    x = _inputs((2, 64, 16, 16), offset=3.0, seed=1).half()
    weight, bias = torch.randn(64).half(), torch.randn(64).half()
    expected = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = channel_stats_group_norm(x.contiguous(memory_format=layout), 32, weight, bias, 1e-6)
        assert got.dtype == torch.float16
        # fp16 output: within one rounding of fp16 at the outputs' magnitude.
        tol = expected.abs().max().item() * 2**-10
        assert (got.double() - expected).abs().max().item() <= tol


def test_channel_var_mean_is_fp32_exact_far_from_zero_and_never_negative():
    """One pass of shifted sums: channels offset by hundreds keep an fp32-accurate variance; a
    constant channel has variance 0 (not a negative rounding, whose rsqrt would be NaN); a channel
    whose first row is far from the rest still has its variance within fp32 rounding."""
    x = _inputs((3, 16, 24, 20), offset=500.0, seed=7)
    x[0, 0] = 3.0  # constant
    x[1, 1] = 2.0
    x[1, 1, 0] = 1e4  # first row far from the rest
    var, mean = channel_var_mean(x.contiguous(memory_format=torch.channels_last))
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    assert var.dtype == mean.dtype == torch.float32 and var.shape == mean.shape == (3, 16)
    assert var[0, 0].item() == 0.0 and mean[0, 0].item() == 3.0
    assert (var >= 0).all()
    assert torch.allclose(mean.double(), expected_mean, rtol=1e-6, atol=0)
    assert torch.allclose(var.double(), expected_var, rtol=1e-4, atol=0)
    # the same sums without the shift lose the offset channels' variance to cancellation in fp32:
    naive = x.square().mean((2, 3)) - x.mean((2, 3)).square()
    assert not torch.allclose(naive.double(), expected_var, rtol=1e-2)


def test_channel_stats_group_norm_names_a_bad_group_count():
    with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
        channel_stats_group_norm(torch.randn(1, 10, 4, 4), 4, None, None, 1e-5)


def _unet_call(stage, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    unet = stage.unet
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    emb = torch.randn(2, 77, int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim),
                      generator=g)
    args = (x, torch.tensor([500, 20]), emb, torch.tensor([50, 10]))
    return stage.predict(*args), args


def test_rewrites_keep_the_unet_and_its_output_and_undo_exactly():
    stage = load_unet_stage(str(STAGE2_DIR), 2)
    before, args = _unet_call(stage)
    state = {k: v.clone() for k, v in stage.unet.state_dict().items()}
    counts = apply_inductor_rewrites(stage.unet)
    group_norms = [m for m in stage.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert counts["group_norms"] == len(group_norms) > 0
    assert all(type(m) is ChannelStatsGroupNorm for m in group_norms)
    assert counts["resnet_blocks"] > 0
    after_state = stage.unet.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    rewritten = stage.predict(*args)
    assert not torch.equal(rewritten, before)  # another computation, ...
    assert torch.allclose(rewritten, before, rtol=0, atol=5e-5)  # ... the same function
    gelus = [m for m in stage.unet.modules() if isinstance(m, nn.GELU)]
    assert counts["gelus"] == len(gelus) > 0
    assert all(type(m) is ErfcFitGELU for m in gelus)
    thin = [m for m in stage.unet.modules()
            if isinstance(m, nn.Conv2d) and (m.in_channels % 8 or m.out_channels % 8)]
    assert counts["padded_convs"] == len(thin) > 0
    assert all(type(m) is ChannelPaddedConv2d for m in thin)
    assert stage.unet.conv_in in thin and stage.unet.conv_out in thin  # 6 channels in, 6 out
    assert counts["upsamplers"] > 0  # the up blocks' last resnets
    assert apply_inductor_rewrites(stage.unet) == dict.fromkeys(counts, 0)
    assert apply_inductor_rewrites(stage.unet, enabled=False) == counts
    assert all(type(m) is nn.GroupNorm for m in group_norms)
    assert all(type(m) is nn.GELU for m in gelus)
    assert all(type(m) is nn.Conv2d for m in thin)
    assert torch.equal(stage.predict(*args), before)


def test_compiled_rewrites_pin_layouts_for_inductor_and_keep_the_output():
    """Under torch.compile the rewritten UNet hands inductor its layout pins (the scale/shift
    buffers of every group norm, each resnet block's input and output) and computes the same."""
    stage = load_unet_stage(str(STAGE2_DIR), 2)
    eager, args = _unet_call(stage, seed=3)
    pins: list[int] = []
    targets: set[object] = set()

    var_means: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        var_means.append(sum(node.target is torch.var_mean for node in gm.graph.nodes))
        pins.append(sum(node.target is torch.ops.prims.inductor_force_stride_order.default
                        or node.target is torch.ops.prims.inductor_force_stride_order
                        for node in gm.graph.nodes))
        targets.update(node.target for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    try:
        stage.compile(backend=backend)
        compiled = stage.predict(*args)
    finally:
        torch._dynamo.reset()
    counts = apply_inductor_rewrites(stage.unet, enabled=False)  # already rewritten: undo counts
    assert counts["group_norms"] > 0
    # a resnet that upsamples does so to its input and to its hidden states: two pins each
    assert sum(pins) == 2 * (counts["group_norms"] + counts["resnet_blocks"] + counts["upsamplers"])
    assert var_means == [0]  # statistics from sums: no Welford reductions
    assert counts["gelus"] > 0 and torch.exp2 in targets  # the fitted GELU was traced, ...
    assert not targets & {F.gelu, torch._C._nn.gelu}  # ... and no erf GELU is left
    assert counts["padded_convs"] > 0 and targets & {F.pad, torch._C._nn.pad}
    assert torch.allclose(compiled, eager, rtol=0, atol=5e-5)


def test_upsampling_resnet_of_64_rows_compiles_its_convolutions_channels_last():
    """diffusers makes an upsampling resnet's tensors NCHW from 64 rows on (an eager CUDA kernel's
    limit), so inductor ran its convolutions in NCHW; rewritten, every convolution's input is
    channels-last, and the block computes the same."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=8, temb_channels=None, groups=4,
                          up=True).eval()
    x = torch.randn(64, 16, 4, 4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = block(x, None)
    layouts: dict[bool, list[bool]] = {}
    for rewritten in (False, True):
        counts = apply_inductor_rewrites(block, enabled=rewritten)
        if rewritten:
            assert counts["upsamplers"] == 1 and type(block.upsample) is ChannelsLastUpsample2D
        seen = layouts.setdefault(rewritten, [])

        def backend(gm: torch.fx.GraphModule, example_inputs: list, seen: list = seen) -> object:
            seen.extend(node.args[0].meta["example_value"].is_contiguous(
                memory_format=torch.channels_last) for node in gm.graph.nodes
                if node.target in (torch.conv2d, F.conv2d))
            return gm.forward

        torch._dynamo.reset()
        try:
            with torch.no_grad():
                out = torch.compile(block, backend=backend)(x, None)
        finally:
            torch._dynamo.reset()
        assert torch.allclose(out, eager, rtol=0, atol=1e-5)
    assert layouts[False] == [False] * 3  # conv1, conv2 and the shortcut: NCHW, as diffusers has it
    assert layouts[True] == [True] * 3


def test_channels_last_upsampler_leaves_upsamplers_with_a_convolution():
    assert ChannelsLastUpsample2D.wants(Upsample2D(8, use_conv=False))
    assert not ChannelsLastUpsample2D.wants(Upsample2D(8, use_conv=True))
    assert not ChannelsLastUpsample2D.wants(Upsample2D(8, use_conv_transpose=True))


def _exact_gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * 0.5 * torch.special.erfc(-x / 2**0.5)


def test_erfc_fit_gelu_is_within_1e_6_of_float64_gelu_everywhere():
    x = torch.cat([torch.linspace(-40, 40, 400_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    got = erfc_fit_gelu(x)
    assert got.dtype == torch.float32
    exact = _exact_gelu(x)
    assert (got.double() - exact).abs().max().item() < 1e-6
    # Where PyTorch's 1 + erf(x / √2) cancels, the fit keeps its relative accuracy.
    tail = (x < -2) & (x > -ERFC_FIT_END * 2**0.5)
    rel = ((got.double() - exact) / exact)[tail].abs().max().item()
    assert rel < 2e-5
    assert rel < ((F.gelu(x).double() - exact) / exact)[tail].abs().max().item()
    # Beyond the fit Φ is 0 or 1 to far below fp16 precision.
    assert torch.equal(erfc_fit_gelu(torch.tensor([10.0, 300.0])), torch.tensor([10.0, 300.0]))
    assert erfc_fit_gelu(torch.tensor([-300.0, -10.0])).abs().max().item() < 1e-7


def test_erfc_fit_gelu_in_fp16_rounds_correctly_more_often_than_pytorchs_gelu():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1_000_000, generator=g) * 3).half()
    correct = _exact_gelu(x).half()
    ours = erfc_fit_gelu(x)
    assert ours.dtype == torch.float16
    wrong = (ours != correct).float().mean().item()
    pytorch_wrong = (F.gelu(x.float()).half() != correct).float().mean().item()
    assert wrong < 1e-3 and wrong < pytorch_wrong / 10
    # Every fp16 result is one of the two fp16 values around the exact one.
    exact = _exact_gelu(x)
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp(min=2**-14)
    assert ((ours.double() - exact).abs() <= ulp).all()


def test_fitted_gelu_module_is_pytorchs_outside_compiling_and_for_tanh():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    module = nn.GELU()
    module.__class__ = ErfcFitGELU
    assert torch.equal(module(x), F.gelu(x))
    tanh = ErfcFitGELU(approximate="tanh")
    assert torch.equal(torch.compile(tanh, backend="eager")(x), F.gelu(x, approximate="tanh"))
    compiled = torch.compile(module, backend="eager")(x)
    assert not torch.equal(compiled, F.gelu(x))
    assert torch.equal(compiled, erfc_fit_gelu(x))


@pytest.mark.parametrize("channels,outputs,stride,bias",
                         [(6, 16, 1, True), (3, 16, 2, True), (13, 5, 1, True), (16, 6, 1, True),
                          (16, 6, 2, False)])
def test_channel_padded_conv_pads_only_while_compiling_and_computes_the_same(channels, outputs,
                                                                              stride, bias):
    g = torch.Generator().manual_seed(channels + outputs)
    conv = nn.Conv2d(channels, outputs, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(2, channels, 9, 11, generator=g)
    expected = conv(x)
    assert ChannelPaddedConv2d.wants(conv)
    conv.__class__ = ChannelPaddedConv2d
    assert torch.equal(conv(x), expected)  # eager: the plain convolution
    shapes: list[tuple[int, ...]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        shapes.extend(tuple(node.meta["example_value"].shape) for node in gm.graph.nodes
                      if node.target in (F.pad, torch._C._nn.pad))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(conv, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    padded_in = -channels % 8 + channels
    padded_out = outputs if outputs % 8 == 0 else -outputs % 32 + outputs  # 5, 6 -> 32
    expected_pads = [(padded_out, padded_in, 3, 3)]  # the weight, padded in both at once
    expected_pads += [(2, padded_in, 9, 11)] if padded_in != channels else []
    expected_pads += [(padded_out,)] if padded_out != outputs and bias else []
    assert sorted(shapes) == sorted(expected_pads)
    assert compiled.shape == expected.shape  # the extra outputs dropped
    assert torch.allclose(compiled, expected, rtol=0, atol=1e-5)


def test_channel_padded_conv_leaves_wide_grouped_and_other_convs():
    assert not ChannelPaddedConv2d.wants(nn.Conv2d(16, 8, 3))
    assert not ChannelPaddedConv2d.wants(nn.Conv2d(6, 6, 3, groups=3))
    assert not ChannelPaddedConv2d.wants(nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"))
    assert not ChannelPaddedConv2d.wants(nn.Conv1d(6, 4, 3))
