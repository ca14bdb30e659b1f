"""The conv stacks: same values and gradients as the plain layer sequence, fewer kept activations."""
import pytest
import torch
from torch import nn

from ddlp.nn.blocks import ConvBlock, ConvStack, LayerSpec, group_norm

PLAN = [LayerSpec("a", 3, 8, kernel=7), LayerSpec("b", 8, 8, upsample=True), LayerSpec("c", 8, 8),
        LayerSpec("d", 8, 8, stride=2), LayerSpec("e", 8, 4, kernel=1, norm=False, act=False, bias=True)]


def reference(stack: ConvStack, replicate: bool) -> nn.Sequential:
    """The same weights as plain modules: pad, conv, GroupNorm, ReLU, upsample."""
    layers = []
    for spec, block in zip(PLAN, stack):
        if replicate and spec.kernel > 1:
            layers.append(nn.ReplicationPad2d(spec.kernel // 2))
        layers.append(block.conv)
        if spec.norm:
            layers.append(block.norm)
        if spec.act:
            layers.append(nn.ReLU())
        if spec.upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def saved_tensors(fn):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


@pytest.mark.parametrize("replicate", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_stack_matches_the_plain_layers_in_values_and_gradients(replicate, channels_last):
    torch.manual_seed(0)
    stack = ConvStack(*[ConvBlock(s, replicate) for s in PLAN])
    for m in stack.modules():   # non-trivial norm parameters
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stack = stack.to(memory_format=fmt)
    x = torch.randn(2, 3, 12, 12).to(memory_format=fmt).requires_grad_()
    y = stack(x)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *stack.parameters()])
    ref = reference(stack, replicate)
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum(), [x, *stack.parameters()])
    assert y.shape == (2, 4, 12, 12)
    # with replicate padding, "b"'s upsample folds into "c"'s conv: the same sums in another
    # order, so float32 rounding (outputs ~0.5) and nothing more; otherwise the same kernels
    tol = 2e-6 if replicate else 0
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        scale = float(g_ref.abs().max()) if replicate else 1.0     # folded: gradients up to ~100
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=5e-6 * scale)


@pytest.mark.parametrize("bias", [False, True])
def test_a_folded_upsample_is_the_conv_of_the_upsampled_image(bias):
    torch.manual_seed(0)
    block = ConvBlock(LayerSpec("c", 5, 8, bias=bias))
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)      # odd, non-square: every border case
    block = block.double()
    up = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    want = block.conv(nn.functional.pad(up, (1,) * 4, mode="replicate"))
    block.norm, block.act = None, False
    got = block(x, upsampled=True)
    assert got.shape == want.shape == (2, 8, 14, 18)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_stacks_fold_only_upsamples_that_feed_a_replicate_padded_3x3_conv():
    assert ConvBlock(LayerSpec("c", 8, 8)).folds_upsample
    assert not ConvBlock(LayerSpec("c", 8, 8), replicate_pad=False).folds_upsample
    assert not ConvBlock(LayerSpec("c", 8, 8, kernel=1)).folds_upsample
    assert not ConvBlock(LayerSpec("c", 8, 8, stride=2)).folds_upsample
    stack = ConvStack(*[ConvBlock(s) for s in PLAN])
    built = []
    hook = lambda m, i, o: built.append(tuple(i[0].shape[-2:]))   # noqa: E731
    handles = [b.conv.register_forward_hook(hook) for b in stack]
    stack(torch.randn(1, 3, 12, 12))
    for h in handles:
        h.remove()
    # "c" folds "b"'s upsample: its own conv never runs on the 24 x 24 upsampled image (the folded
    # conv is a functional call on the padded 14 x 14 input, not the hooked module)
    assert built == [(18, 18), (14, 14), (26, 26), (12, 12)]


def distinct_activations(kept, like):
    return len({t.untyped_storage().data_ptr() for t in kept if t.numel() >= like.numel()})


def test_conv_stack_keeps_one_activation_per_relu_and_pad():
    torch.manual_seed(0)
    stack = ConvStack(*[ConvBlock(LayerSpec(n, 8, 8)) for n in "abc"])
    plain = nn.Sequential(*[m for b in stack for m in (nn.ReplicationPad2d(1), b.conv, b.norm, nn.ReLU())])
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    _, kept = saved_tensors(lambda: stack(x))
    _, kept_plain = saved_tensors(lambda: plain(x))
    # plain: the input, then per block the padded input, the conv output and the ReLU output.
    # The stack keeps no pad input and no ReLU output that the next conv's padded input implies.
    assert distinct_activations(kept_plain, x) == 10
    assert distinct_activations(kept, x) == 7


