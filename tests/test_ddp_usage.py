"""The DDP hook used the ways real training scripts use it: two models in one process, models on
sub-groups, direct ``register_comm_hook``, fp64 and sparse models, many models created and
dropped, pickled and checkpointed states (gloo ranks; in-process where that shows enough)."""
import gc
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from commpress.comm import OrderedExecutor
from distributed import run_workers


def mlp(seed=0, width=128, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 32)).to(dtype)


def data(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 32, generator=g).to(dtype)


def gan_worker(rank, world_size, direct):
    """A generator and a discriminator, each with its own DDP wrapper and state: one backward
    through both, then two separate backwards, several steps."""
    gen, disc = DDP(mlp(1)), DDP(nn.Sequential(mlp(2), nn.Linear(32, 1)))
    states = []
    for model, name in ((gen, "qsgd4"), (disc, "natural+ef")):
        state = cp.state_from_name(name, log_every=0, policy="fixed", start_iter=2, min_numel=256)
        if direct:
            model.register_comm_hook(state, cp.compress_hook)
        else:
            cp.register_hook(model, state)
        states.append(state)
    for step in range(4):
        z = data(rank, step)
        disc(gen(z)).mean().backward()              # one backward over both models
        disc(data(rank, 100 + step)).mean().backward()
        gen(z).square().mean().backward()
    return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in (gen, disc)], \
        [s.stats.steps for s in states]


@pytest.mark.parametrize("direct", [False, True])
def test_two_models_two_states_in_one_process(direct):
    """No hang, no "group name already registered": each state creates its group on the
    caller's thread, not lazily from its own worker thread."""
    for _ in range(2):
        results = run_workers(gan_worker, 2, direct, timeout=120)
        for params, steps in results:
            assert all(torch.equal(a, b) for a, b in zip(params, results[0][0]))
            assert steps == [8, 8]  # generator: 2 backwards a step; discriminator: 2


def subgroup_worker(rank, world_size):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    torch.manual_seed(0)
    model = DDP(nn.Linear(8, 4, bias=False), process_group=group)
    cp.register_hook(model, "fp32")
    x = torch.full((2, 8), float(rank + 1))
    model(x).sum().backward()
    return model.module.weight.grad.clone()


def test_model_on_subgroup_averages_over_its_group():
    """A model built with process_group=[0,1] / [2,3] averages over its group, not all four
    ranks."""
    grads = run_workers(subgroup_worker, 4)
    # the local gradient of rank r is 2 (r+1) in every entry
    assert torch.allclose(grads[0], torch.full((4, 8), 3.0)) and torch.equal(grads[0], grads[1])
    assert torch.allclose(grads[2], torch.full((4, 8), 7.0)) and torch.equal(grads[2], grads[3])


def auto_uneven_worker(rank, world_size):
    os.environ["GROUP_RANK"] = "0" if rank < 2 else "1"  # nodes of 2 and 1 ranks
    model = DDP(mlp(width=512))
    state = cp.register_hook(model, "qsgd4", start_iter=0, min_numel=256, policy="fixed")
    model(data(rank, 0)).square().mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), type(state.compressed_transport).__name__


def test_auto_falls_back_to_flat_on_uneven_nodes():
    results = run_workers(auto_uneven_worker, 3)
    for grad, transport in results:
        assert transport == "TorchTransport" and torch.equal(grad, results[0][0])


