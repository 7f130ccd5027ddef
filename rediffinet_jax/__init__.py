"""Re-DiffiNet in JAX/Flax NNX: a diffusion model learns where a 3D U-Net's tumour masks are wrong."""

from rediffinet_jax.errors import CaseError, ConfigError, RediffinetError

__all__ = ["CaseError", "ConfigError", "RediffinetError"]
__version__ = "0.2.0"