def test_conv_stack_under_bf16_autocast_keeps_bf16_activations():
    stack = ConvStack(*[ConvBlock(s) for s in PLAN])
    x = torch.rand(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, kept = saved_tensors(lambda: stack(x.requires_grad_()))
    activations = [t for t in kept if t.dim() == 4 and t.shape[0] == 2 and t.shape[1] == 8]
    assert y.dtype == torch.bfloat16
    assert activations and all(t.dtype == torch.bfloat16 for t in activations)


def norm_case(shape, dtype, groups=4, seed=0):
    """A GroupNorm with non-trivial affine parameters and a channels-last input whose channels
    have means well away from zero (where E[x^2] - E[x]^2 would cancel)."""
    torch.manual_seed(seed)
    norm = group_norm(shape[1])
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias, 0.0, 0.3)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(shape[1], 1, 1, dtype=torch.float64) * 6)
    grad = torch.randn(shape, dtype=torch.float64)
    fmt = torch.channels_last
    return norm, x.to(dtype).to(memory_format=fmt), grad.to(dtype).to(memory_format=fmt)


def norm_outputs(fn, norm, x, grad):
    x = x.detach().requires_grad_()
    norm.zero_grad()
    y = fn(x)
    y.backward(grad)
    return y, x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()


@pytest.mark.parametrize("shape", [(3, 32, 10, 12), (4, 16, 6, 5), (4, 16, 5, 5), (2, 20, 6, 6)])
def test_channels_last_group_norm_is_exact_in_float64(shape):
    """The per-channel-sums formulation itself, without bf16 rounding: torch's GroupNorm to 1e-10.
    16 and 20 channels on an even map take rows of 2 pixels; on an odd map, rows of 1."""
    from ddlp.nn.norm import _ChannelsLastGroupNorm
    norm, x, grad = norm_case(shape, torch.float64)
    norm = norm.double()
    got = norm_outputs(lambda t: _ChannelsLastGroupNorm.apply(t, norm.weight, norm.bias, norm.num_groups, norm.eps),
                       norm, x, grad)
    want = norm_outputs(lambda t: nn.functional.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps),
                        norm, x, grad)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10 * float(w.detach().abs().max()))


