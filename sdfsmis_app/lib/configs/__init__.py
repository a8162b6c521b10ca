from lib.configs.runtime import AppSettings, ModelRuntime, ModelUnavailable

__all__ = ["AppSettings", "ModelRuntime", "ModelUnavailable"]
