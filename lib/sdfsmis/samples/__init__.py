"""Generated data and tiny models for tests, demos and benchmarks: abdominal look-alike volumes,
randomly initialised backbones in the real layout, and the tiny VAE fitted on generated slices."""
