"""Model, inference and training settings, loaded from the YAML presets in ``configs/``.

Defaults are the paper's settings (the ``sd15`` preset). A backbone directory may carry its own
``sdfsmis.yaml`` (``sdfsmis make-tiny`` writes one), so that a tiny backbone is always run at the
resolution it was built for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"
BACKBONE_PRESET_FILE = "sdfsmis.yaml"


@dataclass
class ModelConfig:
    """What the network is and how one episode is computed (see docs/model.md)."""

    resolution: int = 256
    timestep: int = 999
    conv_init: str = "repeat_half"  # or "zero": extra input channels start at zero
    qe_threshold: float = 0.7
    qe_topk: int = 10
    vtct_image_size: int = 224
    vtct_hidden_dim: int = 1536
    vtct_hidden_layers: int = 2


@dataclass
class InferenceConfig:
    """How a volume is turned into slices and back (the app's and the CLI's behaviour)."""

    threshold: float = 0.5
    batch_size: int = 8
    max_supports: int = 3  # from another volume: support slices spread over the annotation
    max_volume_supports: int = 32  # same volume: every drawn or corrected slice, at most this many
    supports_per_query: int = 2  # nearest supports combined per query slice (> 1: their agreement is a confidence)
    placement: str = "registration"  # another patient's support: "registration" or "relative" (sdfsmis.placement)
    review_dissent: float = 0.2  # share of members voting against the majority from which a voxel is reviewed
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    z_margin: float = 0.25
    min_extent_slices: int = 3
    largest_component: bool = True
    grounding: bool = True  # segment only around where the structure was drawn (sdfsmis.grounding)
    roi_margin_mm: float = 10.0  # in-plane margin of the grounding box, the larger of these two
    roi_margin_share: float = 0.5  # ... and this share of the drawn structure's extent
    reach_mm: float = 10.0  # same volume: the least reach beyond the outermost drawn slices
    end_continuity: float = 0.3  # beyond them, a slice with less than this share of its neighbour's area ends it
    shape_reach_mm: float = 2.0  # same volume: how far the model may move the drawn shape's contour (0: model alone)


@dataclass
class TrainingConfig:
    """The optimiser recipe of the paper plus the episode sampler's knobs (protocol.md)."""

    lr_unet: float = 1e-5
    lr_mlp: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    iterations: int = 15000
    checkpoint_every: int = 1000
    validate_every: int = 1000
    validation_episodes: int = 16
    min_foreground: int = 200  # pixels of an episode's masks, at model resolution
    supervoxel_min_size: int | str = "auto"  # voxels; "auto": from the voxel size and min_foreground
    gt_rate: float = 0.0
    gradient_checkpointing: bool = False
    zoom_episodes: bool = True  # crop episodes around the support as grounded inference does (sdfsmis.episodes)


@dataclass
class DPLConfig:
    """DPL, the second one-shot method (docs: ../shared/docs/dpl.md): a prototype head on frozen
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


@dataclass
class SDFSMISConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dpl: DPLConfig = field(default_factory=DPLConfig)
    tiny_backbone: dict[str, Any] = field(default_factory=dict)
    sd15_backbone: dict[str, Any] = field(default_factory=dict)  # architecture only, for benchmarks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _merge(section: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown setting {where}.{key} (known: {', '.join(known)})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value or {}, f"{where}.{key}")
        else:
            setattr(section, key, tuple(value) if isinstance(current, tuple) else value)
    return section


def config_from_dict(values: dict[str, Any]) -> SDFSMISConfig:
    return _merge(SDFSMISConfig(), values or {}, "config")


def load_config(preset: str | Path | None = None, backbone: str | Path | None = None) -> SDFSMISConfig:
    """Resolve settings: an explicit preset (name in ``configs/`` or YAML path) wins, then the
    backbone directory's own ``sdfsmis.yaml``, then the paper defaults."""
    path: Path | None = None
    if preset:
        candidate = Path(preset)
        path = candidate if candidate.suffix in (".yaml", ".yml") else PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"config preset not found: {path}")
    elif backbone and (Path(backbone) / BACKBONE_PRESET_FILE).is_file():
        path = Path(backbone) / BACKBONE_PRESET_FILE
    if path is None:
        return SDFSMISConfig()
    return config_from_dict(yaml.safe_load(path.read_text()) or {})
