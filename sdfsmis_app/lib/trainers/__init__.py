from .sdfsmis import SDFSMISTrain

__all__ = ["SDFSMISTrain"]
