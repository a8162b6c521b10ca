from .one_shot import OneShotInfer

__all__ = ["OneShotInfer"]
