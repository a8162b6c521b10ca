"""A running train task reports its progress the way MONAI Label's clients read it, through the
REAL server: ``GET /train/`` (and ``?check_if_running=true``, OHIF's call) returns the task record
whose ``details`` carry progress lines (iteration out of the total, it/s, loss, validation Dice,
ETA), and ``train_stats`` in ``/info/`` carries ``epoch``/``total_epochs``/``best_metric``/
``current_time``, then ``total_time``, the keys Slicer's MONAI Label module and OHIF's panel draw
their training and accuracy bars from."""

from __future__ import annotations

import json
import re
import time

import requests
from monailabel.client.client import MONAILabelClient

from app_server import monailabel_server
from sdfsmis.samples.synthetic import make_studies

SHAPE = (48, 48, 16)
TOTAL = 100  # long enough (seconds on 2 cores) for several polls to catch it running
EVERY = 50
LINE = re.compile(r"dpl training: iteration (\d+)/(\d+) \((\d+)%\)")


def _seconds(clock: str) -> int:
    """H:MM:SS -> seconds."""
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return 3600 * hours + 60 * minutes + seconds


def _progress(details: list[str]) -> list[tuple[int, int, str]]:
    """(iteration, total, line) of each progress line, in the order the task wrote them."""
    found = []
    for line in details:
        if match := LINE.search(line):
            done, total, percent = (int(g) for g in match.groups())
            assert percent == 100 * done // total, line  # the percentage says the same as the counts
            found.append((done, total, line))
    return found


def _record(line: str) -> dict:
    """A details line that is a JSON object (the trainer prints one per validation), else {}."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def test_running_train_task_reports_iterations_of_the_total_to_monai_label_clients(tiny_backbone, tmp_path):
    make_studies(tmp_path / "studies", 3, seed=70, shape=SHAPE)
    conf = [("backbone", tiny_backbone), ("model_dir", tmp_path / "model"), ("device", "cpu")]
    # stdout buffered as on a user's machine (an empty PYTHONUNBUFFERED is unset), not line by line as here
    with monailabel_server(tmp_path / "studies", tmp_path / "server.log", *conf, env={"PYTHONUNBUFFERED": ""}) as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        posted = time.monotonic()
        client.train_start("dpl", {"iterations": TOTAL, "checkpoint_every": EVERY})
        latest: list[int] = []  # the newest progress line's iteration at each poll while running
        epochs: list[int] = []  # train_stats.dpl.epoch at each poll while running
        lines: dict[int, str] = {}
        validated: set[int] = set()  # iterations whose validation record showed in the details while running
        checked_running = False
        deadline = time.time() + 240
        while (task := client.train_status()).get("status") in ("SUBMITTED", "RUNNING"):
            assert time.time() < deadline, task
            train_stats = client.info()["train_stats"]
            stats = train_stats.get("dpl", {})
            progress = _progress(task.get("details") or [])
            if task["status"] != "RUNNING" or stats.get("status") != "RUNNING" or not progress:
                time.sleep(0.1)
                continue
            assert next(iter(train_stats)) == "dpl", list(train_stats)  # the viewers draw the first trainer's
            assert all(total == TOTAL for _, total, _ in progress), progress
            assert [done for done, _, _ in progress] == sorted(done for done, _, _ in progress), progress
            latest.append(progress[-1][0])
            lines.update((done, line) for done, _, line in progress)
            # Slicer's and OHIF's bar: epoch/total_epochs, only while total_time is absent
            assert stats["total_epochs"] == TOTAL and "total_time" not in stats, stats
            assert stats["epoch"] == stats["iteration"] and 0 <= stats["epoch"] <= TOTAL, stats
            _seconds(stats["current_time"])
            if "it_per_s" in stats:  # the ETA is what is left at the mean rate so far
                assert abs(stats["eta_s"] - (TOTAL - stats["iteration"]) / stats["it_per_s"]) <= 0.1, stats
            epochs.append(stats["epoch"])
            validated.update(  # the trainer's validation records reach the details while it still trains
                record["iteration"]
                for record in map(_record, task["details"])
                if "val_dice" in record and progress[-1][0] < TOTAL
            )
            if not checked_running and 0 < progress[-1][0] < TOTAL:  # OHIF's call answers the same record
                running = requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=10)
                assert running.status_code == 200 and running.json()["id"] == task["id"], running.text
                assert _progress(running.json()["details"]), running.json()
                assert client.train_status(check_if_running=True) is True
                checked_running = True
            time.sleep(0.2)
        observed = time.monotonic() - posted
        assert task["status"] == "DONE", task

        # while it ran, the clients saw the count climb through the total, never back
        assert latest == sorted(latest) and epochs == sorted(epochs), (latest, epochs)
        assert len({d for d in latest if 0 < d < TOTAL}) >= 2, latest
        assert len({e for e in epochs if 0 < e < TOTAL}) >= 2, epochs
        assert checked_running and EVERY in validated, validated
        for done, line in lines.items():
            if done:
                assert " it/s, loss " in line and ", ETA " in line, line
            if done >= EVERY:  # validated at EVERY: the line carries the validation Dice
                assert ", val Dice " in line, line

        # at the end: the total, the best validation Dice the trainer logged, the time taken
        final = _progress(task["details"])
        assert final[-1][:2] == (TOTAL, TOTAL) and "(100%)" in final[-1][2], task["details"]
        stats = client.info()["train_stats"]["dpl"]
        assert stats["status"] == "DONE" and stats["iteration"] == stats["total_iterations"] == TOTAL, stats
        assert stats["epoch"] == stats["total_epochs"] == TOTAL and stats["eta_s"] == 0, stats
        log = [json.loads(row) for row in (tmp_path / "model" / "train_dpl" / "train_log.jsonl").open()]
        validations = [row["val_dice"] for row in log if "val_dice" in row]
        assert len(validations) == TOTAL // EVERY and stats["best_metric"] == max(validations), (stats, log)
        assert "current_time" not in stats and 0 <= _seconds(stats["total_time"]) <= observed + 1, stats
        assert stats["start_ts"] <= time.time() and {"pid", "started", "checkpoint", "skipped"} <= set(stats)
