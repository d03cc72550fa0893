"""ptqrepro: reproducible post-training quantization experiments for large language models."""

__version__ = "0.1.0"
"""The package's version, the one place it is written (pyproject.toml reads it; ``ptqrepro --version``)."""