def test_bf16_channels_last_group_norm_takes_the_fast_path_and_stays_within_bf16_error():
    """On bf16 channels-last input of 2^17 elements or more with 8 channels per group the norm
    runs `_ChannelsLastGroupNorm`; its output and gradients stay within 1.5 % (of the largest
    entry) of float32 on the same bf16 input: one bf16 rounding is 0.4 %, torch's own bf16 kernel
    measures 0.2-0.3 % here and ours 0.4-0.6 %, from the bf16 intermediate d = x - shift and the
    bf16 per-channel coefficients."""
    from ddlp.nn import norm as norm_module
    norm, x, grad = norm_case((24, 32, 16, 16), torch.bfloat16)
    calls = []
    original = norm_module._ChannelsLastGroupNorm.apply
    norm_module._ChannelsLastGroupNorm.apply = lambda *a: calls.append(1) or original(*a)
    try:
        got = norm_outputs(norm, norm, x, grad)
        norm(x.contiguous())                                     # channels-first: torch's kernel
        norm(x.float())                                          # float32: torch's kernel
        norm(x[:8].contiguous(memory_format=torch.channels_last))   # under SMALL elements: torch's kernel
        group_norm(64)(torch.randn(64, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last))
        large = torch.randn(16, 32, 32, 32, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        with torch.no_grad():
            norm(large)                                          # inference on 1024 pixels: torch's kernel
            norm(large[..., :16, :16].contiguous(memory_format=torch.channels_last))   # below: ours
        norm(large)                                              # training: ours
    finally:
        norm_module._ChannelsLastGroupNorm.apply = original
    assert len(calls) == 3
    want = norm_outputs(lambda t: nn.functional.group_norm(t, 4, norm.weight, norm.bias, norm.eps),
                        norm, x.float(), grad.float())
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    for g, w in zip(got, want):
        err = float(((g.float() - w).abs().max() / w.abs().max()).detach())
        assert err < 0.015, err


def grid_sample_paste(glimpses, position, scale, canvas):
    """The official construction of `paste`: one full sampling grid per glimpse."""
    B, K, C, g, _ = glimpses.shape
    u = torch.linspace(-1, 1, canvas, dtype=position.dtype)
    a, b = 1 / (scale + 1e-9), -position / (scale + 1e-9)
    gy, gx = a[..., 0, None] * u + b[..., 0, None], a[..., 1, None] * u + b[..., 1, None]
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)
    out = nn.functional.grid_sample(glimpses.reshape(B * K, C, g, g), grid.reshape(B * K, canvas, canvas, 2),
                                    mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(B, K, C, canvas, canvas)


def test_separable_paste_is_grid_sample_in_values_and_gradients():
    """`paste` as two products with per-axis bilinear weights is grid_sample's map: equal in
    float64 to 1e-12, gradients for the glimpses, positions and scales included, with glimpses
    partly off the canvas and scales above and below the canvas's."""
    from ddlp.nn.glimpse import paste
    torch.manual_seed(0)
    glimpses = torch.rand(2, 3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    position = (torch.rand(2, 3, 2, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()
    scale = (torch.rand(2, 3, 2, dtype=torch.float64) * 1.2 + 0.05).requires_grad_()
    got, want = paste(glimpses, position, scale, 20), grid_sample_paste(glimpses, position, scale, 20)
    assert got.shape == want.shape == (2, 3, 4, 20, 20)
    assert (want != 0).any() and (want == 0).any()
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    weights = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (glimpses, position, scale)),
                    torch.autograd.grad((want * weights).sum(), (glimpses, position, scale))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_pastes_of_saturated_glimpses_stay_within_0_and_1():
    """Under bf16 autocast `paste` returns bf16 that never leaves [0, 1] for glimpses in [0, 1],
    which lets `decoder.stitch` skip its clamp there: checked on all-ones glimpses, where the
    rounded weights could push a sum above 1, over many positions and scales."""
    from ddlp.nn.glimpse import paste
    torch.manual_seed(0)
    ones = torch.ones(64, 8, 1, 16, 16, dtype=torch.bfloat16)
    position = torch.rand(64, 8, 2) * 2.4 - 1.2
    scale = torch.rand(64, 8, 2) * 0.9 + 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        canvas = paste(ones, position, scale, 64)
    assert canvas.dtype == torch.bfloat16
    assert float(canvas.max()) == 1.0 and float(canvas.min()) == 0.0


def grouped_conv_correlation(search, template):
    """The official construction of `correlation_maps`: one grouped conv per map."""
    N, C, P, _ = search.shape
    lo = P // 2 + 1
    window = nn.functional.pad(search, (P, P, P, P), mode="replicate")[..., lo:lo + 2 * P - 1, lo:lo + 2 * P - 1]
    tmpl = template.clamp(0, 1)
    flat = window.reshape(1, N * C, 2 * P - 1, 2 * P - 1)
    corr = nn.functional.conv2d(flat, tmpl, groups=N)
    energy = nn.functional.conv2d(flat.pow(2), torch.ones_like(tmpl), groups=N)
    corr = (corr / (torch.sqrt(tmpl.pow(2).sum() * energy + 1e-10) + 1e-5)).reshape(N, P * P)
    low, high = corr.min(1, keepdim=True)[0], corr.max(1, keepdim=True)[0]
    return ((corr - low) / (high - low + 1e-5)).view(N, 1, P, P)


@pytest.mark.parametrize("P", [8, 12])
def test_correlation_maps_are_the_grouped_conv_and_float32_under_bf16(P):
    """`correlation_maps` (row products summed along diagonals) equals the official grouped conv
    in float64 to 1e-12; in float32, and under bf16 autocast, within 2e-5 of float64 (the float32
    conv: 4e-5; the bf16 conv was 0.1 off: the min-max scaling magnifies rounding)."""
    from ddlp.nn.glimpse import correlation_maps
    torch.manual_seed(0)
    search, template = torch.rand(10, 3, P, P, dtype=torch.float64), torch.rand(10, 3, P, P, dtype=torch.float64) * 1.2
    want = grouped_conv_correlation(search, template)
    assert torch.allclose(correlation_maps(search, template), want, rtol=0, atol=1e-12)
    assert (want == 0).any() and (want > 0.99).any()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = correlation_maps(search.float(), template.float())
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max()) < 2e-5
