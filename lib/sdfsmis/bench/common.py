"""What both suites share, so that each side of a comparison is run and measured the same way:
the generated inputs, the clocks, our inference and training as the pipeline and the trainer run
them, the mask agreement check, and the description of the machine."""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import diffusers
import numpy as np
import torch
import transformers

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import SliceGrid, axial_slices, normalise_intensity
from sdfsmis.methods import SDFSMIS, OneShotModel, load_model
from sdfsmis.pipeline.acceleration import InferenceOptions
from sdfsmis.pipeline.placement import relative_position
from sdfsmis.pipeline.segmenter import choose_support_slices, segment_slices, serving_supports
from sdfsmis.samples.synthetic import make_studies, make_volume
from sdfsmis.samples.tiny_backbone import build_backbone
from sdfsmis.settings import Settings, load_config

if TYPE_CHECKING:
    from sdfsmis.training.episodes import EpisodeSampler

VOLUME_SHAPE = (128, 128, 64)
LIVER = 1
#: A differing mask pixel is tolerated only where the reference probability is this close to
#: the threshold (on the fence): fp32 differs by summation order only, fp16 (10-bit mantissa)
#: and bf16 (7-bit) by rounding through ~100 layers (random tiny model, bf16: up to 0.07).
FENCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


@dataclass
class BenchInputs:
    """One generated support volume's annotated slices and a query volume's slices, on the host."""

    support_images: torch.Tensor  # [K, 1, R, R] in [-1, 1]
    support_masks: torch.Tensor  # [K, 1, R, R] binary
    queries: torch.Tensor  # [N, 1, R, R]
    index: torch.Tensor  # [N] support of each query slice


def make_inputs(resolution: int, slices: int, supports: int, seed: int = 0) -> BenchInputs:
    """Liver of one generated patient as the support, another patient's liver range as the query,
    chosen and mapped as :class:`~sdfsmis.pipeline.segmenter.VolumeSegmenter` does."""
    config = InferenceConfig()
    image, label, _ = make_volume(seed, shape=VOLUME_SHAPE)
    query_image, _, _ = make_volume(seed + 1, shape=VOLUME_SHAPE)
    liver = (label == LIVER).astype(np.float32)
    annotated = np.flatnonzero(liver.any(axis=(0, 1)))
    support_z = choose_support_slices(annotated, supports)
    depth = VOLUME_SHAPE[2]
    place = relative_position(annotated, depth, depth, config)
    query_z = np.linspace(place.first, place.last, slices).round().astype(int)  # repeats slices when N > the range
    index = serving_supports(place.position(query_z), support_z).index[:, 0]
    grid = SliceGrid(*VOLUME_SHAPE[:2], resolution)
    support_data = normalise_intensity(image, config.clip_percentiles)
    query_data = normalise_intensity(query_image, config.clip_percentiles)
    return BenchInputs(
        grid.to_model(axial_slices(support_data, support_z)),
        (grid.to_model(axial_slices(liver, support_z)) > 0.5).float(),
        grid.to_model(axial_slices(query_data, query_z)),
        torch.from_numpy(index),
    )


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[SDFSMIS, Settings]:
    """SD-FSMIS, the side both suites time: a backbone directory (+ optional checkpoint), or a
    randomly initialised ``--shape``."""
    if args.backbone:
        config = load_config(args.config, args.backbone)
        model = cast(SDFSMIS, load_model(SDFSMIS.method, args.backbone, config, args.checkpoint, device))
    else:
        config = load_config(args.shape)
        shapes = config.tiny_backbone if args.shape == "tiny" else config.sd15_backbone
        model = SDFSMIS(*build_backbone(shapes), config=config.model).to(device)
    if args.resolution:
        config.model.resolution = args.resolution
    return model.eval(), config


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The command's inference options; sets the thread count at once (process-wide)."""
    switch = {"auto": None, "on": True, "off": False}
    if args.threads:
        torch.set_num_threads(args.threads)
    return InferenceOptions(
        args.precision,
        switch[args.channels_last],
        args.compile,
        args.vae_batch,
        args.threads,
        switch[args.retain_memory],
    )


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it has measured it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall seconds, and the process's CPU seconds (all threads): on a CPU shared with other
    work the CPU time is what the computation itself cost, whatever else was running."""

    wall: float
    cpu: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Timing, torch.Tensor]:
    """``fn()`` and how long it took, the device's queued work included."""
    _sync(device)
    started, started_cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return Timing(time.perf_counter() - started, time.process_time() - started_cpu), out


