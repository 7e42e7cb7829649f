"""Rank failure and resume: torchrun --max-restarts=1, a worker SIGKILLed mid-run."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def torchrun(tmp_path, name, *extra):
    directory, out = tmp_path / name, tmp_path / f"{name}.pt"
    directory.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", str(ROOT / "tests" / "resume_worker.py"), str(directory), str(out),
         *extra],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=True), proc.stderr


def test_sigkilled_worker_restarts_from_checkpoint_and_matches(tmp_path):
    clean, _ = torchrun(tmp_path, "clean")
    killed, log = torchrun(tmp_path, "killed", "25")
    assert clean["attempt"] == 0 and clean["resumed_from"] == 0
    # rank 1 died at step 25 (exit by signal 9); both ranks came back from the step-20 checkpoint
    assert "exitcode: -9" in log, log[-3000:]
    assert killed["attempt"] == 1 and killed["resumed_from"] == 20
    # every step's loss and the final weights are those of the uninterrupted run, bit for bit
    # (gloo's CPU reductions, the codec's generators and the data order are all restored)
    assert killed["losses"] == clean["losses"] and len(clean["losses"]) == 40
    assert all(torch.equal(a, b) for a, b in zip(killed["params"], clean["params"]))
    assert abs(clean["density"] - 0.2) < 0.01  # it ended in an AC/DC sparse phase
