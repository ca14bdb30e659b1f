"""ddlp: Deep Dynamic Latent Particles (DLPv2, DDLP, PINT) in PyTorch."""
from .config import Config, ConfigError
from .model import DDLP, DLP, Output, build_model
from .particles import Particles
from .pint import PINT

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "DDLP", "DLP", "Output", "PINT", "Particles", "build_model"]
