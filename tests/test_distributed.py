"""Data-parallel training with two CPU processes (gloo), set up as torchrun sets it up: the
ranks train on different episodes, stay identical, and take exactly the step of one process
that averages the two ranks' gradients; rank 0 alone writes logs and checkpoints. SD-FSMIS and
DPL, one after the other in the same two processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sdfsmis.io.weights import save_weights, trainable_state_dict
from sdfsmis.samples.synthetic import make_studies
from sdfsmis.settings import load_config
from sdfsmis.training.trainer import Trainer, TrainingRun, step_generator

ITERATIONS = 3
WORLD = 2


def _run(backbone: Path, images: list[Path], output: Path, method: str) -> TrainingRun:
    config = load_config(backbone=backbone)
    # whole-slice episodes: the tolerances below were measured on them; zoomed crops change only the
    # episodes (the same sampler code on every rank), and make DPL's mathematically zero gradients
    # (see below) round to > 1e-6, where the test could no longer tell them from real ones
    config.training.zoom_episodes = False
    config.training.checkpoint_every = ITERATIONS
    config.training.validation_episodes = 2
    return TrainingRun(
        backbone, images, output, config, iterations=ITERATIONS, use_labels=False, progress=False, method=method
    )


METHODS = ("sdfsmis", "dpl")


def _rank(rank: int, port: int, backbone: Path, images: list[Path], output: Path, results: Path) -> None:
    """One torchrun-like worker: the environment torchrun would give, then the real trainer, for
    each method in turn (one process group: the spawn and imports are paid once)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    for method in METHODS:
        trainer = Trainer(_run(backbone, images, output / method, method))
        summary = trainer.fit()
        save_weights(trainer.model, results / method / f"rank{rank}.safetensors")
        episode = trainer.sampler.batch(0 * WORLD + rank, 1)
        (results / method / f"rank{rank}.json").write_text(
            json.dumps({"world_size": summary["world_size"], "first_query_sum": float(episode.query_image.sum())})
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _averaged_steps(backbone: Path, images: list[Path], output: Path, method: str):
    """The expectation, computed in this process: per step, the mean of the two ranks' losses on
    their own episodes and generators, one clipped AdamW step. Returns the trainer, the initial and
    final weights and, per parameter, the largest |gradient| over the steps."""
    single = Trainer(_run(backbone, images, output, method))  # also caches the supervoxels
    cfg = single.run.config.training
    single.model.train()
    initial = {name: value.clone() for name, value in trainable_state_dict(single.model).items()}
    parameters = dict(single.model.named_parameters())
    largest: dict[str, float] = {}
    for iteration in range(ITERATIONS):
        single.optimizer.zero_grad(set_to_none=True)
        losses = [
            single.loss(
                single.sampler.batch(iteration * WORLD + rank, 1),
                step_generator(single.model.device, cfg.seed, iteration, rank, WORLD),
            )["loss"]
            for rank in range(WORLD)
        ]
        (sum(losses) / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(single.model.parameters(), cfg.grad_clip)
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                largest[name] = max(largest.get(name, 0.0), float(parameter.grad.abs().max()))
        single.optimizer.step()
        single.model.after_step()  # as train_step does (DPL: the denoiser EMA)
    return single, initial, trainable_state_dict(single.model), largest


def test_two_process_ddp_equals_averaged_gradient_steps(tiny_backbone, tmp_path):
    images = make_studies(tmp_path / "studies", 2, seed=5, shape=(64, 64, 20))
    results = tmp_path / "results"
    expectations = {m: _averaged_steps(tiny_backbone, images, tmp_path / "single" / m, m) for m in METHODS}
    for method in METHODS:
        (results / method).mkdir(parents=True)
    output = tmp_path / "ddp"
    mp.spawn(_rank, args=(_free_port(), tiny_backbone, images, output, results), nprocs=WORLD, join=True)

    for method, (single, initial, expected, largest) in expectations.items():
        rank0, rank1 = (load_file(results / method / f"rank{rank}.safetensors") for rank in range(WORLD))
        assert rank0.keys() == expected.keys(), method
        for name, value in rank0.items():
            assert torch.equal(value, rank1[name]), f"{method}: ranks diverged at {name}"
            if largest.get(name, 1.0) < 1e-6:
                # a mathematically zero gradient (DPL tiny: the conv bias before a GroupNorm of one
                # channel per group): Adam turns its summation-order rounding into lr-sized steps,
                # so only the ranks' agreement (above) means something
                continue
            # Adam moves each weight by ~lr (1e-3) a step whatever the gradient's size, so a wrong
            # gradient shows everywhere; summation order alone moves a few near-zero-gradient
            # weights by far less (measured: < 1e-4, and > 1e-6 on < 0.1 % of the elements).
            difference = (value - expected[name]).abs()
            assert difference.max() < 2e-4, f"{method}: DDP differs from the averaged step at {name}"
            assert (difference > 1e-5).float().mean() < 0.01, f"{method}: DDP differs from the averaged step at {name}"
        assert any(not torch.equal(rank0[name], initial[name]) for name in initial), method

        infos = [json.loads((results / method / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
        assert [info["world_size"] for info in infos] == [WORLD, WORLD]
        assert infos[0]["first_query_sum"] != infos[1]["first_query_sum"]  # different episodes per rank
        # rank 0 alone wrote the log (one loss record + one validation record), the TensorBoard
        # events and the validation montage, and the checkpoint
        run = output / method
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        assert [record["iteration"] for record in log] == [ITERATIONS, ITERATIONS], method
        assert len(list(run.glob("events.out.tfevents.*"))) == 1 and (run / "validation_montage.png").is_file()
        published = load_file(run / single.model.weights_name)
        assert published.keys() == rank0.keys()
        assert all(torch.equal(value, rank0[name]) for name, value in published.items()), method
