"""bdiff_jax: masked-diffusion language models with a bijective (reversible) transformer backbone."""

__version__ = "0.1.0"
