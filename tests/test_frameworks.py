"""commpress inside the training frameworks users run: PyTorch Lightning (its own launcher
starts the second process) and Hugging Face Accelerate (under torchrun), 2 CPU processes each."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HAS_LIGHTNING = any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning"))
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def run_script(args, out: Path, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, *args], cwd=out, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(not HAS_LIGHTNING, reason="PyTorch Lightning is not installed "
                    "(pip install 'commpress[lightning]')")
@pytest.mark.parametrize("mode", ["commpress", "fsdp"])
def test_lightning_compresses_on_cpu(mode, tmp_path):
    """``commpress``: CompressedDDPStrategy; ``fsdp``: the README's FSDP2 recipe under
    ModelParallelStrategy. The codec ran every step, and the ranks' parameters agree."""
    ranks = run_script([str(HERE / "lightning_worker.py"), str(tmp_path), mode], tmp_path)
    for r in ranks:
        assert r["global_step"] == 8 and r["iter"] == 8, r
        assert 0 < r["network_bytes"] < r["fp32_bytes"] and r["last_ratio"] > 5, r  # QSGD-4
        assert r["warnings"] == []
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.skipif(not HAS_LIGHTNING, reason="PyTorch Lightning is not installed "
                    "(pip install 'commpress[lightning]')")
def test_lightning_own_ddp_strategy_leaves_the_hook_off_on_cpu_and_the_summary_says_so(tmp_path):
    """Why CompressedDDPStrategy exists: if Lightning starts registering hooks on CPU, this
    test fails and the README's advice can be relaxed."""
    ranks = run_script([str(HERE / "lightning_worker.py"), str(tmp_path), "lightning-hook"], tmp_path)
    for r in ranks:
        assert r["global_step"] == 8 and r["iter"] == 0, r
        assert "CompressedDDPStrategy" in r["summary"]


@pytest.mark.skipif(not HAS_ACCELERATE, reason="Hugging Face Accelerate is not installed "
                    "(pip install 'commpress[accelerate]')")
def test_accelerate_prepared_model_takes_the_hook(tmp_path):
    ranks = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(HERE / "accelerate_worker.py"), str(tmp_path)], tmp_path)
    for r in ranks:
        assert r["distributed_type"] == "MULTI_CPU" and r["iter"] == 6, r
        assert 0 < r["network_bytes"] < r["fp32_bytes"] and r["last_ratio"] > 5, r
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.skipif(not HAS_LIGHTNING, reason="PyTorch Lightning is not installed "
                    "(pip install 'commpress[lightning]')")
def test_lightning_strategy_rejects_what_it_cannot_honour():
    import commpress as cp
    from commpress.lightning import CompressedDDPStrategy

    with pytest.raises(ValueError, match="ddp_comm_hook"):
        CompressedDDPStrategy("qsgd4", ddp_comm_hook=cp.compress_hook)
    with pytest.raises(ValueError, match="unknown hook 'qsgd9'"):
        CompressedDDPStrategy("qsgd9")
    with pytest.raises(TypeError, match="state_kwargs"):
        CompressedDDPStrategy(cp.state_from_name("qsgd4"), state_kwargs={"seed": 1})
    state = cp.state_from_name("natural")
    assert CompressedDDPStrategy(state).compression_state is state


def test_summary_of_a_state_that_never_ran_says_why():
    import commpress as cp

    assert "never registered" in cp.state_from_name("qsgd4").stats.summary()
