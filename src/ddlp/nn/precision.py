"""Float32 islands inside autocast regions."""
from torch import Tensor


def full_precision(t: Tensor) -> Tensor:
    """`t` in float32 if it is a half-precision float (bf16/fp16), else unchanged (float64 stays)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: str = "cpu") -> tuple[bool, str]:
    """Whether `device` computes bfloat16 natively, and the evidence: AMX-BF16 or AVX512-BF16 on a
    CPU (/proc/cpuinfo flags), compute capability 8.0 or higher on a CUDA GPU."""
    import torch
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return major >= 8, f"compute capability {major}.{minor}"
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return bool(found), ", ".join(found) if found else "no amx_bf16 / avx512_bf16 flag"


def resolve_precision(precision: str, device: str = "cpu") -> tuple[str, str]:
    """'auto' -> 'bf16' where the device has native bf16, else 'no' (fp32); 'fp32' -> 'no'
    (accelerate's name); other values pass through. Returns the precision and why it was chosen."""
    if precision == "fp32":
        precision = "no"
    if precision != "auto":
        return precision, "asked for"
    native, evidence = native_bf16(device)
    return ("bf16" if native else "no"), f"auto: {evidence}"


def inference_precision(precision: str, device="cpu") -> str:
    """'fp32' or 'bf16' for a command's --precision fp32 / bf16 / auto (bf16 where `device` has it
    natively)."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    chosen, _ = resolve_precision(precision, str(device))
    return "fp32" if chosen == "no" else "bf16"


def autocast(precision: str = "fp32", device="cpu"):
    """A context that runs the ops inside it in `precision` (fp32 / bf16 / auto, see
    inference_precision). Weights stay float32, and so do the particle positions and distributions
    the model keeps in float32 (docs/performance.md states the accuracy)."""
    import contextlib
    import torch
    if inference_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
