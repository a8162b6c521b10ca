"""Episodic fine-tuning of SD-FSMIS on a site's own volumes: UNet + VTCT MLP trainable, VAE and
DINOv2 frozen, AdamW with two learning rates, gradient clipping, periodic validation Dice,
atomic checkpoints and exact resume (docs/model.md "Training")."""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import publish, read_state, resume, write_checkpoint
from .config import SDFSMISConfig
from .episodes import EpisodeSampler, TrainingVolume
from .model import SDFSMIS
from .weights import WEIGHTS_NAME, load_weights

IMAGE_PATTERNS = ("*.nii.gz", "*.nii")


def find_images(spec: str | Path) -> list[Path]:
    """A directory (its NIfTI files) or a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        found = {p for pattern in IMAGE_PATTERNS for p in path.glob(pattern)}
    else:
        found = {Path(p) for p in glob.glob(str(spec))}
    images = sorted(p for p in found if p.is_file())
    if not images:
        raise FileNotFoundError(f"no NIfTI images found at {spec}")
    return images


def find_label(image: Path) -> Path | None:
    """A ground-truth label in MONAI Label's layout (``labels/final/NAME``) beside the image."""
    label = image.parent / "labels" / "final" / image.name
    return label if label.is_file() else None


def dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    intersection = (prediction * target).sum().item()
    total = prediction.sum().item() + target.sum().item()
    return 2 * intersection / total if total > 0 else 1.0


@dataclass
class TrainingRun:
    backbone: str | Path
    images: list[Path]
    output: Path
    config: SDFSMISConfig
    iterations: int
    device: str = "cpu"
    resume: bool = False
    batch_size: int = 1
    exclude_classes: list[int] = field(default_factory=list)
    exclusion_rule: str = "any"
    use_labels: bool = True
    init_checkpoint: Path | None = None  # start from these weights (e.g. the served model)
    progress: bool = True
    on_step: Callable[[dict], None] | None = None


class Trainer:
    def __init__(self, run: TrainingRun):
        self.run = run
        cfg = run.config.training
        torch.manual_seed(cfg.seed)
        self.model = SDFSMIS.from_backbone(run.backbone, run.config.model, device=run.device)
        if cfg.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(
            self.model.trainable_parameter_groups(cfg.lr_unet, cfg.lr_mlp),
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=run.device == "cuda",
        )
        volumes = [self._load(image) for image in run.images]
        for volume in volumes:
            volume.exclude_classes(run.exclude_classes, run.exclusion_rule)
        # Hold out one volume for validation when there are enough; otherwise validate on
        # other episodes (different seed, no augmentation) of the same volumes.
        held_out = volumes[-1:] if len(volumes) >= 3 else volumes
        training = volumes[:-1] if len(volumes) >= 3 else volumes
        self.sampler = EpisodeSampler(training, cfg.seed, cfg.min_foreground, cfg.gt_rate)
        self.validation = EpisodeSampler(held_out, cfg.seed + 1, cfg.min_foreground, augment_episodes=False)
        labelled = [v for v in held_out if v.labels is not None]
        self.gt_validation = (
            EpisodeSampler(labelled, cfg.seed + 2, cfg.min_foreground, gt_rate=1.0, augment_episodes=False)
            if labelled
            else None
        )

    def _load(self, image: Path) -> TrainingVolume:
        label = find_label(image) if self.run.use_labels else None
        return TrainingVolume.load(
            image,
            self.run.config.model.resolution,
            label,
            self.run.config.training.supervoxel_min_size,
            self.run.config.inference.clip_percentiles,
        )

    @torch.no_grad()
    def validate(self, sampler: EpisodeSampler) -> float:
        """Mean one-shot Dice over fixed, unaugmented episodes."""
        self.model.eval()
        scores = []
        threshold = self.run.config.inference.threshold
        for i in range(self.run.config.training.validation_episodes):
            e = sampler.episode(i)
            device = self.model.device
            support = self.model.encode_support(e.support_image.to(device), e.support_mask.to(device))
            probability = self.model.segment(support, e.query_image.to(device))
            scores.append(dice((probability >= threshold).float().cpu(), e.query_mask))
        self.model.train()
        return float(np.mean(scores))

    def _log(self, record: dict) -> None:
        with open(self.run.output / "train_log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.run.on_step:
            self.run.on_step(record)

    def fit(self) -> dict:
        run, cfg = self.run, self.run.config.training
        run.output.mkdir(parents=True, exist_ok=True)
        state = resume(run.output, self.model, self.optimizer) if run.resume else None
        if state is None and run.init_checkpoint is not None:
            load_weights(self.model, run.init_checkpoint)
        start = state["iteration"] if state else 0
        best = state.get("best_dice", -1.0) if state else -1.0
        if state:
            print(f"resumed from iteration {start} ({run.output / 'last'})")
        self.model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device == "cuda")
        losses: list[float] = []
        pending: list[torch.Tensor] = []
        started, done = time.perf_counter(), 0
        bar = tqdm(range(start, run.iterations), initial=start, total=run.iterations, disable=not run.progress)
        for iteration in bar:
            e = self.sampler.batch(iteration, run.batch_size)
            generator = torch.Generator(self.model.device).manual_seed(cfg.seed * 1_000_003 + iteration)
            with autocast:
                loss = self.model.training_loss(
                    *(t.to(self.model.device) for t in (e.support_image, e.support_mask, e.query_image, e.query_mask)),
                    generator=generator,
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            pending.append(loss.detach())
            done += 1
            step = iteration + 1
            is_checkpoint = step % cfg.checkpoint_every == 0 or step == run.iterations
            if step % 10 == 0 or is_checkpoint:  # the only host sync: logging
                values = torch.stack(pending).float().cpu().tolist()
                losses.extend(values)
                pending.clear()
                rate = done / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{np.mean(values):.4f}", it_s=f"{rate:.2f}")
                self._log({"iteration": step, "loss": float(np.mean(values)), "it_per_s": rate})
            if is_checkpoint:
                record = {"iteration": step, "seed": cfg.seed, "best_dice": best}
                if step % cfg.validate_every == 0 or step == run.iterations:
                    record["val_dice"] = self.validate(self.validation)
                    if self.gt_validation is not None:
                        record["val_dice_gt"] = self.validate(self.gt_validation)
                    improved = record["val_dice"] > best
                    best = max(best, record["val_dice"])
                    record["best_dice"] = best
                    self._log({k: v for k, v in record.items() if k != "seed"})
                    print(json.dumps(record))
                else:
                    improved = False
                write_checkpoint(run.output, self.model, self.optimizer, record, best=improved)
        publish(run.output / "last" / WEIGHTS_NAME, run.output / WEIGHTS_NAME)
        final = read_state(run.output) or {}
        return {
            "iterations": run.iterations,
            "resumed_from": start,
            "losses": losses,
            "it_per_s": done / max(time.perf_counter() - started, 1e-9),
            "final": final,
            "checkpoint": str(run.output / WEIGHTS_NAME),
        }


def train(run: TrainingRun) -> dict:
    return Trainer(run).fit()
