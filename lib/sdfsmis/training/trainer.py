"""Episodic fine-tuning of a one-shot method (SD-FSMIS or DPL) on a site's own volumes: the
method's trainable parts (SD-FSMIS: UNet + VTCT MLP; DPL: adapter, denoiser, threshold), frozen
VAE and DINOv2, AdamW, gradient clipping, every loss term logged, periodic validation Dice,
atomic checkpoints and exact resume (docs/model.md "Training", docs/dpl.md).

Speed: bf16 autocast and fused AdamW on CUDA, episodes prepared by DataLoader workers ahead of
the step, and no host synchronisation except every 10 steps for logging. Under ``torchrun``
(``WORLD_SIZE`` > 1) it trains data-parallel with DDP (nccl on CUDA, gloo on CPU): rank r
trains on episodes ``iteration * world + r``, gradients are averaged, rank 0 alone validates
and writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sdfsmis.config import TrainingConfig
from sdfsmis.io.volume import VolumeError
from sdfsmis.io.weights import load_weights
from sdfsmis.methods import DEFAULT_METHOD, OneShotModel, load_model
from sdfsmis.methods.base import EpisodeBatch
from sdfsmis.metrics import dice
from sdfsmis.settings import Settings
from sdfsmis.training.board import MONTAGE_EPISODES, TrainingBoard
from sdfsmis.training.checkpoints import publish, read_state, resume, write_checkpoint
from sdfsmis.training.episodes import Episode, EpisodeSampler, EpisodeZoom, NoEpisodes, TrainingVolume

IMAGE_PATTERNS = ("*.nii.gz", "*.nii")

logger = logging.getLogger(__name__)


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


def episode_zoom(config: Settings) -> EpisodeZoom | None:
    """Zoomed episodes with grounded inference's margins, when both are on (``training.zoom_episodes``)."""
    if not (config.training.zoom_episodes and config.inference.grounding):
        return None
    return EpisodeZoom(config.inference.roi_margin_mm, config.inference.roi_margin_share)