def usage_worker(rank, world_size):
    out = {}
    # -- direct registration with EF: parameters named lazily, checkpoints work ------------
    model = DDP(mlp())
    state = cp.state_from_name("qsgd4+ef", log_every=0, policy="fixed", min_numel=256)
    model.register_comm_hook(state, cp.compress_hook)
    for step in range(4):
        model(data(rank, step)).square().mean().backward()
    saved = state.state_dict()
    out["direct_names"] = sorted(saved["feedback"]["residual"])
    fresh = cp.state_from_name("qsgd4+ef", log_every=0, policy="fixed", min_numel=256)
    fresh.load_state_dict(saved)
    model2 = DDP(mlp())
    model2.register_comm_hook(fresh, cp.compress_hook)
    model2(data(rank, 9)).square().mean().backward()
    out["direct_resumed_steps"] = fresh.stats.steps

    # -- pickling keeps the error-feedback memories ---------------------------------------
    clone = pickle.loads(pickle.dumps(state))
    out["pickled_memories_equal"] = all(
        torch.equal(clone.state_dict()["feedback"]["residual"][k], v)
        for k, v in saved["feedback"]["residual"].items()) and bool(saved["feedback"]["residual"])

    # -- one state on two models is refused ----------------------------------------------
    shared = cp.state_from_name("qsgd4", log_every=0)
    cp.register_hook(DDP(mlp()), shared)
    try:
        cp.register_hook(DDP(mlp()), shared)
        out["two_models"] = "accepted"
    except RuntimeError as exc:
        out["two_models"] = str(exc)
    direct_shared = cp.state_from_name("qsgd4", log_every=0)
    a, b = DDP(mlp()), DDP(mlp())
    a.register_comm_hook(direct_shared, cp.compress_hook)
    b.register_comm_hook(direct_shared, cp.compress_hook)
    try:
        (a(data(rank, 0)).sum() + b(data(rank, 0)).sum()).backward()
        out["two_models_direct"] = "accepted"
    except RuntimeError as exc:
        out["two_models_direct"] = str(exc)

    # -- sparse gradients: a clear error at registration ---------------------------------
    emb = DDP(nn.Embedding(100, 8, sparse=True))
    try:
        cp.register_hook(emb, "qsgd4")
        out["sparse"] = "accepted"
    except ValueError as exc:
        out["sparse"] = str(exc)

    # -- 'hierarchical' with every rank on one node says that nothing is compressed -------
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cp.register_hook(DDP(mlp()), "qsgd4", collective="hierarchical", log_every=0)
    out["one_node_hierarchical"] = [str(w.message) for w in caught]

    # -- float64 models, every named hook --------------------------------------------------
    out["fp64"] = {}
    for name in ("fp32", "fp16", "bf16", "qsgd4", "natural", "dithering", "qsgd4+ef21"):
        model = DDP(mlp(dtype=torch.float64))
        cp.register_hook(model, name, log_every=0, policy="fixed", start_iter=2, min_numel=256)
        for step in range(3):
            model.zero_grad()
            model(data(rank, step, torch.float64)).square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        out["fp64"][name] = (all(g.dtype == torch.float64 for g in grads),
                             torch.cat([g.reshape(-1) for g in grads]))
    return out


def test_direct_registration_fp64_sparse_pickle_and_two_models():
    results = run_workers(usage_worker, 2, timeout=240)
    out = results[0]
    # direct register_comm_hook names parameters itself, so EF state_dict() works and resumes
    assert len(out["direct_names"]) == 2 and all(n.startswith("param.") for n in out["direct_names"])
    assert out["direct_resumed_steps"] == 5  # 4 restored + 1
    assert out["pickled_memories_equal"]
    assert any("nothing is compressed here" in m for m in out["one_node_hierarchical"])
    assert "more than one DDP model" in out["two_models"]
    assert "more than one DDP model" in out["two_models_direct"]
    assert "sparse gradients" in out["sparse"] and "Embedding" in out["sparse"]
    for name, (is_fp64, grad) in out["fp64"].items():
        assert is_fp64 and torch.isfinite(grad).all(), name
        assert torch.equal(grad, results[1]["fp64"][name][1]), name


