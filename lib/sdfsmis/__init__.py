"""SD-FSMIS: one-shot medical image segmentation with an adapted Stable Diffusion v1.5."""

__version__ = "0.1.0"
