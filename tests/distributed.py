"""Run a function on W real processes joined by a gloo process group."""
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commpress.comm.transport import release_default_group  # imported before any group exists


def _worker(rank, world_size, init_file, out_dir, fn, args, pg_timeout):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=pg_timeout)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        del result
        if dist.is_initialized():  # unless ``fn`` released it itself
            release_default_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_workers(fn, world_size, *args, timeout=180, pg_timeout=None, survivors=None):
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process
    (``pg_timeout``: the process group's timeout, a timedelta). ``survivors``: the ranks that
    must finish (fault tests: the others die or hang on purpose; they are killed once the
    survivors are done and their results are None)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, tmp, fn, args, pg_timeout))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        watched = range(world_size) if survivors is None else survivors
        deadline = time.monotonic() + timeout
        for r in watched:
            procs[r].join(max(deadline - time.monotonic(), 0))
        hung = [r for r in watched if procs[r].is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [open(os.path.join(tmp, f"{r}.err")).read() for r in watched
                  if os.path.exists(os.path.join(tmp, f"{r}.err"))]
        # a rank that saved its result and then died at exit (an abort while the interpreter
        # finalizes) is a failed job for any launcher, so it fails the test too
        crashed = {r: procs[r].exitcode for r in watched if r not in hung and procs[r].exitcode != 0}
        if errors or hung or crashed:
            raise AssertionError(f"workers failed (hung ranks: {hung}, exit codes of the others "
                                 f"that failed: {crashed}):\n" + "\n".join(errors))
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) if r in watched else None
                for r in range(world_size)]


def run_until_a_peer_stops(rank: int, pids, step, out_path: str, stop_at: int = 2) -> None:
    """For fault workers under mpirun or horovodrun: rank 1 stops itself (SIGSTOP: alive but
    silent) before step ``stop_at``; every rank calls ``step()`` until it raises. Rank 0 writes
    ``{"steps", "error", "seconds"}`` as JSON to ``out_path``, kills the stopped peer (``pids``:
    every rank's process id) and exits, which ends the job."""
    import json
    import signal
    result = {"steps": 0}
    for index in range(stop_at + 1):
        if rank == 1 and index == stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        started = time.monotonic()
        try:
            step()
            result["steps"] += 1
        except Exception as exc:  # noqa: BLE001 - what the survivor got, whatever its type
            result.update(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
            break
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
        os.kill(pids[1], signal.SIGKILL)
        os._exit(0)
