"""Float32 islands inside autocast regions."""
from torch import Tensor


def full_precision(t: Tensor) -> Tensor:
    """`t` in float32 if it is a half-precision float (bf16/fp16), else unchanged (float64 stays)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t
