"""Checkpoints of a CompressionState: every entry is validated at load time, and the habit of
saving on rank 0 and loading everywhere keeps rounding noise independent across ranks."""
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from distributed import run_workers


def bound_state(spec="qsgd4+ef"):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    state = cp.state_from_name(spec, log_every=0, policy="fixed")
    state.bind(model)
    return state, model


def good_state_dict(spec="qsgd4+ef"):
    state, model = bound_state(spec)
    sd = state.state_dict()
    memories = {"ef": ["residual"], "ef21": ["worker", "shared", "server"]}[spec.split("+")[1]]
    for memory in memories:
        sd["feedback"][memory] = {name: torch.randn(p.numel()) for name, p in model.named_parameters()
                                  if p.dim() == 2}
    sd["rng"] = {"cpu": torch.Generator().manual_seed(3).get_state()}
    return sd


def test_a_good_checkpoint_loads():
    for spec in ("qsgd4+ef", "qsgd4+ef21"):
        state, _ = bound_state(spec)
        state.load_state_dict(good_state_dict(spec))


def corrupt(sd, what):
    if what == "unknown name":
        sd["feedback"]["residual"]["no.such.layer"] = torch.zeros(3)
    elif what == "wrong length":
        sd["feedback"]["residual"]["0.weight"] = torch.zeros(7)
    elif what == "non-finite":
        sd["feedback"]["residual"]["0.weight"][5] = float("nan")
    elif what == "integer memory":
        sd["feedback"]["residual"]["0.weight"] = torch.zeros(2048, dtype=torch.int64)
    elif what == "unknown memory":
        sd["feedback"]["momentum"] = {}
    elif what == "garbage rng":
        sd["rng"]["cpu"] = torch.zeros(16, dtype=torch.uint8)
    elif what == "rng not a tensor":
        sd["rng"]["cpu"] = [1, 2, 3]
    elif what == "negative iter":
        sd["iter"] = -1
    elif what == "bad phase":
        sd["phase"] = "half"
    elif what == "unknown entry":
        sd["surprise"] = 1
    elif what == "empty plan":  # a plan with no choice failed at the first step (LookupError)
        sd["plan"] = {"step": 1, "entries": []}
    elif what == "plan bucket size":
        sd["plan"] = {"step": 1, "entries": [{"numel": "many", "codec": "fp32",
                                              "collective": "allreduce", "seconds": {}}]}
    elif what == "trial progress":
        sd["calibration"] = {"first": 2, "plans": [], "seconds": []}
    return sd


@pytest.mark.parametrize("what,named", [
    ("unknown name", "no.such.layer"), ("wrong length", "0.weight"), ("non-finite", "0.weight"),
    ("integer memory", "0.weight"), ("unknown memory", "momentum"), ("garbage rng", "rng"),
    ("rng not a tensor", "rng"), ("negative iter", "iter"), ("bad phase", "phase"),
    ("unknown entry", "surprise"), ("empty plan", "'plan'"), ("plan bucket size", "'plan'"),
    ("trial progress", "'calibration'")])
def test_bad_entries_are_refused_with_their_name(what, named):
    """Refused at load, not failing later inside the hook or silently training to NaN."""
    state, _ = bound_state()
    before = state.state_dict()
    with pytest.raises(ValueError, match=named):
        state.load_state_dict(corrupt(good_state_dict(), what))
    assert state.iter == before["iter"]  # nothing half-loaded


def test_memories_loaded_before_binding_are_checked_at_bind():
    state = cp.state_from_name("qsgd4+ef", log_every=0, policy="fixed")
    state.load_state_dict(corrupt(good_state_dict(), "unknown name"))
    with pytest.raises(ValueError, match="no.such.layer"):
        state.bind(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))


def rank0_checkpoint_worker(rank, world_size):
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    state = cp.register_hook(model, "qsgd4+ef21", log_every=0, policy="fixed", min_numel=256)
    for step in range(4):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(rank * 100 + step))
        model(x).square().mean().backward()
    saved = [state.state_dict()]
    dist.broadcast_object_list(saved, src=0)  # everyone loads rank 0's checkpoint
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("commpress").addHandler(handler)
    torch.manual_seed(0)
    model2 = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    fresh = cp.register_hook(model2, "qsgd4+ef21", log_every=0, policy="fixed", min_numel=256)
    fresh.load_state_dict(saved[0])
    rng = fresh.generator(torch.device("cpu")).get_state()
    fb = fresh.feedback
    consistent = all(torch.equal(fb.memories["worker"][p], fb.memories["shared"][p])
                     for p in fb.memories["shared"])
    return rng, saved[0]["rng"]["cpu"], [r.getMessage() for r in records], consistent


def test_rank0_checkpoint_loaded_everywhere_rederives_per_rank_state():
    """Not every rank on rank 0's generator (rounding noise perfectly correlated): each
    re-derives its own."""
    results = run_workers(rank0_checkpoint_worker, 2)
    (rng0, saved0, logs0, _), (rng1, _, logs1, consistent1) = results
    assert torch.equal(rng0, saved0) and not logs0           # rank 0 resumes exactly
    assert not torch.equal(rng1, saved0)                      # rank 1 re-derives its own
    assert any("checkpoint of rank 0" in m for m in logs1) and consistent1


def test_memories_resume_into_another_memory_format():
    """Memories live in bucket order (a channels_last weight's gradient is not row-major
    there; a complex value is two reals); checkpoints hold them row-major, so a residual saved
    from a channels_last model lands on the same entries of a contiguous one, and back (saved
    in bucket order and loaded as it, they would be permuted)."""
    from commpress.feedback import ErrorFeedback
    from commpress.layout import to_bucket_order

    def conv(channels_last, dtype=torch.float32):
        model = nn.Conv2d(3, 4, 2, dtype=dtype)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    for dtype in (torch.float32, torch.complex64):
        logical = torch.randn(4, 3, 2, 2, 2) if dtype.is_complex else torch.randn(4, 3, 2, 2)
        for saved_cl, loaded_cl in ((True, False), (False, True), (True, True)):
            source, target = conv(saved_cl, dtype), conv(loaded_cl, dtype)
            if dtype == torch.float32:
                assert source.weight.is_contiguous() != saved_cl  # the layouts really differ
            grad = torch.view_as_real(source.weight) if dtype.is_complex else source.weight
            # the bucket holds a gradient in memory order: DDP copies it there with its strides
            bucket = torch.empty_like(grad).copy_(logical)
            bucket_order = bucket.as_strided((bucket.numel(),), (1,))
            feedback = ErrorFeedback("ef")
            feedback.bind(source.named_parameters())
            feedback.memories["residual"][source.weight] = bucket_order.clone()
            saved = feedback.state_dict()
            assert torch.equal(saved["residual"]["weight"], logical.reshape(-1))  # row-major
            restored = ErrorFeedback("ef")
            restored.load_state_dict(saved)
            restored.bind(target.named_parameters())
            memory = restored.memories["residual"][target.weight]
            assert torch.equal(memory, to_bucket_order(target.weight, logical.reshape(-1)))
            target_grad = torch.view_as_real(target.weight) if dtype.is_complex else target.weight
            laid_out = torch.empty_like(target_grad).copy_(logical)
            assert torch.equal(memory, laid_out.as_strided((laid_out.numel(),), (1,)))
