"""DPL: diffusion-enhanced prototypes on frozen DINOv2 features, the method a site without a GPU
runs. The model, the prototype diffusion and its settings section."""

from sdfsmis.methods.dpl.model import DPL

__all__ = ["DPL"]
