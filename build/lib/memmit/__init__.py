"""memmit: mitigate memorization in diffusers pipelines with Iterative Ensemble Training + Anti-Gradient Control."""

__version__ = "0.1.0"
