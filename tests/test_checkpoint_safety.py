"""A training process killed while it writes a checkpoint: whatever moment the kill hits, every
checkpoint file a user or ``--resume`` can reach (``last``, ``checkpoints/iter_N``, the published
``OUT/sdfsmis.safetensors``) is a complete one, the previous or the new, never a truncated file;
and training resumes from what is left.

The writer is the product's ``write_checkpoint`` + ``publish`` (what the trainer calls at each
checkpoint), in a subprocess (this file run as a script) with a model large enough (~60 MB per
checkpoint with its optimiser) that the parent sees the write in progress. At each moment the
writer is stopped (SIGSTOP, waited for) and the folder copied as it is: exactly what a SIGKILL
there would leave on disk; the last moment is a real SIGKILL. One writer start serves them all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sdfsmis.io.weights import WEIGHTS_NAME, load_weights, trainable_state_dict
from sdfsmis.methods import OneShotModel, load_model
from sdfsmis.settings import Settings, load_config
from sdfsmis.training.checkpoints import publish, resume, write_checkpoint
from sdfsmis.training.trainer import make_optimizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
#: Moments in the second checkpoint's write, as shares of the bytes the writer writes for it and
#: its publication: weights (~1/4, written at once), optimiser state (~1/2, written progressively),
#: then the published copy (~1/4). After them, a real SIGKILL while the published copy is written.
STOP_AT = (0.1, 0.3, 0.45, 0.6, 0.7)


def _config(backbone: Path) -> Settings:
    """The tiny preset with a wide VTCT MLP, so that one checkpoint takes long enough to write."""
    config = load_config(backbone=backbone)
    config.model.vtct_hidden_dim = 1024
    return config


def _step_to(model: OneShotModel, optimizer: torch.optim.Optimizer, iteration: int) -> None:
    """One optimiser step, then every trainable tensor set to ``iteration``: a checkpoint's
    content says which iteration it is (weights == k, optimiser step count == k)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    with torch.no_grad():
        for tensor in trainable_state_dict(model).values():
            tensor.fill_(iteration)


def _writer(backbone: Path, output: Path) -> None:
    """Checkpoint 1 (written and published), then, on a line on stdin, checkpoint 2."""
    config = _config(backbone)
    model = load_model("sdfsmis", backbone, config)
    optimizer = make_optimizer(model, config.training)
    for iteration in (1, 2):
        if iteration == 2:
            print("ready", flush=True)
            sys.stdin.readline()
        _step_to(model, optimizer, iteration)
        write_checkpoint(output, model, optimizer, {"iteration": iteration})
        publish(output / "last" / WEIGHTS_NAME, output / WEIGHTS_NAME)
    (output / "done").touch()
    sys.stdin.readline()


def _size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    return sum(os.lstat(os.path.join(parent, name)).st_size for parent, _, files in os.walk(folder) for name in files)


