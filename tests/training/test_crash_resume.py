"""A run killed at any moment (SIGKILL: mid-epoch, while writing its state or its model) resumes to
exactly the uninterrupted run's log, metrics and weights, and leaves no temporary file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]


def worker(out: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    env.pop("PLMETRIC_FAULT", None)
    if fault:
        env["PLMETRIC_FAULT"] = fault
    return subprocess.run(
        [sys.executable, str(TESTS / "train_worker.py"), str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "uninterrupted"
    done = worker(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# tiny_splits: 40 training images, batch 10 -> 4 steps per epoch: step@6 is mid-epoch 2; write:X@1 is in epoch 1
# (log.jsonl@1 before any state exists: --resume then starts the run again), @2 in epoch 2.
@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "step@6",
        "write:state.pt@1",
        "write:state.pt@2",
        "write:model.safetensors@2",
        "write:log.jsonl@1",
        "write:log.jsonl@2",
        "write:summary.json@1",
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, reference, fault):
    run = tmp_path / "run"
    killed = worker(run, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    resumed = worker(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert without_timing(log(run)) == without_timing(log(reference))  # each epoch once, same numbers
    assert [r["epoch"] for r in log(run)] == [1, 2, 3]
    for name in ("model.safetensors", "best.safetensors", "selected.safetensors"):
        got, want = load_file(str(run / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for key in want:
            assert (got[key] == want[key]).all(), (name, key)
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary == expected
    assert not list(run.glob(".*.tmp")), list(run.glob(".*"))
