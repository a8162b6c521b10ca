"""The speed work keeps the results: accelerated, batched inference gives the masks of the
released per-slice pipeline, our training step equals the released one, and `sdfsmis bench`
runs end to end and reports what it measured."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch

from sdfsmis.bench.common import FENCE, agreement, make_inputs, our_inference
from sdfsmis.bench.released import reference_inference, reference_subset
from sdfsmis.methods.sdfsmis.model import SDFSMIS
from sdfsmis.methods.sdfsmis.reference import kv_bank, released_training_step
from sdfsmis.pipeline.acceleration import InferenceOptions, accelerate
from sdfsmis.pipeline.segmenter import segment_slices
from sdfsmis.training.trainer import EpisodeLoss, make_optimizer, step_generator, train_step


@pytest.fixture()
def inputs(tiny_config):
    return make_inputs(tiny_config.model.resolution, slices=7, supports=3)


def test_make_inputs_assigns_every_support(inputs):
    assert inputs.support_images.shape[0] == 3
    assert set(inputs.index.tolist()) == {0, 1, 2}
    assert (inputs.support_masks.flatten(1).sum(dim=1) > 0).all()


@pytest.mark.parametrize(
    "options",
    [
        InferenceOptions(),  # what the tiny model gets by default on CPU
        InferenceOptions(channels_last=True, vae_batch=1),  # what the SD1.5 shape gets on CPU
    ],
    ids=["auto", "channels_last_one_slice_vae"],
)
def test_accelerated_batched_inference_equals_released_per_slice(tiny_model, tiny_config, inputs, options):
    _, reference = reference_inference(tiny_model, inputs, repeats=1, warmup=0)
    accelerate(tiny_model, options)
    if options.channels_last:
        assert tiny_model.codec.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    support_s, query_s, ours = our_inference(tiny_model, inputs, batch_size=3, options=options)
    assert support_s.wall > 0 and query_s.wall > 0
    result = agreement(reference, ours, tiny_config.inference.threshold, fence=1e-3)
    assert result["masks_agree"], result
    assert result["max_probability_difference"] < 1e-4
    # a real comparison: the maps are not constant, and a different model would not agree
    assert 0.01 < result["foreground_fraction"] < 0.99
    assert not agreement(reference, 1 - ours, tiny_config.inference.threshold, fence=1e-3)["masks_agree"]


def test_reference_on_a_subset_is_those_slices_of_the_full_reference(tiny_model, inputs):
    subset = reference_subset(7, 3)
    assert subset == [0, 3, 6] and reference_subset(7, 0) == reference_subset(7, 9) == list(range(7))
    times, full = reference_inference(tiny_model, inputs, repeats=1, warmup=0)
    subset_times, part = reference_inference(tiny_model, inputs, repeats=2, warmup=0, slices=subset)
    assert len(times) == 7 and len(subset_times) == 2 * 3
    assert torch.allclose(part, full[subset], atol=1e-6)


RETAINED_HEAP = """
import ctypes, sys, torch
from sdfsmis.memory import retain_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory()
mapped_before = libc.mallinfo2().hblkhd
buffer = torch.ones(64 * 2**20 // 4)  # a 64 MiB activation
mapped_while_alive = libc.mallinfo2().hblkhd - mapped_before
del buffer
print(mapped_while_alive, libc.mallinfo2().fordblks)
"""


@pytest.mark.parametrize("mode", ["default", "retain"])
def test_retain_freed_memory_keeps_large_buffers_in_the_heap(mode):
    """glibc maps a 64 MiB buffer on its own and unmaps it on free; retained, the buffer comes
    from the heap and stays there, free, for the next one."""
    run = subprocess.run([sys.executable, "-c", RETAINED_HEAP, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    mapped, free_in_heap = (int(v) for v in run.stdout.split())
    if mode == "retain":
        assert mapped < 2**20 and free_in_heap >= 64 * 2**20
    else:
        assert mapped >= 64 * 2**20 and free_in_heap < 64 * 2**20


def test_bf16_autocast_stays_within_tolerance(tiny_model, tiny_config):
    """The reduced-precision path (bf16 on CUDA) exercised with CPU autocast.

    bf16 keeps 8 mantissa bits (unit roundoff u = 2^-8): what it guarantees is a small error on
    average, not that no pixel crosses the threshold far from it (which pixel does depends on the
    CPU's kernels and summation order). So the bound is on the mean error (8 u) and on the share
    of pixels that flip outside the fence (0.5 %), never on a single pixel."""
    inputs = make_inputs(tiny_config.model.resolution, slices=3, supports=1)
    _, _, full = our_inference(tiny_model, inputs, 3, InferenceOptions(precision="fp32"))
    _, _, reduced = our_inference(tiny_model, inputs, 3, InferenceOptions(precision="bf16"))
    result = agreement(full, reduced, tiny_config.inference.threshold, FENCE["bf16"])
    unit_roundoff = 2.0**-8
    assert result["max_probability_difference"] > 0  # bf16 really ran
    assert result["mean_probability_difference"] <= 8 * unit_roundoff, result
    assert result["off_fence_fraction"] <= 0.005 and result["mask_dice"] > 0.95, result
    # a real bound: the flipped masks of another model are far outside it
    assert agreement(full, 1 - reduced, tiny_config.inference.threshold, FENCE["bf16"])["off_fence_fraction"] > 0.005


def test_batch_size_does_not_change_probabilities(tiny_model, inputs):
    with torch.inference_mode():
        support = tiny_model.encode_support(inputs.support_images, inputs.support_masks)
        one = segment_slices(tiny_model, support, inputs.queries, inputs.index, batch_size=1)[0]
        five = segment_slices(tiny_model, support, inputs.queries, inputs.index, batch_size=5)[0]
    assert one.shape == inputs.queries.shape
    assert (one - five).abs().max().item() < 1e-5


def test_our_training_step_equals_the_released_one(tiny_backbone, tiny_config):
    """One batch SQI + train_step computes the released two-pass step: same loss, same update."""
    from sdfsmis.training.episodes import Episode

    resolution = tiny_config.model.resolution
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., 16:40, 20:44] = 1
    episode = Episode(
        torch.rand(1, 1, resolution, resolution, generator=g) * 2 - 1,
        mask,
        torch.rand(1, 1, resolution, resolution, generator=g) * 2 - 1,
        torch.roll(mask, 3, dims=-1),
        "supervoxel",
    )
    cfg = tiny_config.training
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(SDFSMIS.from_backbone(tiny_backbone, tiny_config).train())
    ours, released = models
    our_loss = train_step(
        EpisodeLoss(ours), make_optimizer(ours, cfg), episode, step_generator(ours.device, 1, 0), cfg.grad_clip
    )
    optimizer = torch.optim.AdamW(released.parameter_groups(cfg), weight_decay=cfg.weight_decay, betas=cfg.betas)
    with kv_bank(released.unet) as banks:
        released_loss = released_training_step(
            released, banks, optimizer, episode, step_generator(released.device, 1, 0), cfg.grad_clip
        )
    assert abs(our_loss["loss"].item() - released_loss) < 1e-5
    before = SDFSMIS.from_backbone(tiny_backbone, tiny_config).unet.state_dict()
    for name, value in ours.unet.state_dict().items():
        # Adam's first step moves a weight by lr g / (|g| + eps), within lr of where it was, along the
        # gradient's sign, whatever the gradient's size: two gradients that differ only by summation
        # order (another CPU, another thread count) give the same step except where |g| is near eps,
        # and there the steps differ by at most 2 lr (opposite signs). A different gradient would
        # move most weights by ~lr; so: at most 2 lr anywhere, and on under 1 % of the weights
        lr = cfg.lr_unet
        difference = (value - released.unet.state_dict()[name]).abs()
        assert difference.max() <= 2 * lr * (1 + 1e-3) and (difference > 1e-2 * lr).float().mean() < 0.01, name
    assert any(not torch.equal(value, before[name]) for name, value in ours.unet.state_dict().items())


def run_bench_cli(tmp_path, *args: str) -> tuple[dict, str, float, float]:
    """``sdfsmis bench --shape tiny ARGS`` in its own process -> (the JSON, stdout, and the wall and
    CPU seconds of that process measured here, around it)."""
    out = tmp_path / "bench.json"
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", "bench", "--shape", "tiny", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout, wall, cpu


def test_bench_cli_reports_inference_and_training(tmp_path):
    result, stdout, wall, cpu = run_bench_cli(
        tmp_path,
        *("--slices", "5", "--supports", "2", "--repeats", "2", "--reference-slices", "3"),
        *("--train", "--train-steps", "2", "--warmup-steps", "1", "--workers", "1"),
    )
    assert result["shape"] == "tiny" and result["device"].startswith("cpu") and result["torch"] == torch.__version__
    assert result["slices"] == 5 and result["supports_used"] == 2 and result["reference_slices_timed"] == 3
    assert result["retain_freed_memory"] is True  # CPU default, glibc
    for key in ("ours_s_per_slice", "reference_s_per_slice", "ours_it_per_s", "reference_it_per_s", "peak_memory_gb"):
        assert result[key] > 0, key
    # the figures against this test's own clocks. Timed, in disjoint stretches of the command: 2 x 3
    # reference slices (their median, so at least 3 of them take that long or more), our 2 runs of 5
    # slices (their median is their mean) and the 2 + 2 timed training steps; all of it fits in the
    # command's wall time measured around it, whatever the machine. Each figure is taken at the low
    # end of its rounding (s/slice: 5 decimals, it/s: 4)
    low = 5e-6
    inference = 3 * (result["reference_s_per_slice"] - low) + 2 * 5 * (result["ours_s_per_slice"] - low)
    training = 2 / (result["ours_it_per_s"] + 5e-5) + 2 / (result["reference_it_per_s"] + 5e-5)
    assert inference + training <= wall, (inference, training, wall)
    assert 3 * (result["reference_cpu_s_per_slice"] - low) + 10 * (result["ours_cpu_s_per_slice"] - low) <= cpu
    # the supports and queries of our faster run (the lower median) make at most the median time
    run = result["ours_support_s"] + 5 * result["ours_query_s_per_slice"]
    assert run <= 5 * result["ours_s_per_slice"] + 5e-5 + 5 * 2 * low
    # what the speed-up means: the reference's time over ours, from the unrounded figures
    ref, ours = result["reference_s_per_slice"], result["ours_s_per_slice"]
    assert (ref - low) / (ours + low) - 5e-4 <= result["speedup"] <= (ref + low) / (ours - low) + 5e-4
    assert result["masks_agree"] is True and result["mask_dice"] > 0.99
    assert "speed-up" in stdout and "masks agree" in stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_inference_gives_the_released_masks(tmp_path):
    """``--compile`` (torch.compile of the UNet, through the SQI processor, and the VAE decoder)."""
    result, *_ = run_bench_cli(tmp_path, "--slices", "5", "--supports", "2", "--repeats", "1", "--compile")
    assert result["compile"] is True
    assert result["masks_agree"] is True and result["max_probability_difference"] < 1e-4
