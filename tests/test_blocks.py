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
