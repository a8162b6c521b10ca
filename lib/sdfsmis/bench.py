"""``sdfsmis bench``: our inference (and training) against what the released pipeline computes,
in one run, on the same inputs and the same weights. It prints a table and writes JSON: seconds
per query slice (medians of repeats after warm-up), the speed-up, whether both sides give the
same masks, and optionally training iterations per second and how inference scales with the
number of query slices and with the resolution. A benchmark, not a test.

The reference (``reference.py``) does per query slice what the released code does: encode the
support image and mask, DINOv2 token, support UNet pass into a K/V bank, encode the query,
query UNet pass, decode; batch 1, fp32, the result copied to the host slice by slice. Ours
encodes each support once (its K/V cached), runs the query slices in batches under the device's
:class:`~sdfsmis.acceleration.InferenceOptions` and copies the result back once.

``--method dpl`` times the second method, DPL (``models/dpl.py``), against SD-FSMIS (ours, as
above) in one run, on the same query slices and supports at the same resolution: seconds per
slice of each with its support encoding amortised over the query slices, DPL's speed-up, a check
that the timed DPL masks are the model's own slice-by-slice ``segment``, and with ``--train``
DPL's training iterations per second.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

from .acceleration import InferenceOptions, accelerate, retain_freed_memory
from .backbone import build_backbone
from .config import InferenceConfig, SDFSMISConfig, load_config
from .inference import choose_support_slices, segment_slices, serving_supports
from .models.base import OneShotModel
from .models.dpl import DPL
from .models.sdfsmis import SDFSMIS
from .placement import relative_position
from .reference import kv_bank, released_segment_slice, released_training_step
from .synthetic import make_studies, make_volume
from .volume import SliceGrid, axial_slices, normalise_intensity

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
    chosen and mapped as :class:`~sdfsmis.inference.VolumeSegmenter` does."""
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


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[SDFSMIS, SDFSMISConfig]:
    """A backbone directory (+ optional checkpoint), or a randomly initialised ``--shape``."""
    if args.backbone:
        config = load_config(args.config, args.backbone)
        model = SDFSMIS.from_backbone(args.backbone, config.model, args.checkpoint, device=device)
    else:
        config = load_config(args.shape)
        shapes = config.tiny_backbone if args.shape == "tiny" else config.sd15_backbone
        model = SDFSMIS(*build_backbone(shapes), config=config.model).to(device)
    if args.resolution:
        config.model.resolution = args.resolution
    return model.eval(), config


def _sync(device: torch.device) -> None:
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


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Timing, torch.Tensor]:
    _sync(device)
    started, started_cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return Timing(time.perf_counter() - started, time.process_time() - started_cpu), out


def make_plain(model: SDFSMIS) -> None:
    """Undo :func:`~sdfsmis.acceleration.accelerate` (but ``compile``): the model as loaded."""
    model.codec.batch, model.codec.channels_last = 0, False
    model.codec.vae.to(memory_format=torch.contiguous_format)
    model.unet.to(memory_format=torch.contiguous_format)


def reference_inference(
    model: SDFSMIS, inputs: BenchInputs, repeats: int, warmup: int, slices: list[int] | None = None
) -> tuple[list[Timing], torch.Tensor]:
    """Per-slice seconds of the released pipeline (every slice of every repeat) and its output,
    over the query slices ``slices`` (default: all)."""
    device = model.device
    slices = range(inputs.queries.shape[0]) if slices is None else slices
    make_plain(model)

    def one(i: int) -> torch.Tensor:
        k = int(inputs.index[i])
        support_image = inputs.support_images[k : k + 1].to(device)
        support_mask = inputs.support_masks[k : k + 1].to(device)
        query = inputs.queries[i : i + 1].to(device)
        return released_segment_slice(model, banks, support_image, support_mask, query).cpu()

    times, probability = [], []
    with kv_bank(model.unet) as banks, torch.inference_mode():
        for _ in range(warmup):
            one(slices[0])
        for repeat in range(repeats):
            for i in slices:
                timing, out = _timed(lambda i=i: one(i), device)
                times.append(timing)
                if repeat == 0:
                    probability.append(out)
    return times, torch.cat(probability)


