"""The SD-FSMIS MONAI Label app's own modules: runtime configuration, infer and train tasks."""