def make_optimizer(model: OneShotModel, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable groups; the fused kernel on CUDA (one launch for all tensors)."""
    return torch.optim.AdamW(
        model.parameter_groups(cfg),
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=model.device.type == "cuda",
    )


def training_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimiser state stay fp32); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class EpisodeLoss(torch.nn.Module):
    """The training loss as a module's forward, so that DDP can wrap it."""

    def __init__(self, model: OneShotModel):
        super().__init__()
        self.model = model

    def forward(self, episode: Episode, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = self.model.device
        tensors = (episode.support_image, episode.support_mask, episode.query_image, episode.query_mask)
        batch = EpisodeBatch(*(t.to(device, non_blocking=True) for t in tensors))
        return self.model.training_losses(batch, generator=generator)


def train_step(
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    episode: Episode,
    generator: torch.Generator,
    grad_clip: float,
) -> dict[str, torch.Tensor]:
    """One optimiser step; returns the detached loss terms without synchronising with the device."""
    with training_autocast(generator.device):
        losses = loss_module(episode, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(loss_module.parameters(), grad_clip)
    optimizer.step()
    getattr(loss_module, "module", loss_module).model.after_step()  # unwrap DDP
    return {name: value.detach().float() for name, value in losses.items()}


class EpisodeStream(Dataset):
    """Iteration i -> the batch of episodes this rank trains on at step i (global episode batch
    ``i * world + rank``), so ranks see different episodes and any iteration can be resumed."""

    def __init__(self, sampler: EpisodeSampler, batch_size: int, rank: int = 0, world: int = 1):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __getitem__(self, iteration: int) -> Episode:
        return self.sampler.batch(iteration * self.world + self.rank, self.batch_size)


def episode_loader(stream: EpisodeStream, start: int, stop: int, workers: int, pin: bool) -> DataLoader:
    """Episodes of iterations ``start .. stop-1`` in order, prepared by ``workers`` processes
    ahead of the training step (0: in the training loop)."""
    return DataLoader(
        stream,
        sampler=range(start, stop),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )


def step_generator(device: torch.device, seed: int, iteration: int, rank: int = 0, world: int = 1) -> torch.Generator:
    """The latent-sampling generator of one rank's step (the same on resume)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + iteration * world + rank)


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device(device)


@dataclass
class TrainingRun:
    backbone: str | Path
    images: list[Path]
    output: Path
    config: Settings
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
    workers: int = 0  # DataLoader processes preparing episodes ahead of the step
    method: str = DEFAULT_METHOD  # a name of the registry (sdfsmis.methods)


class Trainer:
    def __init__(self, run: TrainingRun):
        self.run = run
        cfg = run.config.training
        self.rank, self.world, device = _init_distributed(run.device)
        torch.manual_seed(cfg.seed)
        self.model = load_model(run.method, run.backbone, run.config, device=device)
        if cfg.gradient_checkpointing and hasattr(self.model, "unet"):
            self.model.unet.enable_gradient_checkpointing()
        self.optimizer = make_optimizer(self.model, cfg)
        self.loss = EpisodeLoss(self.model)
        if self.world > 1:  # broadcasts rank 0's weights, then averages gradients in backward
            self.loss = DistributedDataParallel(
                self.loss, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
            )
        if self.world > 1 and not self.is_main:
            dist.barrier()  # rank 0 computes and caches the supervoxels first, the others read them
        volumes = self._usable_volumes()
        if self.world > 1 and self.is_main:
            dist.barrier()
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
        if self.gt_validation is not None:
            try:  # labelled structures smaller than an episode's least foreground cannot validate
                self.gt_validation.episode(0)
            except RuntimeError as error:
                logger.warning(f"no validation on the ground-truth labels: {error}")
                self.gt_validation = None

    def _load(self, image: Path) -> TrainingVolume:
        label = find_label(image) if self.run.use_labels else None
        volume = TrainingVolume.load(
            image,
            self.run.config.model.resolution,
            label,
            self.run.config.training.supervoxel_min_size,
            self.run.config.inference.clip_percentiles,
            self.run.config.training.min_foreground,
            episode_zoom(self.run.config),
        )
        volume.exclude_classes(self.run.exclude_classes, self.run.exclusion_rule)
        return volume

    def _usable_volumes(self) -> list[TrainingVolume]:
        """The volumes that yield episodes; each other one is skipped with a warning saying why
        (``self.skipped``), and training stops only when none is left."""
        cfg = self.run.config.training
        volumes, self.skipped = [], []
        for image in self.run.images:
            try:
                volume = self._load(image)
                reason = volume.why_no_episodes(cfg.min_foreground)
            except VolumeError as error:
                reason = str(error)
            if reason is None:
                volumes.append(volume)
                continue
            self.skipped.append({"image": image.name, "reason": reason})
            if self.is_main:
                logger.warning(f"training: skipping {image.name}: {reason}")
        if not volumes:
            reasons = "; ".join(f"{s['image']}: {s['reason']}" for s in self.skipped)
            raise NoEpisodes(
                f"no training volume yields an episode ({reasons}). Lower training.min_foreground (now "
                f"{cfg.min_foreground}, --min-foreground) or set training.supervoxel_min_size (now "
                f"{cfg.supervoxel_min_size!r}, --supervoxel-min-size) so that supervoxels cover that many model pixels"
            )
        return volumes

    @torch.no_grad()
    def validate(self, sampler: EpisodeSampler, show: int = 0) -> tuple[float, list]:
        """Mean one-shot Dice over fixed, unaugmented episodes, and the first ``show`` of them as
        (episode, predicted mask, Dice) for the validation montage."""
        self.model.eval()
        scores, shown = [], []
        threshold = self.run.config.inference.threshold
        for i in range(self.run.config.training.validation_episodes):
            e = sampler.episode(i)
            device = self.model.device
            support = self.model.encode_support(e.support_image.to(device), e.support_mask.to(device))
            probability = self.model.segment(support, e.query_image.to(device))
            predicted = (probability >= threshold).float().cpu()
            scores.append(dice(predicted, e.query_mask))
            if i < show:
                shown.append((e, predicted, scores[-1]))
        self.model.train()
        return float(np.mean(scores)), shown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        if state and self.is_main:
            print(f"resumed from iteration {start} ({run.output / 'last'})")
        self.board = TrainingBoard(run.output, run.method, start + 1 if state else None) if self.is_main else None
        self.model.train()
        device = self.model.device
        stream = EpisodeStream(self.sampler, run.batch_size, self.rank, self.world)
        loader = episode_loader(stream, start, run.iterations, run.workers, pin=device.type == "cuda")
        losses: list[float] = []
        pending: list[dict[str, torch.Tensor]] = []
        started, done = time.perf_counter(), 0
        bar = tqdm(
            range(start, run.iterations),
            initial=start,
            total=run.iterations,
            disable=not run.progress or not self.is_main,
        )
        for iteration, episode in zip(bar, loader):
            generator = step_generator(device, cfg.seed, iteration, self.rank, self.world)
            pending.append(train_step(self.loss, self.optimizer, episode, generator, cfg.grad_clip))
            done += 1
            step = iteration + 1
            is_checkpoint = step % cfg.checkpoint_every == 0 or step == run.iterations
            if step % 10 == 0 or is_checkpoint:  # the only host sync: logging
                names = list(pending[0])
                values = torch.stack([torch.stack([terms[n] for n in names]) for terms in pending])
                if self.world > 1:  # the mean over ranks
                    dist.all_reduce(values)
                    values /= self.world
                values = values.cpu().numpy()
                losses.extend(values[:, 0].tolist())
                pending.clear()
                rate = done / (time.perf_counter() - started)
                terms = {name: float(values[:, i].mean()) for i, name in enumerate(names)}
                bar.set_postfix(loss=f"{terms['loss']:.4f}", it_s=f"{rate:.2f}")
                if self.is_main:
                    self._log({"iteration": step, **terms, "it_per_s": rate})
                    self.board.step(step, terms, rate, self.optimizer)
            if is_checkpoint and self.is_main:
                best = self._checkpoint(step, best)
        if self.is_main:
            self.board.close()
            publish(run.output / "last" / self.model.weights_name, run.output / self.model.weights_name)
        if self.world > 1:
            dist.barrier()  # every rank returns with rank 0's checkpoint in place
        final = read_state(run.output) or {}
        return {
            "iterations": run.iterations,
            "resumed_from": start,
            "losses": losses,
            "it_per_s": done / max(time.perf_counter() - started, 1e-9),
            "world_size": self.world,
            "skipped": self.skipped,
            "final": final,
            "method": run.method,
            "checkpoint": str(run.output / self.model.weights_name),
        }

    def _checkpoint(self, step: int, best: float) -> float:
        """Validate when due, write the checkpoint (rank 0 only); returns the best Dice so far."""
        cfg = self.run.config.training
        record = {"iteration": step, "seed": cfg.seed, "best_dice": best}
        improved = False
        if step % cfg.validate_every == 0 or step == self.run.iterations:
            record["val_dice"], shown = self.validate(self.validation, MONTAGE_EPISODES)
            if self.gt_validation is not None:
                record["val_dice_gt"], _ = self.validate(self.gt_validation)
            improved = record["val_dice"] > best
            best = max(best, record["val_dice"])
            record["best_dice"] = best
            scores = {k: v for k, v in record.items() if k in ("val_dice", "val_dice_gt", "best_dice")}
            record["validation_montage"] = str(self.board.validation(step, scores, shown))
            self._log({k: v for k, v in record.items() if k != "seed"})
            # flushed: under MONAI Label stdout is a pipe, read line by line into GET /train/'s details
            print(json.dumps(record), flush=True)
        write_checkpoint(self.run.output, self.model, self.optimizer, record, best=improved)
        return best


def train(run: TrainingRun) -> dict:
    try:
        return Trainer(run).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
