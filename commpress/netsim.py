"""A rate-limited network on one machine, from Linux network namespaces.

``commpress netsim up --nodes N --rate 1gbit`` makes N "nodes", each a network namespace with
one interface ``eth0``, joined through a bridge in a namespace of its own by veth pairs. Every
link is shaped with ``tc tbf`` in both directions (node -> bridge on the node's side, bridge ->
node on the bridge's side), so a node's traffic in and out is limited to the rate, as on a
switched network of that speed. Addresses are 10.R.K.(i+1)/24 and exist only inside these
namespaces. ``run`` executes a command in every node namespace at once with ``NODE_RANK``,
``NNODES``, ``NODE_ADDR``, ``MASTER_ADDR`` (node 0) and ``NETSIM_IFNAME`` set; ``down``
removes everything. Every name carries the network's prefix, so several can coexist.

Needs root and iproute2 (``ip``, ``tc``). Delay and loss need the kernel's ``netem`` qdisc,
which not every kernel has; ``up`` says so when it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

STATE_DIR = Path(os.environ.get("COMMPRESS_NETSIM_DIR", "/run/commpress-netsim"))
#: ``ip netns exec NS`` mounts the files of ``/etc/netns/NS`` over ``/etc``: a node's hosts file
NETNS_ETC = Path("/etc/netns")
IFNAME = "eth0"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class NetSimError(RuntimeError):
    pass


def rate_bits(rate: str) -> float:
    """``"1gbit"`` -> 1e9 (tc's decimal units)."""
    match = _RATE.match(rate.strip().lower())
    if not match:
        raise ValueError(f"rate must look like 100mbit, 1gbit or 2.5gbit, got {rate!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def tbf_args(rate: str) -> List[str]:
    """tbf parameters for a rate: a burst of 4 ms at that rate (512 kB at 1 Gbit/s, which
    measured 959 Mbit/s of TCP goodput here) and a queue of 8 bursts, at least 1 MB."""
    byte_rate = rate_bits(rate) / 8
    burst = max(int(byte_rate * 0.004), 16 * 1024)
    limit = max(8 * burst, 1 << 20)
    return ["rate", rate, "burst", str(burst), "limit", str(limit)]


def check_environment() -> None:
    if os.geteuid() != 0:
        raise NetSimError("netsim needs root (network namespaces and tc); run it as root or in a "
                          "container with CAP_NET_ADMIN")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetSimError(f"netsim needs '{tool}' from iproute2 (apt-get install iproute2)")


def _sh(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetSimError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class NetSim:
    """A simulated network; a context manager that tears it down on exit, error or Ctrl-C.

    Example::

        >>> with NetSim(nodes=2, rate="1gbit") as net:
        ...     results = net.run("python -c 'import os; print(os.environ[\"NODE_ADDR\"])'")
    """

    nodes: int
    rate: Optional[str] = "1gbit"
    delay: Optional[str] = None
    prefix: str = field(default_factory=lambda: "cp" + secrets.token_hex(2))
    subnet: int = 0
    up_done: bool = False

    def __post_init__(self):
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= 200:
            raise ValueError(f"nodes must be an integer in 1..200, got {self.nodes!r}")
        if self.rate is not None:
            rate_bits(self.rate)
        if not re.fullmatch(r"[a-z][a-z0-9]{1,7}", self.prefix):
            raise ValueError(f"prefix must be 2-8 lowercase letters/digits, got {self.prefix!r}")
        if not self.subnet:
            self.subnet = int(self.prefix.encode().hex(), 16) % 250 + 1

    # -- names -------------------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def address(self, i: int) -> str:
        return f"10.{self.subnet}.{i // 250}.{i % 250 + 1}"

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self) -> "NetSim":
        check_environment()
        if self.delay and not self.has_netem():
            raise NetSimError("--delay needs the netem qdisc, which this kernel does not have "
                              "(tc qdisc ... netem: 'Specified qdisc kind is unknown'); "
                              "rate limiting with tbf works without it")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.up_done = True
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(asdict(self)))
        return self

    def _build(self):
        _sh("ip", "netns", "add", self.bridge_ns)
        _sh("ip", "link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _sh("ip", "link", "set", "br0", "up", ns=self.bridge_ns)
        for i in range(self.nodes):
            ns, host_end, bridge_end = self.node_ns(i), f"{self.prefix}h{i}", f"{self.prefix}b{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", bridge_end)
            _sh("ip", "link", "set", host_end, "netns", ns, "name", IFNAME)
            _sh("ip", "link", "set", bridge_end, "netns", self.bridge_ns)
            _sh("ip", "link", "set", bridge_end, "master", "br0", ns=self.bridge_ns)
            _sh("ip", "link", "set", bridge_end, "up", ns=self.bridge_ns)
            _sh("ip", "addr", "add", f"{self.address(i)}/16", "dev", IFNAME, ns=ns)
            _sh("ip", "link", "set", IFNAME, "up", ns=ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
            for dev, where in ((IFNAME, ns), (bridge_end, self.bridge_ns)):
                self._shape(dev, where)
            self._write_hosts(ns)

    def _write_hosts(self, ns: str) -> None:
        """The machine's hosts file plus every node's address, so that reverse lookups of node
        addresses (c10d names its store's clients) answer at once instead of failing on the
        namespace's missing DNS with a warning per connection."""
        try:
            base = Path("/etc/hosts").read_text()
        except OSError:
            base = "127.0.0.1 localhost\n"
        # IPv4-mapped forms too: the store's server socket is dual-stack, so it sees its
        # clients as ::ffff:10.x.y.z
        nodes = "::1 localhost ip6-localhost\n" + "".join(
            f"{self.address(i)} {self.node_ns(i)}\n::ffff:{self.address(i)} {self.node_ns(i)}\n"
            for i in range(self.nodes))
        try:
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(f"{base.rstrip()}\n# commpress netsim {self.prefix}\n{nodes}")
        except OSError as exc:  # a read-only /etc: the network works, c10d only warns more
            print(f"netsim: no hosts file for {ns} ({exc}); c10d may warn that it cannot "
                  "name its clients", file=sys.stderr)

    def _shape(self, dev: str, ns: str):
        if self.rate and self.delay:
            _sh("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", self.delay, ns=ns)
            _sh("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "tbf", *tbf_args(self.rate), ns=ns)
        elif self.rate:
            _sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", *tbf_args(self.rate), ns=ns)
        elif self.delay:
            _sh("tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", self.delay, ns=ns)

    def down(self) -> None:
        """Remove every namespace of this network (their veths and qdiscs go with them)."""
        existing = set(list_namespaces())
        for ns in [self.node_ns(i) for i in range(self.nodes)] + [self.bridge_ns]:
            if ns in existing:
                _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.up_done = False

    def __enter__(self) -> "NetSim":
        # a plain kill (SIGTERM) would skip __exit__ and leave the namespaces behind
        self._previous_sigterm = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            self._previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self.up()

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    @staticmethod
    def has_netem() -> bool:
        probe = f"cpnetem{os.getpid() % 10000}"
        _sh("ip", "netns", "add", probe, check=False)
        try:
            _sh("ip", "link", "add", "d0", "type", "dummy", ns=probe, check=False)
            return _sh("tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay", "1ms",
                       ns=probe, check=False).returncode == 0
        finally:
            _sh("ip", "netns", "del", probe, check=False)

    # -- running -------------------------------------------------------------------------------
    def node_env(self, i: int) -> Dict[str, str]:
        return {"NODE_RANK": str(i), "NNODES": str(self.nodes), "NODE_ADDR": self.address(i),
                "MASTER_ADDR": self.address(0), "NETSIM_IFNAME": IFNAME,
                "GLOO_SOCKET_IFNAME": IFNAME, "NCCL_SOCKET_IFNAME": IFNAME}

    def run(self, command: str, timeout: Optional[float] = None,
            env: Optional[Dict[str, str]] = None, echo: bool = False,
            ranks_per_node: int = 1) -> List[subprocess.CompletedProcess]:
        """Run ``command`` (a shell line; ``$NODE_RANK`` etc. expand per node) in every node at
        once; returns each node's completed process. A node still running at ``timeout``
        seconds is killed (its return code is then negative). ``ranks_per_node > 1`` starts
        the command that many times per node, with ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
        set; the node fails if any of them does."""
        if ranks_per_node > 1:
            starts = " ".join(f"LOCAL_RANK={i} LOCAL_WORLD_SIZE={ranks_per_node} {command} & "
                              f"pids=\"$pids $!\";" for i in range(ranks_per_node))
            command = f"pids=''; {starts} rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
        procs = []
        for i in range(self.nodes):
            node_env = {**os.environ, **(env or {}), **self.node_env(i)}
            procs.append(subprocess.Popen(["ip", "netns", "exec", self.node_ns(i), "sh", "-c", command],
                                          env=node_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
        outputs: List[str] = [""] * self.nodes

        def drain(i, proc):
            for line in proc.stdout:
                outputs[i] += line
                if echo:
                    sys.stdout.write(f"[node {i}] {line}")
        readers = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in readers:
            t.start()
        try:
            for p in procs:
                try:
                    p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for p in procs:  # a failure or Ctrl-C stops every node's process group
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for t in readers:
                t.join(timeout=5)
        return [subprocess.CompletedProcess(p.args, p.returncode, outputs[i], "")
                for i, p in enumerate(procs)]


# -- distributed jobs over a netsim network (benchmarks use these) ---------------------------
def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options :func:`run_job` passes to a job's workers."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--nnodes", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--ranks-per-node", type=int, default=1,
                        help="ranks started on each node (default 1)")
    parser.add_argument("--port", type=int, default=29611, help=argparse.SUPPRESS)


def run_job(script: Path, worker_args: List[str], nodes: int, rate: Optional[str],
            ranks_per_node: int = 1, timeout: float = 3600, echo: bool = False) -> list:
    """Run ``script --worker ...`` as ``ranks_per_node`` ranks on each of ``nodes`` netsim
    nodes linked at ``rate`` (None: unlimited) and return the JSON list its rank 0 wrote
    to ``--worker-out``; ``echo`` prints the nodes' output as it comes. The workers call
    :func:`join_job` first."""
    with tempfile.TemporaryDirectory() as tmp, NetSim(nodes=nodes, rate=rate) as net:
        out = Path(tmp) / "rows.json"
        command = " ".join([sys.executable, str(Path(script).resolve()), "--worker",
                            "--nnodes", str(nodes), "--ranks-per-node", str(ranks_per_node),
                            "--worker-out", str(out), *worker_args])
        runs = net.run(command, timeout=timeout, ranks_per_node=ranks_per_node, echo=echo)
        failed = [(i, r.stdout[-2000:]) for i, r in enumerate(runs) if r.returncode != 0]
        if failed:
            raise NetSimError(f"{Path(script).name}: nodes failed: {failed}")
        return json.loads(out.read_text())


def join_job(args) -> int:
    """In a worker of :func:`run_job`: join the job's gloo group (ranks numbered node by
    node, ``GROUP_RANK`` set to the node as torchrun does, intra-op threads shared out over
    the machine's cores); returns this rank."""
    import torch
    import torch.distributed as dist

    node, local = int(os.environ["NODE_RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    rank, world = node * args.ranks_per_node + local, args.nnodes * args.ranks_per_node
    os.environ["GROUP_RANK"] = str(node)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{args.port}",
                            rank=rank, world_size=world)
    return rank


def link_tx_bytes(ifname: str = IFNAME) -> int:
    """Bytes sent so far on ``ifname`` in this process's network namespace: run inside a node,
    what the node has put on its simulated link (headers included)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == ifname:
                return int(counters.split()[8])
    raise NetSimError(f"no interface {ifname} in this network namespace")


def list_namespaces() -> List[str]:
    proc = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def load(prefix: Optional[str]) -> NetSim:
    files = sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []
    if prefix is None:
        if len(files) != 1:
            raise NetSimError(f"{len(files)} networks are up ({', '.join(f.stem for f in files) or 'none'}); "
                              "name one with --prefix")
        return NetSim(**json.loads(files[0].read_text()))
    path = STATE_DIR / f"{prefix}.json"
    if not path.exists():
        raise NetSimError(f"no network with prefix {prefix!r} is up")
    return NetSim(**json.loads(path.read_text()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="create N rate-limited nodes")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--rate", default="1gbit", help="per-link rate in tc units, e.g. 100mbit, 1gbit; "
                                                    "'none' for unlimited")
    up.add_argument("--delay", help="one-way delay per link, e.g. 1ms (needs netem)")
    up.add_argument("--prefix", help="name prefix (default: random)")
    run = sub.add_parser("run", help="run a shell command in every node at once")
    run.add_argument("--prefix")
    run.add_argument("--timeout", type=float)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    down = sub.add_parser("down", help="remove a network (or --all)")
    down.add_argument("--prefix")
    down.add_argument("--all", action="store_true")


def main(args) -> int:
    try:
        check_environment()
        if args.action == "up":
            kwargs = {"prefix": args.prefix} if args.prefix else {}
            net = NetSim(args.nodes, None if args.rate == "none" else args.rate, args.delay, **kwargs)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
            net.up()
            print(f"netsim {net.prefix}: {net.nodes} nodes at {net.rate or 'unlimited'} "
                  f"({', '.join(net.address(i) for i in range(net.nodes))}); "
                  f"commpress netsim run --prefix {net.prefix} -- CMD; "
                  f"commpress netsim down --prefix {net.prefix}")
        elif args.action == "run":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise NetSimError("nothing to run: commpress netsim run -- CMD")
            results = load(args.prefix).run(" ".join(command), timeout=args.timeout, echo=True)
            failed = [i for i, r in enumerate(results) if r.returncode != 0]
            if failed:
                print(f"netsim: nodes {failed} failed", file=sys.stderr)
                return 1
        else:
            nets = ([NetSim(**json.loads(f.read_text())) for f in STATE_DIR.glob("*.json")]
                    if args.all and STATE_DIR.exists() else [load(args.prefix)])
            for net in nets:
                net.down()
                print(f"netsim {net.prefix}: removed")
        return 0
    except (NetSimError, ValueError) as exc:
        print(f"commpress netsim: {exc}", file=sys.stderr)
        return 2
