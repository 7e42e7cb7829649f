"""launch/slurm.sbatch as sbatch runs it: from slurmd's spool directory (a copy of the script,
so ``$0`` is not in the checkout), with ``scontrol``, ``srun`` and ``torchrun`` replaced by
stubs that record what they were asked to run (there is no Slurm on these machines)."""
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stub(path: Path, body: str) -> None:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def sbatch(tmp_path: Path, submit_dir: Path, *args):
    """Run a spooled copy of slurm.sbatch as slurmd would; ``(process, torchrun's argv)``."""
    spool, bin_dir = tmp_path / "spool", tmp_path / "bin"
    spool.mkdir()
    bin_dir.mkdir()
    shutil.copy(REPO / "launch" / "slurm.sbatch", spool / "slurm_script")
    stub(bin_dir / "scontrol", "echo node-a; echo node-b")
    # srun: drop its options, run the task once as node 0
    stub(bin_dir / "srun", 'while [ "${1#--}" != "$1" ]; do shift; done; SLURM_NODEID=0 exec "$@"')
    stub(bin_dir / "torchrun", 'printf "%s\\n" "$@" > "$RECORD"')
    record = tmp_path / "torchrun.args"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit_dir),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7",
           "RECORD": str(record), "IFNAME": "lo", "RDZV_STORE_GRACE": "1"}
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, record.read_text().splitlines() if record.exists() else None


def test_spooled_script_finds_its_helper_from_the_submit_directory(tmp_path):
    proc, argv = sbatch(tmp_path, REPO, "qsgd4", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert argv[-6:] == ["-m", "commpress.cli", "train", "qsgd4", "--epochs", "1"]
    assert "--nnodes=2" in argv and "--rdzv_endpoint=node-a:29500" in argv
    # node 0's own process serves the store (launch/rendezvous_store.py); no agent hosts it
    assert "--rdzv_id=7" in argv and "--rdzv_backend=c10d" in argv and "--rdzv_conf=is_host=0" in argv


def test_submitted_outside_the_checkout_says_what_to_do(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc, argv = sbatch(tmp_path, elsewhere, "qsgd4")
    assert proc.returncode == 2 and argv is None
    assert "COMMPRESS_LAUNCH" in proc.stderr and "torchrun_multinode.sh" in proc.stderr
