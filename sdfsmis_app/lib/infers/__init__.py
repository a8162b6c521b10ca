from .sdfsmis import SDFSMISInfer

__all__ = ["SDFSMISInfer"]
