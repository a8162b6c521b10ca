"""``sdfsmis bench --method dpl``: DPL and SD-FSMIS timed on the same inputs in one run, through the
command's entry point in-process (tiny shape), and the DPL masks it times are DPL's own."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sdfsmis.bench.common import make_inputs
from sdfsmis.cli import main
from sdfsmis.methods import DPL
from sdfsmis.samples.tiny_backbone import build_backbone
from sdfsmis.settings import load_config

SLICES, SUPPORTS = 4, 2


def run_dpl_bench(tmp_path, capsys, *args: str) -> tuple[dict, str, float, float]:
    """(the JSON, stdout, wall and CPU seconds of the whole command measured here, around it)."""
    out = tmp_path / "bench.json"
    common = ("--method", "dpl", "--shape", "tiny", "--slices", str(SLICES), "--supports", str(SUPPORTS))
    # no --threads and no retained memory: both would change this (pytest's) process for good
    started, started_cpu = time.perf_counter(), time.process_time()
    main(["bench", *common, "--repeats", "1", "--retain-memory", "off", *args, "--json", str(out)])
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return json.loads(out.read_text()), capsys.readouterr().out, wall, cpu


def direct_dpl_probabilities(variants: int, image_size: int) -> torch.Tensor:
    """The same random tiny DPL built by hand (the tiny DINOv2 of the preset, head seeded with 0),
    segmenting the bench's slices one at a time."""
    config = load_config("tiny")
    config.dpl.variants, config.dpl.image_size = variants, image_size
    _, _, dinov2 = build_backbone(config.tiny_backbone)
    torch.manual_seed(0)
    model = DPL(dinov2, config.dpl, config.model.resolution).eval()
    inputs = make_inputs(config.model.resolution, SLICES, SUPPORTS)
    with torch.inference_mode():
        support = model.encode_support(inputs.support_images, inputs.support_masks)
        return torch.cat(
            [model.segment(support, inputs.queries[i : i + 1], inputs.index[i : i + 1]) for i in range(SLICES)]
        )


def test_bench_dpl_times_both_methods_and_dpl_training(tmp_path, capsys):
    result, stdout, wall, cpu = run_dpl_bench(
        tmp_path, capsys, "--train", "--train-steps", "1", "--warmup-steps", "1", "--workers", "0"
    )
    assert result["method"] == "dpl" and result["shape"] == "tiny" and result["device"].startswith("cpu")
    assert result["cpu_model"] and result["threads"] == torch.get_num_threads() and result["date"]
    assert len(result["load_average"]) == 2
    assert (result["slices"], result["supports"], result["supports_used"]) == (SLICES, SUPPORTS, SUPPORTS)
    preset = load_config("tiny")
    assert result["variants"] == preset.dpl.variants == 8 and result["image_size"] == preset.dpl.image_size
    assert result["resolution"] == preset.model.resolution
    for key in ("dpl_s_per_slice", "sdfsmis_s_per_slice", "dpl_speedup", "dpl_support_s", "dpl_it_per_s"):
        assert result[key] > 0, key
    # the figures against this test's own clocks: with one repeat, each method's seconds per slice x
    # the slices is one timed run; the two runs and the timed training step are disjoint stretches
    # of the command, so together they fit in its wall (and CPU) time measured around it, whatever
    # the machine. Each figure is taken at the low end of its rounding (s/slice: 5 decimals, it/s: 4)
    low = 5e-6
    timed = (result["sdfsmis_s_per_slice"] + result["dpl_s_per_slice"] - 2 * low) * SLICES
    assert timed + 1 / (result["dpl_it_per_s"] + 5e-5) <= wall, (timed, wall)
    assert (result["sdfsmis_cpu_s_per_slice"] + result["dpl_cpu_s_per_slice"] - 2 * low) * SLICES <= cpu
    for method in ("sdfsmis", "dpl"):  # one run: its supports once, then its query slices
        whole = result[f"{method}_support_s"] + result[f"{method}_query_s_per_slice"] * SLICES
        # rounding: support 4 decimals (5e-5), the per-slice figures 5 decimals (5e-6 x 4 slices each)
        assert whole == pytest.approx(result[f"{method}_s_per_slice"] * SLICES, abs=5e-5 + 2 * SLICES * low), method
    # what the speed-up means: SD-FSMIS's time over DPL's (of the figures above, rounded to 3 decimals)
    assert result["dpl_speedup"] == pytest.approx(result["sdfsmis_s_per_slice"] / result["dpl_s_per_slice"], abs=5e-4)
    assert result["targets"]["apply"] is False  # tiny, 64 px: not the configuration the targets are set for

    # the timed (batched) DPL masks are what DPL computes, slice by slice, on the same inputs
    assert result["dpl_masks_agree"] is True and result["dpl_mask_dice_vs_direct"] == 1.0
    direct = direct_dpl_probabilities(8, preset.dpl.image_size)
    # batched against one slice at a time: the same fp32 sums in another order (~1e-6 per pixel), the
    # bench's rounding to 6 decimals (5e-7); a mask may differ only at pixels that close to 0.5:
    # 1e-3 of the 4 x 64 x 64 pixels is 16 of them
    assert result["dpl_probability_mean_per_slice"] == pytest.approx(direct.mean(dim=(1, 2, 3)).tolist(), abs=1e-5)
    assert 0 < result["dpl_foreground_fraction"] < 1  # a real mask, not all or nothing
    assert result["dpl_foreground_fraction"] == pytest.approx(float((direct >= 0.5).float().mean()), abs=1e-3)
    for row in ("SD-FSMIS s/slice", "DPL s/slice", "DPL speed-up", "target DPL <= 0.5 s/slice", "train DPL it/s"):
        assert row in stdout, row


def test_bench_dpl_overrides_variants_and_image_size(tmp_path, capsys):
    result, *_ = run_dpl_bench(tmp_path, capsys, "--variants", "3", "--dpl-image-size", "32", "--warmup", "0")
    assert (result["variants"], result["image_size"], result["patch_grid"]) == (3, 32, 8)
    direct = direct_dpl_probabilities(3, 32)
    assert result["dpl_probability_mean_per_slice"] == pytest.approx(direct.mean(dim=(1, 2, 3)).tolist(), abs=1e-5)
    assert result["dpl_probability_mean_per_slice"] != pytest.approx(
        direct_dpl_probabilities(8, 64).mean(dim=(1, 2, 3)).tolist(), abs=1e-5
    )


def test_bench_dpl_rejects_an_image_size_off_the_patch_grid(tmp_path, capsys):
    with pytest.raises(SystemExit, match="multiple of DINOv2's patch"):
        run_dpl_bench(tmp_path, capsys, "--dpl-image-size", "30")
