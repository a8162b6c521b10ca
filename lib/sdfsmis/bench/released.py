"""Ours against the released pipeline (``sdfsmis bench``): our inference (and training) against
what the released code computes, in one run, on the same inputs and the same weights: seconds per
query slice (medians of repeats after warm-up), the speed-up, whether both sides give the same
masks, and optionally training iterations per second and how inference scales with the number of
query slices and with the resolution.

The reference (:mod:`sdfsmis.methods.sdfsmis.reference`) does per query slice what the released
code does: encode the support image and mask, DINOv2 token, support UNet pass into a K/V bank,
encode the query, query UNet pass, decode; batch 1, fp32, the result copied to the host slice by
slice. Ours encodes each support once (its K/V cached), runs the query slices in batches under the
device's :class:`~sdfsmis.pipeline.acceleration.InferenceOptions` and copies the result back once.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import numpy as np
import torch

from sdfsmis.bench.common import (
    FENCE,
    BenchInputs,
    Timing,
    agreement,
    build_model,
    inference_options,
    make_inputs,
    our_inference,
    peak_memory_gb,
    run_facts,
    table,
    time_our_training,
    timed,
    training_sampler,
)
from sdfsmis.memory import retain_freed_memory
from sdfsmis.methods import SDFSMIS
from sdfsmis.methods.sdfsmis.reference import kv_bank, released_segment_slice, released_training_step
from sdfsmis.pipeline.acceleration import InferenceOptions, accelerate
from sdfsmis.settings import Settings


def make_plain(model: SDFSMIS) -> None:
    """Undo :func:`~sdfsmis.pipeline.acceleration.accelerate` (but ``compile``): the model as loaded."""
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
                timing, out = timed(lambda i=i: one(i), device)
                times.append(timing)
                if repeat == 0:
                    probability.append(out)
    return times, torch.cat(probability)


def reference_subset(slices: int, count: int) -> list[int]:
    """``count`` query slices spread evenly over all ``slices`` (0: all). The reference segments
    every slice independently, with the same shapes and the same work, so its seconds per slice
    can be measured on a subset; on a CPU that turns an hour of reference into minutes."""
    if count <= 0 or count >= slices:
        return list(range(slices))
    return sorted({int(i) for i in np.linspace(0, slices - 1, count).round()})


def bench_inference(model: SDFSMIS, config: Settings, args: argparse.Namespace, options: InferenceOptions) -> dict:
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


def bench_scaling(model: SDFSMIS, config: Settings, args: argparse.Namespace, options: InferenceOptions) -> dict:
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


def bench_training(model: SDFSMIS, config: Settings, args: argparse.Namespace) -> dict:
    """Iterations per second of our training step and, at batch 1, of the released one (it takes one
    episode per step), on the same episodes.

    Ours: :func:`~sdfsmis.training.trainer.train_step` (bf16 autocast and fused AdamW on CUDA, support and
    query in one UNet batch, episodes from DataLoader workers, no host sync per step). Reference:
    :func:`~sdfsmis.methods.sdfsmis.reference.released_training_step` (fp32, two UNet passes through the K/V bank,
    stock AdamW, the episode prepared in the loop, ``loss.item()`` every step).
    """
    from sdfsmis.training.trainer import step_generator

    device, cfg = model.device, config.training
    sampler = training_sampler(config)
    total = args.warmup_steps + args.train_steps
    model.train()

    ours_s, peak = time_our_training(model, sampler, config, args)  # first: the CPU peak RSS is ours
    result = {
        "ours_it_per_s": round(args.train_steps / ours_s, 4),
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": "cuda max allocated (ours)" if device.type == "cuda" else "process max RSS after ours",
        "train_steps": args.train_steps,
        "train_batch_size": args.train_batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "workers": args.workers,
    }
    if args.train_batch_size != 1:
        return result
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
        timing, _ = timed(lambda: reference(range(args.warmup_steps, total)), device)
    reference_s = timing.wall
    result["reference_it_per_s"] = round(args.train_steps / reference_s, 4)
    result["train_speedup"] = round(reference_s / ours_s, 3)
    if device.type == "cuda":
        result["reference_peak_memory_gb"] = round(peak_memory_gb(device), 3)
    return result


def run_bench(args: argparse.Namespace) -> dict:
    """``sdfsmis bench``: the released pipeline and ours in one run, on the same inputs and weights."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    options = inference_options(args)
    # process-wide, so set before anything runs: the reference gets it too
    retain_memory = options.retains_memory(device) and retain_freed_memory()
    model, config = build_model(args, device)
    args.batch_size = args.batch_size or config.inference.batch_size
    result = run_facts(args, config, device, options, retain_memory)
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


def format_table(result: dict) -> str:
    """The figures a reader compares, one row each, from :func:`run_bench`'s result."""
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
    if "reference_it_per_s" in result:
        rows += [
            ("train reference it/s", f"{result['reference_it_per_s']:.4f}"),
            ("train speed-up", f"{result['train_speedup']:.2f}x"),
        ]
    if "ours_it_per_s" in result:
        rows += [
            (f"train ours it/s (batch {result['train_batch_size']})", f"{result['ours_it_per_s']:.4f}"),
            ("peak memory (ours)", f"{result['peak_memory_gb']:.2f} GB ({result['peak_memory_kind']})"),
        ]
    for entry in result.get("scaling", {}).get("slices", []):
        rows.append((f"scaling: {entry['slices']} slices", f"{entry['s_per_slice']:.4f} s/slice"))
    for entry in result.get("scaling", {}).get("resolution", []):
        rows.append((f"scaling: {entry['resolution']}^2", f"{entry['s_per_slice']:.4f} s/slice"))
    return table(rows)
