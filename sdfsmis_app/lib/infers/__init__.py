from lib.infers.one_shot import OneShotInfer

__all__ = ["OneShotInfer"]
