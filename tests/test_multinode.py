"""Two namespaced nodes on a rate-limited link, torchrun c10d rendezvous, the real main job."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from commpress.netsim import NetSim, list_namespaces, tbf_args

ROOT = Path(__file__).resolve().parent.parent


def namespaces_unavailable():
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "cpprobe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "cpprobe"], capture_output=True)
    return f"cannot create network namespaces: {probe.stderr.strip()}" if probe.returncode else None


REASON = namespaces_unavailable()
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_tbf_parameters_follow_the_rate():
    assert tbf_args("1gbit") == ["rate", "1gbit", "burst", "500000", "limit", "4000000"]
    assert tbf_args("100mbit")[3] == "50000"
    with pytest.raises(ValueError, match="rate"):
        tbf_args("fast")


@needs_netns
def test_netsim_rate_and_cleanup():
    script = ("import os,socket,time\n"
              "r=int(os.environ['NODE_RANK']);m=os.environ['MASTER_ADDR'];N=12_500_000\n"
              "if r==0:\n"
              " s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((m,5001));s.listen(1)\n"
              " c,_=s.accept();g=0;t=time.time()\n"
              " while g<N:\n"
              "  d=c.recv(1<<20)\n"
              "  if not d: break\n"
              "  g+=len(d)\n"
              " print(g*8/(time.time()-t)/1e6)\n"
              "else:\n"
              " time.sleep(0.5);c=socket.create_connection((m,5001));b=b'x'*(1<<20);n=0\n"
              " while n<N: c.sendall(b);n+=len(b)\n")
    with NetSim(nodes=2, rate="100mbit") as net:
        names = [net.node_ns(0), net.node_ns(1), net.bridge_ns]
        assert set(names) <= set(list_namespaces())
        results = net.run(f"{sys.executable} -c \"{script}\"", timeout=60)
        assert [r.returncode for r in results] == [0, 0], results
        mbit = float(results[0].stdout.strip().splitlines()[-1])
        assert 80 <= mbit <= 101, mbit   # shaped: not loopback speed
    assert not set(names) & set(list_namespaces())   # torn down


def torchrun_on_two_nodes(script_and_args: str, out: Path, per_node: int = 1,
                          clean: bool = False) -> dict:
    """``launch/torchrun_multinode.sh SCRIPT_AND_ARGS`` on 2 netsim nodes at 1 Gbit/s with
    ``per_node`` ranks each; returns the JSON the job wrote to ``out``. ``clean``: no node
    printed a trace or a c10d warning (the README's demo ends quietly)."""
    command = (f"cd {ROOT} && PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={ROOT} "
               f"NPROC_PER_NODE={per_node} bash launch/torchrun_multinode.sh {script_and_args}")
    with NetSim(nodes=2, rate="1gbit") as net:
        results = net.run(command, timeout=300)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"node {i}:\n{r.stdout[-3000:]}"
        noise = [line for line in r.stdout.splitlines()
                 if any(m in line for m in ("Traceback", "frame #", "[W", "[E", "rendezvous"))]
        assert not (clean and noise), f"node {i} printed:\n" + "\n".join(noise[:20])
    return json.loads(out.read_text())


@needs_netns
def test_torchrun_two_nodes_train_with_compress_hook(tmp_path):
    out = tmp_path / "report.json"
    report = torchrun_on_two_nodes(f"-m commpress.cli train qsgd4 --epochs 2 --quiet --json {out}", out,
                                   clean=True)
    assert report["world_size"] == 2
    runs = {r["method"]: r for r in report["results"]}
    assert all(r["replicas_identical"] for r in runs.values())
    assert runs["qsgd4"]["ratio"] > 5 and runs["qsgd4"]["accuracy"] > 0.8
    assert runs["qsgd4"]["wire_bytes"] < runs["fp32-allreduce"]["wire_bytes"] / 5


@needs_netns
def test_hierarchical_collective_on_two_nodes_of_two_ranks(tmp_path):
    """2 nodes x 2 ranks (torchrun --nproc_per_node=2) at 1 Gbit/s: identity exact, QSGD-4
    unbiased, and what leaves a node, read from its interface counter, is 2(N-1)/N of the
    payload: 1/1.75 of what flat reduce_scatter over the 4 ranks sends across."""
    out = tmp_path / "hierarchy.json"
    report = torchrun_on_two_nodes(f"tests/hierarchy_worker.py {out}", out, per_node=2)
    print(json.dumps(report))
    assert (report["world_size"], report["local_size"], report["nodes"]) == (4, 2, 2)
    assert report["identity_max_error"] < 1e-6
    assert report["qsgd_max_z"] < 5
    payload = report["payload_bytes"]  # 2(N-1)/N * B = B for N = 2
    hierarchical = report["hierarchical"]["node_link_bytes"]
    assert payload <= hierarchical <= 1.12 * payload  # plus TCP/IP headers and acknowledgements
    # flat: the all_to_all sends (W-L)/W of each rank's payload off the node, gloo's ring
    # all-gather (W-1)/W of it per node: 1.75 B in all for 2 x 2
    assert report["flat"]["node_link_bytes"] >= 1.6 * hierarchical
