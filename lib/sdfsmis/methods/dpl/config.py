"""DPL's section of the settings (``dpl:`` in the presets)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPLConfig:
    """DPL, the second one-shot method (docs/dpl.md): a prototype head on frozen
    DINOv2 features whose support prototype is enhanced by a conditioned vector diffusion. It
    runs on the same slices as SD-FSMIS (``model.resolution``); every choice of dpl.md is here."""

    image_size: int = 224  # DINOv2 input without crop: 16 x 16 patches (448: 32 x 32, ~5x the CPU time)
    feature_dim: int = 256  # the adapter's output channels (the prototype's dimension)
    scale: float = 20.0  # ADNet: S = -scale * cos(F, p)
    threshold_init: float = -10.0  # ADNet's learned threshold T
    timesteps: int = 100  # the vector diffusion's T, cosine schedule
    t_star: int = 30  # partial forward step: 0 = no enhancement (variants = the prototype)
    ddim_steps: int = 5  # reverse steps from t_star to 0 (eta 0)
    variants: int = 8  # K
    seed: int = 0  # the forward noises of a support are drawn from this seed: reproducible masks
    tau: float = 10.0  # fusion weights softmax(tau * cos(v_k, x0))
    delta: float = 0.8  # variants with cos(v_k, x0) < delta are dropped
    fusion_lambda: float = 0.3  # x_enh = (1 - lambda) x0 + lambda mean_w(v)
    use_condition: bool = True  # spatial condition on the denoiser (ablation: false)
    denoiser_width: int = 512
    denoiser_blocks: int = 4
    condition_dim: int = 128  # the condition MLP's output, added to the time embedding
    lr: float = 1.0e-4
    lambda_diff: float = 1.0  # weight of the noise-prediction loss
    background_weight: float = 0.1  # weighted NLL of the segmentation and alignment losses
    threshold_loss: float = 0.05  # ADNet's T / 20
    ema_decay: float = 0.999  # EMA of the denoiser, used whenever the model is not training