def our_inference(
    model: OneShotModel, inputs: BenchInputs, batch_size: int, options: InferenceOptions
) -> tuple[Timing, Timing, torch.Tensor]:
    """(time for the supports, time for all query slices, probabilities on the host), as
    :class:`~sdfsmis.inference.VolumeSegmenter` runs a model: for a method with variants (DPL)
    the query time includes their uncertainty and per-slice confidence, downloaded with the
    probabilities."""
    device = model.device

    def queries() -> list[torch.Tensor | None]:
        outputs = segment_slices(model, support, inputs.queries.to(device), inputs.index.to(device), batch_size)
        return [None if output is None else output.cpu() for output in outputs]

    with torch.inference_mode(), options.autocast(device):
        support_s, support = _timed(
            lambda: model.encode_support(inputs.support_images.to(device), inputs.support_masks.to(device)), device
        )
        query_s, outputs = _timed(queries, device)
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


def reference_subset(slices: int, count: int) -> list[int]:
    """``count`` query slices spread evenly over all ``slices`` (0: all). The reference segments
    every slice independently, with the same shapes and the same work, so its seconds per slice
    can be measured on a subset; on a CPU that turns an hour of reference into minutes."""
    if count <= 0 or count >= slices:
        return list(range(slices))
    return sorted({int(i) for i in np.linspace(0, slices - 1, count).round()})


def bench_inference(model: SDFSMIS, config: SDFSMISConfig, args: argparse.Namespace, options: InferenceOptions) -> dict:
    """Reference and ours, repeats interleaved (ref, ours, ref, ours ...) so that both see the
    same load on a shared machine; with ``--compile`` all reference repeats come first, because
    switching the memory format back and forth would recompile."""
    device = model.device
    inputs = make_inputs(config.model.resolution, args.slices, args.supports)
    subset = reference_subset(args.slices, args.reference_slices)
    warm = inputs if args.compile else make_inputs(config.model.resolution, min(args.batch_size, args.slices), 1)
    rounds = [(args.repeats, args.repeats)] if args.compile else [(1, 1)] * args.repeats
    ref_times: list[Timing] = []
    ref_outputs, runs = [], []
    for round_index, (ref_repeats, our_repeats) in enumerate(rounds):
        warmup = args.warmup if round_index == 0 else 0
        times, probability = reference_inference(model, inputs, ref_repeats, warmup, subset)
        ref_times += times
        ref_outputs.append(probability)
        accelerate(model, InferenceOptions(**{**vars(options), "compile": options.compile and round_index == 0}))
        for _ in range(warmup):
            our_inference(model, warm, args.batch_size, options)
        runs += [our_inference(model, inputs, args.batch_size, options) for _ in range(our_repeats)]
    totals = [(support + query).wall for support, query, _ in runs]
    median = totals.index(statistics.median_low(totals))
    ours_s = statistics.median(totals) / args.slices
    reference_s = statistics.median(t.wall for t in ref_times)
    precision = options.resolved_precision(device)
    result = {
        "ours_s_per_slice": round(ours_s, 5),
        "reference_s_per_slice": round(reference_s, 5),
        "speedup": round(reference_s / ours_s, 3),
        "ours_support_s": round(runs[median][0].wall, 4),
        "ours_query_s_per_slice": round(runs[median][1].wall / args.slices, 5),
        "supports_used": int(inputs.support_images.shape[0]),
        "reference_slices_timed": len(subset),
        **agreement(ref_outputs[0], runs[0][2][subset], config.inference.threshold, FENCE[precision]),
    }
    if device.type == "cpu":  # the same medians in CPU seconds: robust to a shared, busy machine
        ours_cpu = statistics.median((support + query).cpu for support, query, _ in runs) / args.slices
        reference_cpu = statistics.median(t.cpu for t in ref_times)
        result.update(
            ours_cpu_s_per_slice=round(ours_cpu, 5),
            reference_cpu_s_per_slice=round(reference_cpu, 5),
            speedup_cpu_time=round(reference_cpu / ours_cpu, 3),
        )
    return result


