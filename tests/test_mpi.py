"""The mpi4py front end under real `mpirun` ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mpi_worker.py")


def mpi_unavailable():
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'commpress[mpi]')"
    return None


REASON = mpi_unavailable()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("np_", [2, 4])
def test_mpi_allreduce_every_codec_and_training(np_, tmp_path):
    out = tmp_path / "mpi.json"
    env = {**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
                           sys.executable, str(WORKER), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == np_
    for name, entry in result["codecs"].items():
        for collective, r in entry.items():
            assert r["same_on_all_ranks"], (name, collective)
            # half-precision sums travel as fp32 over Open MPI (no fp16/bf16 reductions)
            expected = r["model"] * (2 if name in ("fp16", "bf16") else 1)
            if r["variable_length"]:  # the model counts its bound; payloads are smaller
                assert 0 < r["sent"] < 0.7 * expected, (name, collective, r)
            else:
                assert r["sent"] == pytest.approx(expected, rel=0.02, abs=8), (name, collective, r)
            if name == "identity":
                assert r["max_err"] < 1e-6
            elif name in ("fp16", "bf16"):
                assert r["max_err"] < 0.05
            else:
                assert r["max_z"] < 5, (name, collective, r)   # unbiased
                assert r["max_err"] > 0                        # and really compressed
    assert result["tensor_roundtrip"] and result["ef_memory_named"]
    for label in ("fp32", "qsgd4"):
        assert result[label]["replicas_identical"], label
        assert result[label]["last"] < 0.05 * result[label]["first"], result[label]
    # QSGD-4 tracks fp32: its final loss is within noise of fp32's (both near zero)
    assert result["qsgd4"]["last"] < 2 * result["fp32"]["last"] + 0.02 * result["fp32"]["first"]
    default = result["reducer_default"]  # calibrated: one plan on every rank, pinnable
    assert default["plan"] is not None and default["plan_alike"] and default["params_alike"]
    assert "plan of step" in default["summary"] and default["pinned"]
    for label, run in result["reducer_resumed"].items():  # EF, server EF, EF21: resumed exactly
        assert run["bit_identical"] and run["ratio"] > 3, (label, run)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found (apt-get install openmpi-bin)")
def test_mpirun_launches_the_main_job():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NP": "2", "MASTER_PORT": "29731",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(root / "launch" / "mpirun.sh"), "qsgd4", "--epochs", "1",
                           "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "qsgd4" in proc.stdout and "identical" in proc.stdout and "DIVERGED" not in proc.stdout


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_mpi_ranks_configured_differently_fail_with_named_errors(tmp_path):
    out = tmp_path / "mismatch.json"
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                           sys.executable, str(WORKER.with_name("mpi_mismatch_worker.py")), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for field in ("codec", "collective", "shape", "dtype"):
        assert "configured differently" in result[field] and f"{field}:" in result[field], result
    assert "codec:" in result["summable"]
    assert "complex" in result["complex"] and "[3, 2]" in result["complex"], result
    assert result["after"] == 1.5


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_stopped_mpi_peer_raises_within_the_timeout(tmp_path):
    """MPI waits forever on a silent peer; the front end's transport raises TimeoutError."""
    out = tmp_path / "fault.json"
    env = {**os.environ, "COMMPRESS_TIMEOUT": "5"}
    subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, str(WORKER.with_name("mpi_fault_worker.py")), str(out)],
                   capture_output=True, text=True, timeout=120, env=env)
    result = json.loads(out.read_text())  # mpirun's own exit status reflects the killed peer
    assert result["steps"] == 2 and "did not complete in 5 s" in result["error"], result
    assert 5 <= result["seconds"] < 20, result
