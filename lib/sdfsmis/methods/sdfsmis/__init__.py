"""SD-FSMIS: Stable Diffusion v1.5 adapted for one-shot segmentation. The model, its SQI attention
processor, the mask codec, query enhancement, the VTCT token, its settings section and the
released code's formulation (what the benchmark compares against)."""

from sdfsmis.methods.sdfsmis.model import SDFSMIS

__all__ = ["SDFSMIS"]