class ComplexNet(nn.Module):
    """A complex layer between real ones, as in spectral and audio models."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(32, 64), nn.Linear(128, 4)
        self.spectral = nn.Linear(64, 64, dtype=torch.complex64)

    def forward(self, x):
        z = self.spectral(torch.complex(self.inp(x), torch.zeros(x.shape[0], 64)))
        return self.out(torch.cat([z.real, z.imag], dim=1))


def complex_worker(rank, world_size):
    """Complex parameters (DDP's bucket holds each complex value as two reals) with QSGD-8
    and EF: the gradients after 4 steps against the exact mean of the same local gradients;
    then a mask on the complex weight, and the EF checkpoint loaded into a fresh state."""
    model, local = DDP(ComplexNet(), bucket_cap_mb=1), ComplexNet()
    state = cp.register_hook(model, "qsgd8+ef", log_every=0, policy="fixed", min_numel=256)
    for step in range(4):
        model.zero_grad()
        local.zero_grad()
        for net in (model, local):
            net(data(rank, step)).square().mean().backward()
    exact = [p.grad.clone() for p in local.parameters()]
    for g in exact:
        dist.all_reduce(g)
        g /= world_size
    errors = {name: ((p.grad - g).abs().norm() / g.abs().norm()).item()
              for (name, p), g in zip(model.module.named_parameters(), exact)}
    grads = torch.cat([torch.view_as_real(p.grad).reshape(-1) if p.is_complex() else p.grad.reshape(-1)
                       for p in model.parameters()])
    weight = model.module.spectral.weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    state.set_masks({weight: mask})
    model.zero_grad()
    model(data(rank, 9)).square().mean().backward()
    masked_out = weight.grad[~mask].abs().max().item()
    fresh = cp.state_from_name("qsgd8+ef", log_every=0, policy="fixed", min_numel=256)
    cp.register_hook(DDP(ComplexNet(), bucket_cap_mb=1), fresh)
    fresh.load_state_dict(state.state_dict())
    return errors, grads, masked_out, channels_last_masked(rank)


def channels_last_masked(rank):
    """A channels_last conv weight under an AC/DC mask: the largest masked-out gradient entry
    and the share of kept entries that got a gradient."""
    conv = nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
    model = DDP(nn.Sequential(conv, nn.Flatten()))
    state = cp.register_hook(model, "qsgd8", log_every=0, policy="fixed", min_numel=256, start_iter=0)
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    state.set_masks({conv.weight: mask})
    x = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(rank))
    model(x.to(memory_format=torch.channels_last)).square().mean().backward()
    grad = conv.weight.grad
    return grad[~mask].abs().max().item(), (grad[mask] != 0).float().mean().item()


def test_complex_and_channels_last_parameters_are_reduced_where_the_bucket_holds_them():
    """The hook split buckets by ``numel()``, which counts a complex value once: the complex
    weight's gradient was mixed with its neighbours' (58% off the exact mean) and the ranks'
    replicas differed. And AC/DC's mask was laid over the bucket row-major, where DDP holds a
    channels_last weight's gradient in its memory order: half the kept entries got no
    gradient and masked-out ones did."""
    results = run_workers(complex_worker, 2)
    for errors, grads, masked_out, (cl_masked_out, cl_kept) in results:
        assert all(e < 0.05 for e in errors.values()), errors  # QSGD-8 noise, not a mix-up
        assert torch.equal(grads, results[0][1])  # replicas identical
        assert masked_out == 0.0
        assert cl_masked_out == 0.0 and cl_kept > 0.99, (cl_masked_out, cl_kept)


def resource_counts(expected=None):
    """Threads, file descriptors and process groups; with ``expected``, waits up to 5 s for
    them to get there (a state dropped on its own worker thread finishes releasing after)."""
    for _ in range(50):
        gc.collect()
        counts = (threading.active_count(), len(os.listdir("/proc/self/fd")),
                  len(dist.distributed_c10d._world.pg_map))
        if counts == expected or expected is None:
            break
        time.sleep(0.1)
    return counts


def leak_worker(rank, world_size):
    # warm-up: one-time resources of the process (tqdm's monitor thread, which compiling the
    # fused kernels starts) exist before counting
    model = DDP(mlp(width=1024))
    with cp.register_hook(model, "qsgd4", log_every=0, policy="fixed", min_numel=256, start_iter=0):
        model(data(rank, 0)).square().mean().backward()
    del model
    before = resource_counts()
    for i in range(12):
        model = DDP(mlp(width=1024))
        cp.register_hook(model, "qsgd4+ef" if i % 2 else "qsgd4", log_every=0, policy="fixed", min_numel=256)
        for step in range(3):
            model(data(rank, step)).square().mean().backward()
        del model
    after = resource_counts(before)
    with cp.state_from_name("qsgd4", log_every=0) as state:
        cp.register_hook(DDP(mlp()), state)
    closed = resource_counts(before)
    return before, after, closed


def test_dropped_and_closed_states_release_groups_threads_and_fds():
    """25 dropped models leave no threads, file descriptors or process groups behind (a
    worker loop keeping its last job, a closure over the state, would keep them all)."""
    for before, after, closed in run_workers(leak_worker, 2, timeout=240):
        assert after == before, (before, after)
        assert closed == before, (before, closed)


def release_on_gloo_thread_worker(rank, world_size):
    """A state whose last reference dies inside a completion callback, on a gloo thread of
    the group it owns: where the cyclic collector, or a callback holding the state, drops it."""
    count = len(dist.distributed_c10d._world.pg_map)
    where = []

    def reduce_and_drop():
        holder = [cp.state_from_name("qsgd4", log_every=0)]
        group = holder[0].transport.group  # created together: a collective
        if rank == 1:
            time.sleep(0.5)  # so that rank 0's all-reduce completes on gloo's thread
        work = dist.all_reduce(torch.ones(1), group=group, async_op=True)
        del group

        def release(fut):
            where.append(threading.current_thread() is threading.main_thread())
            holder.clear()  # the state's last reference: its finalizer runs here
            return fut.value()
        return work.get_future().then(release)
    reduce_and_drop().wait()
    for _ in range(100):
        if len(dist.distributed_c10d._world.pg_map) == count:
            break
        time.sleep(0.05)
    dist.barrier()
    return where, len(dist.distributed_c10d._world.pg_map) - count


def test_state_released_on_its_own_groups_thread():
    """Released there, destroying the group would join the thread doing it ("Resource
    deadlock avoided": the process aborts); the release runs on a thread of its own."""
    results = run_workers(release_on_gloo_thread_worker, 2)
    assert results[0][0] == [False]  # rank 0's callback did run off the main thread
    for _, left in results:
        assert left == 0  # the state's groups are gone


def gloo_threads():
    """How many of gloo's work threads this process has (they are named pt_gloo_runloop)."""
    return sum(open(f"/proc/self/task/{tid}/comm").read().strip() == "pt_gloo_runloop"
               for tid in os.listdir("/proc/self/task"))


def pytorch_powersgd_then_release_worker(rank, world_size):
    """PyTorch's own PowerSGD hook, whose callbacks run on gloo's threads, then the group
    released as our scripts end: gloo's threads before and after."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from commpress.comm.transport import release_default_group
    model = DDP(mlp())  # DDP's constructor imports torch._dynamo: now, with a group
    model.register_comm_hook(powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=1,
                                                         start_powerSGD_iter=2),
                             powerSGD_hook.powerSGD_hook)
    for step in range(4):
        model(data(rank, step)).square().mean().backward()
    before = gloo_threads()
    del model
    release_default_group()
    return before, gloo_threads()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc to name threads")
def test_released_default_group_has_joined_gloos_threads():
    """Still running when the interpreter finalized, they aborted 10 of 30 such runs at exit
    ("terminate called without an active exception"). Destroying the group had not freed it:
    besides the model, torch.distributed.nn.functional's default arguments held it, being
    imported first by torch._dynamo, after init_process_group (commpress imports it before)."""
    for before, after in run_workers(pytorch_powersgd_then_release_worker, 2):
        assert before > 0 and after == 0, (before, after)


def closed_before_exit(tmp_path, script: str) -> bool:
    """Run ``script`` (which ends while a state's runtime, ``SlowRuntime()``, is being closed)
    in a fresh interpreter: whether that close finished before the process exited."""
    closed = tmp_path / "closed"
    prelude = f"""
import threading, time
from pathlib import Path
from commpress.engine import runtime
from commpress.comm import OrderedExecutor

class SlowRuntime:  # a runtime whose close (executor, groups) takes a while
    def close(self):
        time.sleep(0.5)
        Path({str(closed)!r}).write_text("closed")
"""
    proc = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return closed.exists() and closed.read_text() == "closed"


def test_state_released_off_the_main_thread_is_closed_before_the_interpreter_exits(tmp_path):
    """A state collected on another thread (the cyclic collector runs wherever allocation
    triggers it) is closed on a release thread. As a daemon, a script ending meanwhile
    finalized the interpreter under it: gloo's groups were then freed mid-finalization and one
    rank in ~30 aborted at exit ("terminate called without an active exception")."""
    assert closed_before_exit(tmp_path, """
collector = threading.Thread(target=runtime.close_when_collected, args=([SlowRuntime()],))
collector.start()
collector.join()
""")  # ... and the script ends while the release thread is still closing


def memory_worker(rank, world_size):
    """Models with a 16 MB layer and qsgd4+ef, each dropped after 3 steps: their states (with
    their memories) and the last bucket they reduced must be freed."""
    alive = []
    for i in range(3):
        model = DDP(nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 1)))
        state = cp.register_hook(model, "qsgd4+ef", log_every=0, policy="fixed")
        for step in range(3):
            model(data(rank, step).repeat(1, 64)).square().mean().backward()
        ref = weakref.ref(state)
        del model, state
        for _ in range(50):  # a state dropped on its own worker thread goes a moment later
            gc.collect()
            if ref() is None:
                break
            time.sleep(0.1)
        alive.append(ref() is not None)
    return alive


def test_dropped_states_release_their_buffers():
    """A dropped model's state and bucket buffers die with it (a worker loop holding its last
    job, a closure over both, would keep ~158 MB alive per model)."""
    for alive in run_workers(memory_worker, 2, timeout=240):
        assert not any(alive), alive


class Boom(BaseException):
    pass


def test_executor_completes_the_future_on_any_failure():
    executor = OrderedExecutor()

    def fail():
        raise Boom("not an Exception")

    future = executor.submit(fail)  # must not kill the worker: DDP would wait forever
    with pytest.raises(BaseException, match="Boom: not an Exception"):
        future.wait()
    assert executor.submit(lambda: torch.ones(1)).wait().item() == 1  # the worker survived
    executor.shutdown()


class Held:
    pass


def test_executor_drops_a_job_before_waking_its_waiter():
    """What a job's closure holds (a state) must be gone by the time its waiter wakes: a
    script that ends then left the worker the state's last reference, the state died on the
    worker while the interpreter shut down, and a rank in ~30 aborted at exit."""
    executor = OrderedExecutor()

    def job_holding(held):
        return lambda: torch.ones(1) if held else None

    held = Held()
    ref = weakref.ref(held)
    future = executor.submit(job_holding(held))
    del held
    alive_when_woken = future.then(lambda f: ref() is not None)  # runs as the waiter wakes
    assert future.wait().item() == 1 and alive_when_woken.wait() is False
    executor.shutdown()


def test_state_dropped_by_the_worker_during_shutdown_is_closed_before_exit(tmp_path):
    """Once the main thread has finished, a release thread would not be waited for: a state
    dying on the worker then is closed there, before the executor's exit join returns."""
    assert closed_before_exit(tmp_path, """
def drop_during_shutdown():
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    runtime.close_when_collected([SlowRuntime()])

executor = OrderedExecutor()
executor.submit(drop_during_shutdown)
""")  # the script ends at once; the executor is joined at exit


def execution_worker(rank, world_size):
    """The same training with reductions on the worker thread (gloo's way) and inline in the
    hook (NCCL's way): identical weights, bit for bit."""
    import commpress.engine.runtime as cpruntime
    out = {}
    for inline in (False, True):
        cpruntime.INLINE_BACKENDS = ("nccl", "gloo") if inline else ("nccl",)
        model = DDP(mlp(width=256), bucket_cap_mb=0.01)
        state = cp.register_hook(model, "qsgd4+ef", log_every=0, policy="fixed", min_numel=256,
                                 collective="reduce_scatter")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(5):
            opt.zero_grad()
            model(data(rank, step)).square().mean().backward()
            opt.step()
        out[inline] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                       state._runtime.inline)
    return out


def test_inline_execution_matches_the_worker_thread():
    for out in run_workers(execution_worker, 2):
        (thread, was_inline0), (inline, was_inline1) = out[False], out[True]
        assert not was_inline0 and was_inline1
        assert torch.equal(thread, inline)


def test_executor_runs_jobs_in_order_and_shuts_down():
    executor = OrderedExecutor()
    seen = []
    futures = [executor.submit(lambda i=i: seen.append(i) or torch.tensor(i)) for i in range(50)]
    assert [f.wait().item() for f in futures] == list(range(50)) and seen == list(range(50))
    thread = executor._thread
    executor.shutdown()
    assert not thread.is_alive()


class Branchy(nn.Module):
    """``use_c``: None uses both heads; True/False one of them (unused parameters)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 256), nn.Linear(256, 4), nn.Linear(256, 4)

    def forward(self, x, use_c=None):
        h = self.a(x).relu()
        if use_c is None:
            return self.b(h) + self.c(h)
        return self.c(h) if use_c else self.b(h)


def ddp_modes_worker(rank, world_size):
    """The per-step agreement must not disturb DDP's modes: Join with uneven inputs (joined
    ranks run the hook on zero buckets), static_graph, find_unused_parameters and
    gradient_as_bucket_view."""
    from torch.distributed.algorithms.join import Join
    out = {}
    for mode in ("join", "static", "unused", "view"):
        torch.manual_seed(0)
        kwargs = {"static": dict(static_graph=True), "unused": dict(find_unused_parameters=True),
                  "view": dict(gradient_as_bucket_view=True)}.get(mode, {})
        model = DDP(Branchy(), bucket_cap_mb=0.02, **kwargs)
        cp.register_hook(model, "qsgd4+ef", log_every=0, policy="fixed", min_numel=256)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        steps = 6 + 3 * rank if mode == "join" else 8
        with Join([model], enable=mode == "join"):
            for step in range(steps):
                opt.zero_grad()
                use_c = (step % 2 == 1) if mode == "unused" else None
                model(data(rank, step), use_c).square().mean().backward()
                opt.step()
        out[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def test_ddp_modes_keep_replicas_identical():
    results = run_workers(ddp_modes_worker, 2)
    for mode, weights in results[0].items():
        assert torch.equal(weights, results[1][mode]), mode
