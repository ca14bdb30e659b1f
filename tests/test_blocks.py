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
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


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