def our_inference(
    model: OneShotModel, inputs: BenchInputs, batch_size: int, options: InferenceOptions
) -> tuple[Timing, Timing, torch.Tensor]:
    """(time for the supports, time for all query slices, probabilities on the host), as
    :class:`~sdfsmis.pipeline.segmenter.VolumeSegmenter` runs a model: for a method with variants (DPL)
    the query time includes their uncertainty and per-slice confidence, downloaded with the
    probabilities."""
    device = model.device

    def queries() -> list[torch.Tensor | None]:
        outputs = segment_slices(model, support, inputs.queries.to(device), inputs.index.to(device), batch_size)
        return [None if output is None else output.cpu() for output in outputs]

    with torch.inference_mode(), options.autocast(device):
        support_s, support = timed(
            lambda: model.encode_support(inputs.support_images.to(device), inputs.support_masks.to(device)), device
        )
        query_s, outputs = timed(queries, device)
    return support_s, query_s, outputs[0]


def agreement(reference: torch.Tensor, ours: torch.Tensor, threshold: float, fence: float) -> dict:
    """Masks at ``threshold`` agree when every differing pixel has a reference probability within
    ``fence`` of the threshold; Dice and the largest probability difference are reported too."""
    ref_mask, our_mask = reference >= threshold, ours >= threshold
    total = int(ref_mask.sum() + our_mask.sum())
    dice = 2 * int((ref_mask & our_mask).sum()) / total if total else 1.0
    differ = ref_mask ^ our_mask
    off_fence = int((differ & ((reference - threshold).abs() > fence)).sum())
    return {
        "masks_agree": off_fence == 0,
        "mask_dice": round(dice, 6),
        "mismatched_pixels": int(differ.sum()),
        "mismatched_off_fence": off_fence,
        "fence": fence,
        "max_probability_difference": float((reference - ours).abs().max()),
        "mean_probability_difference": float((reference - ours).abs().mean()),
        "off_fence_fraction": off_fence / reference.numel(),
        "foreground_fraction": round(float(ref_mask.float().mean()), 6),
    }


def peak_memory_gb(device: torch.device) -> float:
    """CUDA's peak allocation on a GPU; the process's peak RSS on a CPU (all it offers)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def training_sampler(config: Settings) -> EpisodeSampler:
    """Supervoxel episodes from two generated studies, zoomed as the training preset says."""
    # the training modules are imported only when training is timed: the trainer pulls in plotting
    from sdfsmis.training.episodes import EpisodeSampler, TrainingVolume
    from sdfsmis.training.trainer import episode_zoom

    cfg = config.training
    with tempfile.TemporaryDirectory() as folder:
        images = make_studies(Path(folder), 2, seed=100)
        volumes = [
            TrainingVolume.load(
                p,
                config.model.resolution,
                None,
                cfg.supervoxel_min_size,
                (0.5, 99.5),
                cfg.min_foreground,
                episode_zoom(config),
            )
            for p in images
        ]
    return EpisodeSampler(volumes, cfg.seed, cfg.min_foreground)


def time_our_training(
    model: OneShotModel, sampler: EpisodeSampler, config: Settings, args: argparse.Namespace
) -> tuple[float, float]:
    """Seconds for ``--train-steps`` of our steps (``--train-batch-size`` episodes each) after warm-up,
    and the peak memory in GB."""
    from sdfsmis.training.trainer import (
        EpisodeLoss,
        EpisodeStream,
        episode_loader,
        make_optimizer,
        step_generator,
        train_step,
    )

    device, cfg = model.device, config.training
    if args.gradient_checkpointing and hasattr(model, "unet"):
        model.unet.enable_gradient_checkpointing()
    optimizer, loss_module = make_optimizer(model, cfg), EpisodeLoss(model)
    total = args.warmup_steps + args.train_steps
    loader = iter(
        episode_loader(EpisodeStream(sampler, args.train_batch_size), 0, total, args.workers, pin=device.type == "cuda")
    )

    def steps(iterations: range) -> torch.Tensor:
        losses = [
            train_step(loss_module, optimizer, next(loader), step_generator(device, cfg.seed, i), cfg.grad_clip)["loss"]
            for i in iterations
        ]
        return torch.stack(losses).cpu()  # the one sync

    steps(range(args.warmup_steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing, _ = timed(lambda: steps(range(args.warmup_steps, total)), device)
    return timing.wall, peak_memory_gb(device)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as ``lscpu`` shows it)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's and the threads used: what a reader needs to compare figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


def table(rows: list[tuple[str, str]]) -> str:
    """Rows of (name, value) as two aligned columns, as both suites print them."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_facts(
    args: argparse.Namespace, config: Settings, device: torch.device, options: InferenceOptions, retain_memory: bool
) -> dict:
    """What every bench result records of its run: when, where, with what and how it was timed."""
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_description(device),
        "shape": "backbone: " + str(args.backbone) if args.backbone else args.shape,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "resolution": config.resolution,
        "slices": args.slices,
        "supports": args.supports,
        "batch_size": args.batch_size,
        "precision": options.resolved_precision(device),
        "compile": options.compile,
        "retain_freed_memory": retain_memory,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
