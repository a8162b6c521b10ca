"""Active learning: which study the radiologist should open next ("Next Sample" in Slicer, OHIF's
active-learning panel). ``results`` keeps what each one-shot result said about its own doubt;
``doubt`` is the strategy that ranks the studies by it."""

from lib.activelearning.doubt import Doubt

__all__ = ["Doubt"]