def bench_scaling(model: SDFSMIS, config: SDFSMISConfig, args: argparse.Namespace, options: InferenceOptions) -> dict:
    """Our seconds per slice (median of repeats, after a warm-up) against the number of query
    slices at the configured resolution, and against the resolution at ``--batch-size`` slices."""

    def seconds_per_slice(resolution: int, slices: int) -> float:
        inputs = make_inputs(resolution, slices, args.supports)
        for _ in range(args.warmup):
            our_inference(model, inputs, args.batch_size, options)
        totals = [
            sum(timing.wall for timing in our_inference(model, inputs, args.batch_size, options)[:2])
            for _ in range(args.repeats)
        ]
        return round(statistics.median(totals) / slices, 5)

    resolution = config.model.resolution
    return {
        "slices": [{"slices": n, "s_per_slice": seconds_per_slice(resolution, n)} for n in args.scaling_slices],
        "resolution": [
            {"resolution": r, "slices": args.batch_size, "s_per_slice": seconds_per_slice(r, args.batch_size)}
            for r in args.scaling_resolutions
        ],
    }


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _time_our_training(
    model: OneShotModel, sampler, config: SDFSMISConfig, args: argparse.Namespace
) -> tuple[float, float]:
    """Seconds for ``--train-steps`` of our steps after warm-up, and the peak memory in GB."""
    from .trainer import EpisodeLoss, EpisodeStream, episode_loader, make_optimizer, step_generator, train_step

    device, cfg = model.device, config.training
    if args.gradient_checkpointing and hasattr(model, "unet"):
        model.unet.enable_gradient_checkpointing()
    optimizer, loss_module = make_optimizer(model, cfg), EpisodeLoss(model)
    total = args.warmup_steps + args.train_steps
    loader = iter(episode_loader(EpisodeStream(sampler, 1), 0, total, args.workers, pin=device.type == "cuda"))

    def steps(iterations: range) -> torch.Tensor:
        losses = [
            train_step(loss_module, optimizer, next(loader), step_generator(device, cfg.seed, i), cfg.grad_clip)["loss"]
            for i in iterations
        ]
        return torch.stack(losses).cpu()  # the one sync

    steps(range(args.warmup_steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing, _ = _timed(lambda: steps(range(args.warmup_steps, total)), device)
    return timing.wall, _peak_memory_gb(device)


def training_sampler(config: SDFSMISConfig):
    """Supervoxel episodes from two generated studies, zoomed as the training preset says."""
    from .episodes import EpisodeSampler, TrainingVolume
    from .trainer import episode_zoom

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


def bench_training(model: SDFSMIS, config: SDFSMISConfig, args: argparse.Namespace) -> dict:
    """Iterations per second of our training step and of the released one, batch 1, same episodes.

    Ours: :func:`~sdfsmis.trainer.train_step` (bf16 autocast and fused AdamW on CUDA, support and
    query in one UNet batch, episodes from DataLoader workers, no host sync per step). Reference:
    :func:`~sdfsmis.reference.released_training_step` (fp32, two UNet passes through the K/V bank,
    stock AdamW, the episode prepared in the loop, ``loss.item()`` every step).
    """
    from .trainer import step_generator

    device, cfg = model.device, config.training
    sampler = training_sampler(config)
    total = args.warmup_steps + args.train_steps
    model.train()

    ours_s, peak = _time_our_training(model, sampler, config, args)  # first: the CPU peak RSS is ours
    model.zero_grad(set_to_none=True)
    model.unet.disable_gradient_checkpointing()  # the K/V bank breaks under checkpointing
    gc.collect()

    reference_optimizer = torch.optim.AdamW(model.parameter_groups(cfg), weight_decay=cfg.weight_decay, betas=cfg.betas)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with kv_bank(model.unet) as banks:

        def reference(steps: range) -> None:
            for i in steps:
                generator = step_generator(device, cfg.seed, i)
                released_training_step(model, banks, reference_optimizer, sampler.episode(i), generator, cfg.grad_clip)

        reference(range(args.warmup_steps))
        timing, _ = _timed(lambda: reference(range(args.warmup_steps, total)), device)
    reference_s = timing.wall
    result = {
        "ours_it_per_s": round(args.train_steps / ours_s, 4),
        "reference_it_per_s": round(args.train_steps / reference_s, 4),
        "train_speedup": round(reference_s / ours_s, 3),
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": "cuda max allocated (ours)" if device.type == "cuda" else "process max RSS after ours",
        "train_steps": args.train_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "workers": args.workers,
    }
    if device.type == "cuda":
        result["reference_peak_memory_gb"] = round(_peak_memory_gb(device), 3)
    return result


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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


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


def run_bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    options = inference_options(args)
    # process-wide, so set before anything runs: the reference gets it too
    retain_memory = options.retains_memory(device) and retain_freed_memory()
    model, config = build_model(args, device)
    args.batch_size = args.batch_size or config.inference.batch_size
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device_description(device),
        "shape": "backbone: " + str(args.backbone) if args.backbone else args.shape,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "resolution": config.model.resolution,
        "slices": args.slices,
        "supports": args.supports,
        "batch_size": args.batch_size,
        "precision": options.resolved_precision(device),
        "compile": options.compile,
        "retain_freed_memory": retain_memory,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    result.update(bench_inference(model, config, args, options))
    result.update(channels_last=model.codec.channels_last, vae_batch=model.codec.batch)  # as accelerate chose
    if args.scaling:
        result["scaling"] = bench_scaling(model, config, args, options)
    if args.train:
        del model
        gc.collect()
        model, config = build_model(args, device)  # fresh weights, no inference options applied
        result.update(bench_training(model, config, args))
    return result


#: Issue 14's targets for DPL, at the DINOv2-small shape, 256 px slices, K = 8, on 2 CPU cores.
DPL_TARGET_S_PER_SLICE = 0.5
DPL_TARGET_SPEEDUP = 20.0


def build_dpl(args: argparse.Namespace, config: SDFSMISConfig, sdfsmis: SDFSMIS, device: torch.device) -> DPL:
    """DPL beside the benchmarked SD-FSMIS, at its resolution: with ``--backbone`` the backbone's
    DINOv2 (+ our DPL weights: ``--dpl-checkpoint``, or a ``--checkpoint`` folder holding them),
    otherwise a copy of the random DINOv2 of ``--shape`` and a random head seeded with 0."""
    if args.variants is not None:
        config.dpl.variants = args.variants
    if args.dpl_image_size is not None:
        config.dpl.image_size = args.dpl_image_size
    patch = sdfsmis.dinov2.config.patch_size
    if config.dpl.variants < 1 or config.dpl.image_size < patch or config.dpl.image_size % patch:
        raise ValueError(
            f"DPL needs --variants >= 1 and a --dpl-image-size that is a multiple of DINOv2's patch ({patch}), "
            f"not K = {config.dpl.variants}, image size {config.dpl.image_size}"
        )
    resolution = config.model.resolution
    if args.backbone:
        checkpoint = args.dpl_checkpoint
        if checkpoint is None and args.checkpoint and (Path(args.checkpoint) / DPL.weights_name).is_file():
            checkpoint = args.checkpoint
        args.dpl_checkpoint = checkpoint
        return DPL.from_backbone(args.backbone, config.dpl, resolution, checkpoint, device).eval()
    torch.manual_seed(0)
    return DPL(copy.deepcopy(sdfsmis.dinov2), config.dpl, resolution).to(device).eval()


def bench_dpl_inference(
    sdfsmis: SDFSMIS, dpl: DPL, config: SDFSMISConfig, args: argparse.Namespace, options: InferenceOptions
) -> dict:
    """DPL and SD-FSMIS (our accelerated pipeline) on the same query slices and supports, repeats
    interleaved (SD-FSMIS, DPL, SD-FSMIS, DPL ...) so that both see the same load; seconds per
    slice include each method's support encoding, amortised over the query slices. DPL's timed
    (batched) probabilities are checked against the model's own ``segment`` slice by slice."""
    device = dpl.device
    inputs = make_inputs(config.model.resolution, args.slices, args.supports)
    warm = inputs if args.compile else make_inputs(config.model.resolution, min(args.batch_size, args.slices), 1)
    for model in (sdfsmis, dpl):
        accelerate(model, options)
    for _ in range(args.warmup):
        for model in (sdfsmis, dpl):
            our_inference(model, warm, args.batch_size, options)
    runs: dict[str, list] = {"sdfsmis": [], "dpl": []}
    for _ in range(args.repeats):
        runs["sdfsmis"].append(our_inference(sdfsmis, inputs, args.batch_size, options))
        runs["dpl"].append(our_inference(dpl, inputs, args.batch_size, options))

    result: dict = {}
    for name, method_runs in runs.items():
        totals = [(support + query).wall for support, query, _ in method_runs]
        median = totals.index(statistics.median_low(totals))
        result[f"{name}_s_per_slice"] = round(statistics.median(totals) / args.slices, 5)
        result[f"{name}_support_s"] = round(method_runs[median][0].wall, 4)
        result[f"{name}_query_s_per_slice"] = round(method_runs[median][1].wall / args.slices, 5)
        if device.type == "cpu":
            cpu = statistics.median((support + query).cpu for support, query, _ in method_runs)
            result[f"{name}_cpu_s_per_slice"] = round(cpu / args.slices, 5)
    result["dpl_speedup"] = round(result["sdfsmis_s_per_slice"] / result["dpl_s_per_slice"], 3)
    if device.type == "cpu":
        result["dpl_speedup_cpu_time"] = round(result["sdfsmis_cpu_s_per_slice"] / result["dpl_cpu_s_per_slice"], 3)

    timed = runs["dpl"][0][2]
    with torch.inference_mode(), options.autocast(device):
        support = dpl.encode_support(inputs.support_images.to(device), inputs.support_masks.to(device))
        direct = torch.cat(
            [
                dpl.segment(support, inputs.queries[i : i + 1].to(device), inputs.index[i : i + 1].to(device)).float()
                for i in range(args.slices)
            ]
        ).cpu()
    check = agreement(direct, timed, config.inference.threshold, FENCE[options.resolved_precision(device)])
    threshold = config.inference.threshold
    result.update(
        supports_used=int(inputs.support_images.shape[0]),
        dpl_masks_agree=check["masks_agree"],
        dpl_mask_dice_vs_direct=check["mask_dice"],
        dpl_max_probability_difference_vs_direct=check["max_probability_difference"],
        dpl_foreground_fraction=round(float((timed >= threshold).float().mean()), 6),
        dpl_probability_mean_per_slice=[round(float(v), 6) for v in timed.mean(dim=(1, 2, 3))],
        sdfsmis_foreground_fraction=round(float((runs["sdfsmis"][0][2] >= threshold).float().mean()), 6),
    )
    return result


def bench_dpl_training(model: DPL, config: SDFSMISConfig, args: argparse.Namespace) -> dict:
    """Iterations per second of DPL's training step (:func:`~sdfsmis.trainer.train_step`, batch 1,
    episodes from DataLoader workers, as ``sdfsmis train --method dpl`` runs it)."""
    model.train()
    seconds, peak = _time_our_training(model, training_sampler(config), config, args)
    return {
        "dpl_it_per_s": round(args.train_steps / seconds, 4),
        "dpl_train_peak_memory_gb": round(peak, 3),
        "peak_memory_kind": "cuda max allocated" if model.device.type == "cuda" else "process max RSS",
        "train_steps": args.train_steps,
        "workers": args.workers,
    }


def run_dpl_bench(args: argparse.Namespace) -> dict:
    """``sdfsmis bench --method dpl``: DPL against SD-FSMIS in one run, on the same inputs."""
    if args.scaling:
        raise ValueError("--scaling times SD-FSMIS alone: run it without --method dpl")
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    options = inference_options(args)
    retain_memory = options.retains_memory(device) and retain_freed_memory()  # process-wide: both methods
    sdfsmis, config = build_model(args, device)
    dpl = build_dpl(args, config, sdfsmis, device)
    args.batch_size = args.batch_size or config.inference.batch_size
    patch = dpl.dinov2.config.patch_size
    result = {
        "method": "dpl",
        "date": datetime.date.today().isoformat(),
        "device": device_description(device),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "shape": "backbone: " + str(args.backbone) if args.backbone else args.shape,
        "dpl_checkpoint": None if args.dpl_checkpoint is None else str(args.dpl_checkpoint),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "resolution": config.model.resolution,
        "variants": config.dpl.variants,
        "image_size": config.dpl.image_size,
        "patch_grid": config.dpl.image_size // patch,
        "dinov2_hidden_size": dpl.dinov2.config.hidden_size,
        "slices": args.slices,
        "supports": args.supports,
        "batch_size": args.batch_size,
        "precision": options.resolved_precision(device),
        "compile": options.compile,
        "retain_freed_memory": retain_memory,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    result.update(bench_dpl_inference(sdfsmis, dpl, config, args, options))
    # the 1-minute load average before and after the timing: above the thread count, other work shared the CPU
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    applies = (
        device.type == "cpu"
        and result["threads"] == 2
        and result["resolution"] == 256
        and result["variants"] == 8
        and result["dinov2_hidden_size"] == 384  # DINOv2-small
    )
    result["targets"] = {
        "dpl_s_per_slice_max": DPL_TARGET_S_PER_SLICE,
        "dpl_speedup_min": DPL_TARGET_SPEEDUP,
        "apply": applies,  # the targets are set for this configuration (2 CPU cores, 256 px, K 8)
        "dpl_s_per_slice_met": result["dpl_s_per_slice"] <= DPL_TARGET_S_PER_SLICE,
        "dpl_speedup_met": result["dpl_speedup"] >= DPL_TARGET_SPEEDUP,
    }
    if args.train:
        del sdfsmis, dpl
        gc.collect()
        sdfsmis, config = build_model(args, device)
        dpl = build_dpl(args, config, sdfsmis, device)  # fresh random head, no inference options applied
        del sdfsmis
        gc.collect()
        result.update(bench_dpl_training(dpl, config, args))
    return result


def format_dpl_table(result: dict) -> str:
    targets = result["targets"]

    def verdict(met: bool) -> str:
        return ("met" if met else "NOT met") + (
            "" if targets["apply"] else " (targets are for 2 CPU threads, 256 px, K 8)"
        )

    rows = [
        ("device", result["device"]),
        ("shape / resolution", f"{result['shape']} / {result['resolution']}"),
        ("query slices / supports / batch", f"{result['slices']} / {result['supports']} / {result['batch_size']}"),
        ("DPL K / DINOv2 input (grid)", f"{result['variants']} / {result['image_size']} ({result['patch_grid']}^2)"),
        ("precision", result["precision"]),
        ("load average before / after", " / ".join(str(v) for v in result["load_average"])),
        ("SD-FSMIS s/slice", f"{result['sdfsmis_s_per_slice']:.4f}"),
        ("  of which supports, once", f"{result['sdfsmis_support_s']:.4f} s"),
        ("DPL s/slice", f"{result['dpl_s_per_slice']:.4f}"),
        ("  of which supports, once", f"{result['dpl_support_s']:.4f} s"),
        ("DPL speed-up", f"{result['dpl_speedup']:.2f}x"),
    ]
    if "dpl_speedup_cpu_time" in result:
        rows.append(
            (
                "CPU seconds/slice SD-FSMIS / DPL",
                f"{result['sdfsmis_cpu_s_per_slice']:.4f} / {result['dpl_cpu_s_per_slice']:.4f} "
                f"({result['dpl_speedup_cpu_time']:.2f}x)",
            )
        )
    rows += [
        (f"target DPL <= {targets['dpl_s_per_slice_max']} s/slice", verdict(targets["dpl_s_per_slice_met"])),
        (f"target speed-up >= {targets['dpl_speedup_min']:.0f}x", verdict(targets["dpl_speedup_met"])),
        (
            "DPL masks = model.segment",
            f"{result['dpl_masks_agree']} (Dice {result['dpl_mask_dice_vs_direct']:.4f}, "
            f"foreground {result['dpl_foreground_fraction']:.3f})",
        ),
    ]
    if "dpl_it_per_s" in result:
        rows += [
            ("train DPL it/s", f"{result['dpl_it_per_s']:.4f}"),
            ("peak memory", f"{result['dpl_train_peak_memory_gb']:.2f} GB ({result['peak_memory_kind']})"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_table(result: dict) -> str:
    rows = [
        ("device", result["device"]),
        ("shape / resolution", f"{result['shape']} / {result['resolution']}"),
        ("query slices / supports / batch", f"{result['slices']} / {result['supports']} / {result['batch_size']}"),
        ("precision (ours)", f"{result['precision']}, channels-last {result['channels_last']}"),
        (
            "reference s/slice (fp32, b1)",
            f"{result['reference_s_per_slice']:.4f} (timed on {result['reference_slices_timed']} slices)",
        ),
        ("ours s/slice", f"{result['ours_s_per_slice']:.4f}"),
        ("  of which supports, once", f"{result['ours_support_s']:.4f} s"),
        ("speed-up", f"{result['speedup']:.2f}x"),
    ]
    if "speedup_cpu_time" in result:
        rows.append(
            (
                "CPU seconds/slice ref / ours",
                f"{result['reference_cpu_s_per_slice']:.4f} / {result['ours_cpu_s_per_slice']:.4f} "
                f"({result['speedup_cpu_time']:.2f}x)",
            )
        )
    rows += [
        (
            "masks agree",
            f"{result['masks_agree']} (Dice {result['mask_dice']:.4f}, max |dp| "
            f"{result['max_probability_difference']:.2e}, foreground {result['foreground_fraction']:.3f})",
        ),
    ]
    if "ours_it_per_s" in result:
        rows += [
            ("train reference it/s", f"{result['reference_it_per_s']:.4f}"),
            ("train ours it/s", f"{result['ours_it_per_s']:.4f}"),
            ("train speed-up", f"{result['train_speedup']:.2f}x"),
            ("peak memory (ours)", f"{result['peak_memory_gb']:.2f} GB ({result['peak_memory_kind']})"),
        ]
    for entry in result.get("scaling", {}).get("slices", []):
        rows.append((f"scaling: {entry['slices']} slices", f"{entry['s_per_slice']:.4f} s/slice"))
    for entry in result.get("scaling", {}).get("resolution", []):
        rows.append((f"scaling: {entry['resolution']}^2", f"{entry['s_per_slice']:.4f} s/slice"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def cmd_bench(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    if args.method == "dpl":
        result = run_dpl_bench(args)
        print(format_dpl_table(result))
    else:
        result = run_bench(args)
        print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.json}", file=sys.stderr)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="time our inference/training against the released pipeline, or DPL against SD-FSMIS"
    )
    bench.add_argument(
        "--method",
        default="sdfsmis",
        choices=["sdfsmis", "dpl"],
        help="sdfsmis: ours against the released pipeline; dpl: DPL against SD-FSMIS on the same inputs",
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--backbone", default=None, help="a backbone directory (default: a random --shape)")
    source.add_argument("--shape", default="tiny", choices=["tiny", "sd15"], help="random weights of this shape")
    bench.add_argument("--checkpoint", default=None, help="our weights, with --backbone")
    bench.add_argument(
        "--dpl-checkpoint", default=None, help="DPL weights, with --backbone (default: --checkpoint's folder's)"
    )
    bench.add_argument("--variants", type=int, default=None, help="DPL's K (default: the preset's)")
    bench.add_argument("--dpl-image-size", type=int, default=None, help="DPL's DINOv2 input (default: the preset's)")
    bench.add_argument("--config", default=None, help="preset name or YAML path, with --backbone")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--slices", type=int, default=90, help="query slices")
    bench.add_argument("--supports", type=int, default=3, help="support slices")
    bench.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    bench.add_argument("--batch-size", type=int, default=None, help="our query batch (default: the preset's)")
    bench.add_argument(
        "--reference-slices", type=int, default=0, help="time the reference on this many of the slices (0: all)"
    )
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    bench.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: as measured")
    bench.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    bench.add_argument(
        "--retain-memory",
        default="auto",
        choices=["auto", "on", "off"],
        help="glibc keeps freed buffers for reuse, both sides (auto: on CPU)",
    )
    bench.add_argument("--vae-batch", type=int, default=0, help="slices per VAE call (0: 1 on CPU, all on CUDA)")
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    bench.add_argument("--scaling", action="store_true", help="also time ours against slices and resolution")
    bench.add_argument("--scaling-slices", type=_ints, default=[1, 8, 32, 90])
    bench.add_argument("--scaling-resolutions", type=_ints, default=[256, 384, 512])
    bench.add_argument("--train", action="store_true", help="also time training steps")
    bench.add_argument("--train-steps", type=int, default=10)
    bench.add_argument("--warmup-steps", type=int, default=2)
    bench.add_argument("--workers", type=int, default=2, help="episode-preparing processes for our training")
    bench.add_argument("--gradient-checkpointing", action="store_true", help="for our training")
    bench.add_argument("--json", default=None, help="write the figures here")
    bench.set_defaults(run=cmd_bench)
