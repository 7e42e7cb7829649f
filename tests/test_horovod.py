"""The Horovod front end under a real `horovodrun --gloo`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("horovod_worker.py")


def horovod_unavailable():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        return f"Horovod with PyTorch is not installed (bash launch/install_horovod.sh): {exc}"
    if not hvd.gloo_built():
        return "Horovod was built without Gloo"
    if shutil.which("horovodrun") is None:
        return "horovodrun is not on PATH"
    return None


REASON = horovod_unavailable()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_horovodrun_training_with_commpress_optimizer(tmp_path):
    out = tmp_path / "hvd.json"
    proc = subprocess.run(["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo",
                           sys.executable, str(WORKER), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == 2
    assert result["identity"]["rel_err"] < 1e-6
    for name in ("fp16", "qsgd4", "natural", "dithering"):
        assert result[name]["same"], name
        assert 0 < result[name]["rel_err"] < 0.5, (name, result[name])
    fp32, qsgd4 = result["train_fp32"], result["train_qsgd4"]
    for run in (fp32, qsgd4):
        assert run["identical"]
        assert run["last"] < 0.2 * run["first"], run
    assert qsgd4["last"] < 1.3 * fp32["last"] + 0.01 * fp32["first"], (qsgd4, fp32)
    assert qsgd4["ratio"] > 5
    args = result["horovod_args"]
    # reductions start during backward, one per group, and match Horovod's own allreduce
    assert args["num_groups"]["groups"] == 3 and args["num_groups"]["started"] == 3
    assert args["num_groups"]["err"] < 1e-6
    assert "0.00x" not in args["summary"] and "vs fp32 all-reduce" in args["summary"]
    assert args["sum"]["err"] < 1e-6                     # op=hvd.Sum sums
    assert args["fp16_predivide"]["err"] < 1e-2          # hvd.Compression.fp16 -> FP16 codec
    g = args["groups_and_foreign_op"]                    # explicit groups + rest in buckets,
    assert g["groups"] == 2 and g["started"] == 2 and g["err"] < 1e-6  # beside another hvd op
    assert "codec=" in args["refused"]["custom_compression"]
    assert "Adasum" in args["refused"]["adasum"]
    assert "not both" in args["refused"]["both"]
    assert "complex" in args["refused"]["complex"] and "[3, 2]" in args["refused"]["complex"]
    assert args["sparse_as_dense"]["row7"] == [1.0] * 8  # both ranks looked up row 7: mean 1
    default = result["default_policy"]  # calibrated: one plan, adopted alike, pinnable
    assert default["plan"] is not None and default["plan_alike"] and default["params_alike"]
    assert "plan of step" in default["summary"] and default["steps"] == 20
    assert default["pinned"]
    for label, run in default["feedback"].items():  # a resumed run reduces as the original
        assert run["bit_identical"] and run["alike"] and run["finite"], (label, run)
        assert run["ratio"] > 3, (label, run)
    assert args["sparse_as_dense"]["row0"] == [0.5] * 8  # only rank 0 looked up row 0
    assert args["clip_identical"] and args["clip_steps"] == 3
    assert "injected encode failure" in args["failed_step"]
    assert args["after_failure_err"] < 1e-6, args["after_failure_err"]  # reduced again, exactly


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_stopped_horovod_peer_raises_within_the_timeout(tmp_path):
    """Horovod waits forever on a silent peer (its stall check only warns); the front end's
    operations raise TimeoutError after COMMPRESS_TIMEOUT seconds."""
    import os
    out = tmp_path / "fault.json"
    subprocess.run(["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                    str(WORKER.with_name("horovod_fault_worker.py")), str(out)],
                   capture_output=True, text=True, timeout=180,
                   env={**os.environ, "COMMPRESS_TIMEOUT": "5"})
    result = json.loads(out.read_text())  # horovodrun's own status reflects the killed peer
    assert result["steps"] == 2 and "did not complete in 5 s" in result["error"], result
    assert 5 <= result["seconds"] < 30, result