def _written(process: subprocess.Popen) -> int:
    """Bytes the process has written so far (write and sendfile calls, whatever file they went to)."""
    for line in Path(f"/proc/{process.pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


class Checker:
    """One model and optimiser of the writer's shape, loaded into from each checkpoint."""

    def __init__(self, backbone: Path):
        config = _config(backbone)
        self.model = load_model("sdfsmis", backbone, config)
        self.optimizer = make_optimizer(self.model, config.training)

    def weights(self, path: Path, iteration: int | None = None) -> int:
        """The weights file loads through the product's loader (every key, every shape) and holds
        one iteration's values throughout; returns that iteration."""
        stored = load_weights(self.model, path)["iteration"]
        assert iteration in (None, stored)
        for name, tensor in trainable_state_dict(self.model).items():
            assert torch.all(tensor == stored), f"{path}: {name} is not iteration {stored}'s"
        return stored

    def resumed(self, output: Path) -> int:
        """``resume`` loads ``last``: weights, optimiser and state of one iteration; returns it."""
        state = resume(output, self.model, self.optimizer)
        assert state is not None, f"{output}: no checkpoint to resume from"
        last = state["iteration"]
        assert all(torch.all(t == last) for t in trainable_state_dict(self.model).values())
        assert _steps(self.optimizer.state_dict()) == {last}
        return last

    def everything(self, output: Path) -> int:
        """``last`` resumes, every checkpoint folder and the published weights are complete;
        returns the iteration ``last`` holds."""
        for folder in (output / "checkpoints").iterdir():
            if folder.name.startswith("iter_") and "." not in folder.name:  # iter_N.partial: work in progress
                number = int(folder.name.removeprefix("iter_"))
                self.weights(folder / WEIGHTS_NAME, number)
                optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
                assert _steps(optimizer) == {number}
                assert json.loads((folder / "state.json").read_text())["iteration"] == number
        if (output / WEIGHTS_NAME).exists():
            self.weights(output / WEIGHTS_NAME)
        return self.resumed(output)

    def resume_and_write(self, output: Path) -> None:
        """Training goes on from ``last``: the next checkpoint is written over what the kill left."""
        last = self.resumed(output)
        _step_to(self.model, self.optimizer, last + 1)
        write_checkpoint(output, self.model, self.optimizer, {"iteration": last + 1})
        publish(output / "last" / WEIGHTS_NAME, output / WEIGHTS_NAME)
        assert self.everything(output) == last + 1
        assert self.weights(output / WEIGHTS_NAME) == last + 1


def _steps(optimizer_state: dict) -> set[int]:
    return {int(s["step"]) for s in optimizer_state["state"].values()}


def _copying(output: Path, size: int) -> bool:
    """A file of ``output`` itself (not a checkpoint folder's) being written: 0 < bytes < ``size``."""
    with os.scandir(output) as entries:
        return any(
            e.is_file(follow_symlinks=False) and 0 < e.stat(follow_symlinks=False).st_size < size for e in entries
        )


def _wait_until(writer: subprocess.Popen, output: Path, written: float) -> None:
    """Until the writer has written ``written`` bytes; fails when it finished or stopped first."""
    deadline = time.monotonic() + 120
    while _written(writer) < written:
        assert not (output / "done").exists(), "the write ended before this moment"
        assert writer.poll() is None and time.monotonic() < deadline, "the writer stopped"
        time.sleep(0.0005)


def _kill_during_writes(tiny_backbone: Path, root: Path) -> list[Path] | None:
    """The folder as left at each STOP_AT moment and after a SIGKILL while the published weights
    are copied; None when that copy (one sendfile call, a few milliseconds) ended unseen."""
    output = root / "ckpt"
    writer = subprocess.Popen(
        [sys.executable, __file__, str(tiny_backbone), str(output)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    moments = []
    try:
        assert writer.stdout.readline().strip() == "ready", "the writer did not write checkpoint 1"
        expected = _size(output / "checkpoints" / "iter_000001") + (output / WEIGHTS_NAME).stat().st_size
        before = _written(writer)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        for share in STOP_AT:
            _wait_until(writer, output, before + share * expected)
            writer.send_signal(signal.SIGSTOP)
            os.waitpid(writer.pid, os.WUNTRACED)  # stopped: nothing more reaches the folder
            moments.append(shutil.copytree(output, root / f"at_{share}", symlinks=True))
            writer.send_signal(signal.SIGCONT)
        published = (output / WEIGHTS_NAME).stat().st_size
        deadline = time.monotonic() + 120
        while not _copying(output, published):
            if (output / "done").exists():
                return None
            assert writer.poll() is None and time.monotonic() < deadline, "the writer stopped"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        moments.append(output)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert not (output / "done").exists(), "killed after the write, not during it"
    return moments


def test_kill_while_writing_a_checkpoint_leaves_complete_checkpoints_and_resumes(tiny_backbone, tmp_path):
    for attempt in range(3):  # the published copy's window is short: look again when it was missed
        moments = _kill_during_writes(tiny_backbone, tmp_path / f"attempt_{attempt}")
        if moments is not None:
            break
    assert moments is not None, "the published copy was never seen in progress"
    checker = Checker(tiny_backbone)
    for folder in moments:
        assert checker.everything(folder) in (1, 2)
        checker.resume_and_write(folder)


if __name__ == "__main__":
    _writer(Path(sys.argv[1]), Path(sys.argv[2]))
