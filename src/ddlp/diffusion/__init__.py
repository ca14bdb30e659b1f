"""DiffuseDDLP: unconditional object-centric video generation with a DDPM over the latent
particles of a frozen DDLP (paper section 5.4 and appendix B, as the official code does it).

    from ddlp.diffusion import DiffuseDDLP, generate, load_ddlp
    model = DiffuseDDLP.from_pretrained("runs/diffuse/model")
    video, particles, timings = generate(model, load_ddlp("runs/diffuse/ddlp"), n=4, frames=100)
"""
from .latents import LatentNormalizer, LatentStats
from .model import DiffuseDDLP, DiffusionConfig, load_ddlp
from .sampler import ddim_sample, ddpm_sample, generate
from .schedule import NoiseSchedule
from .tokens import TokenLayout, from_tokens, to_tokens

__all__ = ["DiffuseDDLP", "DiffusionConfig", "LatentNormalizer", "LatentStats", "NoiseSchedule", "TokenLayout",
           "ddim_sample", "ddpm_sample", "from_tokens", "generate", "load_ddlp", "to_tokens"]
