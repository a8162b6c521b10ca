"""DPL against SD-FSMIS (``sdfsmis bench --method dpl``): the second method timed against ours,
as above, in one run, on the same query slices and supports at the same resolution: seconds per
slice of each with its support encoding amortised over the query slices, DPL's speed-up, a check
that the timed DPL masks are the model's own slice-by-slice ``segment``, and with ``--train``
DPL's training iterations per second."""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
from pathlib import Path
from typing import cast

import torch

from sdfsmis.bench.common import (
    FENCE,
    agreement,
    build_model,
    cpu_model,
    inference_options,
    make_inputs,
    our_inference,
    run_facts,
    table,
    time_our_training,
    training_sampler,
)
from sdfsmis.memory import retain_freed_memory
from sdfsmis.methods import DPL, SDFSMIS, load_model
from sdfsmis.pipeline.acceleration import InferenceOptions, accelerate
from sdfsmis.settings import Settings

#: Issue 14's targets for DPL, at the DINOv2-small shape, 256 px slices, K = 8, on 2 CPU cores.
DPL_TARGET_S_PER_SLICE = 0.5
DPL_TARGET_SPEEDUP = 20.0


def build_dpl(args: argparse.Namespace, config: Settings, sdfsmis: SDFSMIS, device: torch.device) -> DPL:
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
        return cast(DPL, load_model(DPL.method, args.backbone, config, checkpoint, device)).eval()
    torch.manual_seed(0)
    return DPL(copy.deepcopy(sdfsmis.dinov2), config.dpl, resolution).to(device).eval()


def bench_dpl_inference(
    sdfsmis: SDFSMIS, dpl: DPL, config: Settings, args: argparse.Namespace, options: InferenceOptions
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
    runs: dict[str, list] = {SDFSMIS.method: [], DPL.method: []}
    for _ in range(args.repeats):
        runs[SDFSMIS.method].append(our_inference(sdfsmis, inputs, args.batch_size, options))
        runs[DPL.method].append(our_inference(dpl, inputs, args.batch_size, options))

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

    timed = runs[DPL.method][0][2]
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
        sdfsmis_foreground_fraction=round(float((runs[SDFSMIS.method][0][2] >= threshold).float().mean()), 6),
    )
    return result


def bench_dpl_training(model: DPL, config: Settings, args: argparse.Namespace) -> dict:
    """Iterations per second of DPL's training step (:func:`~sdfsmis.training.trainer.train_step`,
    ``--train-batch-size`` episodes from DataLoader workers, as ``sdfsmis train --method dpl`` runs it)."""
    model.train()
    seconds, peak = time_our_training(model, training_sampler(config), config, args)
    return {
        "dpl_it_per_s": round(args.train_steps / seconds, 4),
        "dpl_train_peak_memory_gb": round(peak, 3),
        "peak_memory_kind": "cuda max allocated" if model.device.type == "cuda" else "process max RSS",
        "train_steps": args.train_steps,
        "train_batch_size": args.train_batch_size,
        "workers": args.workers,
    }


def run_dpl_bench(args: argparse.Namespace) -> dict:
    """``sdfsmis bench --method dpl``: DPL against SD-FSMIS in one run, on the same inputs."""
    if args.scaling:
        raise ValueError(f"--scaling times SD-FSMIS alone: run it without --method {DPL.method}")
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
        "method": DPL.method,
        **run_facts(args, config, device, options, retain_memory),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "dpl_checkpoint": None if args.dpl_checkpoint is None else str(args.dpl_checkpoint),
        "variants": config.dpl.variants,
        "image_size": config.dpl.image_size,
        "patch_grid": config.dpl.image_size // patch,
        "dinov2_hidden_size": dpl.dinov2.config.hidden_size,
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
    """The figures a reader compares, one row each, from :func:`run_dpl_bench`'s result."""
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
            (f"train DPL it/s (batch {result['train_batch_size']})", f"{result['dpl_it_per_s']:.4f}"),
            ("peak memory", f"{result['dpl_train_peak_memory_gb']:.2f} GB ({result['peak_memory_kind']})"),
        ]
    return table(rows)
