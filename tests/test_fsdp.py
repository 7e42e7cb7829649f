"""The FSDP front end on real gloo ranks: FSDP2 (fully_shard) modules reduce-scatter their
gradients through commpress."""
import pytest
import torch
from torch import nn

import commpress as cp
from distributed import run_workers

fsdp = pytest.importorskip("torch.distributed.fsdp")
fully_shard, MixedPrecisionPolicy = fsdp.fully_shard, fsdp.MixedPrecisionPolicy


def sharded_model(seed=0, reduce_dtype=None):
    """Two Linear blocks of uneven sizes (FSDP pads their shards), each its own FSDP module."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(33, 300), nn.ReLU(), nn.Linear(300, 7))
    kwargs = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=reduce_dtype)} if reduce_dtype else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def train(model, rank, steps, accumulate=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            model.set_requires_gradient_sync(micro == accumulate - 1)
            g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
            x = torch.randn(16, 33, generator=g)
            loss = nn.functional.mse_loss(model(x), x[:, :7])
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return [p.full_tensor().detach().clone() for p in model.parameters()], losses


def comparison_worker(rank, world_size, spec, steps, reduce_dtype, accumulate, options=None):
    """FSDP's own training against the same with ``spec`` (the fixed policy unless
    ``options`` say otherwise: the codec on every reduce-scatter)."""
    plain, plain_losses = train(sharded_model(reduce_dtype=reduce_dtype), rank, steps, accumulate)
    model = sharded_model(reduce_dtype=reduce_dtype)
    state = cp.fsdp.compress(model, spec, **{"policy": "fixed", **(options or {})})
    compressed, losses = train(model, rank, steps, accumulate)
    return {"plain": plain, "compressed": compressed, "plain_losses": plain_losses,
            "losses": losses, "iter": state.iter, "steps": state.stats.steps,
            "wire": state.stats.network_bytes, "fp32": state.stats.fp32_bytes,
            "plan": state.state_dict()["plan"], "summary": state.stats.summary(),
            "last_ratio": state.stats.last_step.ratio}


def relative(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


def ef21_invariant_worker(rank, world_size):
    """After training under qsgd4+ef21: per module, this rank's shard of the shared estimate
    against its shard of the mean of the ranks' own estimates."""
    import torch.distributed as dist
    model = sharded_model()
    state = cp.fsdp.compress(model, "qsgd4+ef21", policy="fixed")
    train(model, rank, 5)
    gaps = []
    for name, shared in state.feedback.memories["shared"].items():
        workers = state.feedback.memories["worker"][name].clone()
        dist.all_reduce(workers)
        mine = workers.view(world_size, -1)[rank] / world_size
        gaps.append(((mine - shared).norm() / shared.norm()).item())
    return gaps


def test_ef21_shared_shard_is_the_mean_of_the_ranks_estimates():
    """EF21's invariant under a reduce-scatter (no second quantization): every rank's shard
    of the shared estimate is its shard of the mean of the workers' estimates."""
    for gaps in run_workers(ef21_invariant_worker, 2):
        assert len(gaps) == 2 and max(gaps) < 1e-5, gaps  # the two Linear modules


def test_identity_is_fsdps_own_reduce_scatter_bit_for_bit_on_two_ranks():
    for r in run_workers(comparison_worker, 2, "fp32", 4, None, 1):
        for a, b in zip(r["compressed"], r["plain"]):
            assert torch.equal(a, b)
        assert r["iter"] == r["steps"] == 4
        assert r["wire"] - r["fp32"] == 4 * 2 * 24  # fp32 bytes and a header per module and step


@pytest.mark.parametrize("world_size", [2, 4])
def test_qsgd8_stays_within_its_noise_of_fsdp_and_sends_a_quarter(world_size):
    results = run_workers(comparison_worker, world_size, "qsgd8", 5, None, 1)
    for r in results:
        assert relative(r["compressed"], r["plain"]) < 0.02
        assert 3.5 < r["fp32"] / r["wire"] < 4.1   # 8 bits + scales and headers
    for a, b in zip(results[0]["compressed"], results[-1]["compressed"]):
        assert torch.equal(a, b)   # every rank holds the same parameters


def test_identity_on_four_ranks_matches_fsdp_to_rounding():
    for r in run_workers(comparison_worker, 4, "fp32", 3, None, 1):
        assert relative(r["compressed"], r["plain"]) < 1e-6


def feedback_worker(rank, world_size, specs, steps):
    """FSDP's own training, then the same under each of ``specs`` (one process group)."""
    _, plain_losses = train(sharded_model(), rank, steps, 1)
    runs = {}
    for spec in specs:
        model = sharded_model()
        cp.fsdp.compress(model, spec, policy="fixed")
        runs[spec] = train(model, rank, steps, 1)
    return plain_losses, runs


def test_qsgd_with_error_feedback_trains_like_fsdp():
    results = run_workers(feedback_worker, 2, ["qsgd4+ef", "qsgd4+ef21"], 30)
    for spec in ("qsgd4+ef", "qsgd4+ef21"):
        for plain_losses, runs in results:
            losses = runs[spec][1]
            assert sum(losses[-5:]) < 1.1 * sum(plain_losses[-5:]), (spec, losses, plain_losses)
        for a, b in zip(results[0][1][spec][0], results[1][1][spec][0]):
            assert torch.equal(a, b), spec   # every rank steps with the same estimate


def test_bf16_reduce_dtype_and_gradient_accumulation():
    """FSDP's reduce dtype bf16 reaches the codec as bf16, the shard comes back in bf16; with
    set_requires_gradient_sync(False) on the first of two micro-batches only the second
    reduce-scatters, and a step is one backward that did."""
    for r in run_workers(comparison_worker, 2, "qsgd8", 3, torch.bfloat16, 2):
        assert relative(r["compressed"], r["plain"]) < 0.03
        assert r["iter"] == r["steps"] == 3


def divide_factor_worker(rank, world_size):
    """set_gradient_divide_factor(f): FSDP asks for PREMUL_SUM(1/f), which gloo refuses; the
    compressed reduce-scatter gives sum / f."""
    grads = []
    for factor in (None, 1.0):
        model = sharded_model()
        cp.fsdp.compress(model, "fp32", policy="fixed")
        if factor is not None:
            for m in model.modules():
                if isinstance(m, fsdp.FSDPModule):
                    m.set_gradient_divide_factor(factor)
        x = torch.randn(8, 33, generator=torch.Generator().manual_seed(rank))
        model(x).square().mean().backward()
        grads.append([p.grad.full_tensor() for p in model.parameters()])
    return grads


def test_gradient_divide_factor_is_honoured():
    for mean, summed in run_workers(divide_factor_worker, 2):
        for m, s in zip(mean, summed):
            assert torch.allclose(s, 2 * m, rtol=1e-6, atol=1e-7)


def bad_input_worker(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP
    errors = {}
    cases = {
        "ddp": lambda: cp.fsdp.compress(DDP(nn.Linear(4, 4)), "qsgd4"),
        "plain": lambda: cp.fsdp.compress(nn.Linear(4, 4), "qsgd4"),
        "policy": lambda: cp.fsdp.compress(sharded_model(), "qsgd4", policy="fastest"),
        "two_hop": lambda: cp.fsdp.compress(sharded_model(), "qsgd4", two_hop="yes"),
        "name": lambda: cp.fsdp.compress(sharded_model(), "qsgd9"),
    }
    for name, call in cases.items():
        try:
            call()
            errors[name] = "no error"
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def test_bad_input_is_refused_at_setup_by_name():
    errors = run_workers(bad_input_worker, 2)[0]
    assert "DistributedDataParallel model: use commpress.register_hook" in errors["ddp"]
    assert "found no FSDP module" in errors["plain"]
    assert "policy must be one of" in errors["policy"]
    assert "two_hop must be True or False" in errors["two_hop"]
    assert "unknown hook 'qsgd9'" in errors["name"]


# -- the default (calibrated) policy --------------------------------------------------------
OWN_PLAN = {"step": 0, "entries": [{"numel": 1, "codec": "fsdp", "collective": "reduce_scatter",
                                    "seconds": {}}]}
CODEC_PLAN = {"step": 0, "entries": [{"numel": 1, "codec": "codec",
                                      "collective": "reduce_scatter", "seconds": {}}]}


def test_a_pinned_plan_of_fsdps_own_reduce_scatter_is_fsdp_bit_for_bit():
    for r in run_workers(comparison_worker, 2, "qsgd4", 4, None, 1,
                         {"policy": "calibrated", "plan": OWN_PLAN}):
        for a, b in zip(r["compressed"], r["plain"]):
            assert torch.equal(a, b)
        assert r["wire"] == r["fp32"] and "fsdp/reduce_scatter" in r["summary"]


def test_a_pinned_codec_plan_compresses_from_the_first_step():
    for r in run_workers(comparison_worker, 2, "qsgd8", 4, None, 1,
                         {"policy": "calibrated", "plan": CODEC_PLAN}):
        assert relative(r["compressed"], r["plain"]) < 0.02 and r["last_ratio"] > 3.5


def fake_timings(runs, control, device=None, prepare=None):
    """Every candidate runs (they communicate, as in a real calibration); the codec wins."""
    for run in runs:
        prepare()
        run()
    return [1.0, 0.6, 0.1][:len(runs)]


def calibrated_worker(rank, world_size, faked):
    import commpress.engine.policy
    if faked:
        commpress.engine.policy.measure = fake_timings
    return comparison_worker(rank, world_size, "qsgd4", 20, None, 1, {"policy": "calibrated"})


@pytest.mark.parametrize("faked", [True, False])
def test_the_default_policy_adopts_one_plan_on_every_rank(faked):
    """With timings that make the codec win it compresses from its adoption on; with the real
    ones (on loopback usually FSDP's own) every rank still adopts the same plan, trains, and
    its summary names it."""
    results = run_workers(calibrated_worker, 2, faked)
    plan = results[0]["plan"]
    assert plan is not None and plan == results[1]["plan"]
    assert {e["codec"] for e in plan["entries"]} <= {"fsdp", "bf16", "codec"}
    assert len(plan["entries"]) == 2  # one choice per FSDP module size
    for r in results:
        assert "plan of step" in r["summary"] and r["iter"] == 20
        assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
        if faked:
            assert r["last_ratio"] > 5  # QSGD-4 on both modules
    for a, b in zip(results[0]["compressed"], results[1]["compressed"]):
        assert torch.equal(a, b)


# -- hybrid sharding: FSDP inside a node, commpress across nodes ------------------------------
def hybrid_worker(rank, world_size, spec, options=None, faked=False):
    """2 "nodes" of 2 ranks: each module sharded over its node's ranks, the cross-node
    all-reduce of each shard through commpress; against FSDP over all 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    import commpress.engine.policy
    if faked:
        commpress.engine.policy.measure = fake_timings
    plain, _ = train(sharded_model(), rank, 4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 300), nn.ReLU(), nn.Linear(300, 7))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    state = cp.fsdp.compress(model, spec, replicate_group=mesh["replicate"].get_group(),
                             **(options if options is not None else {"policy": "fixed"}))
    hybrid, losses = train(model, rank, 4 if options is None else 20)
    return plain, hybrid, state.stats.last_step.ratio, state.iter, state.state_dict()["plan"], losses


@pytest.mark.parametrize("spec,tolerance", [("fp32", 1e-6), ("qsgd8", 0.02)])
def test_hybrid_sharding_compresses_the_cross_node_all_reduce(spec, tolerance):
    results = run_workers(hybrid_worker, 4, spec)
    for plain, hybrid, ratio, steps, _, _ in results:
        assert relative(hybrid, plain) < tolerance, spec
        assert steps == 4
        assert ratio > (3.5 if spec == "qsgd8" else 0.9)
    for a, b in zip(results[0][1], results[3][1]):
        assert torch.equal(a, b)  # every rank holds the same parameters


@pytest.mark.parametrize("faked", [True, False])
def test_hybrid_sharding_under_the_default_policy_adopts_a_plan_per_replica_group(faked):
    """The calibrated default decides each module's cross-node hop (fp32, bf16 or the codec):
    with timings that make the codec win it compresses; with the real ones the ranks that
    reduce together adopt one plan; either way all four train and agree."""
    results = run_workers(hybrid_worker, 4, "qsgd4+ef", {}, faked)
    for group in ((0, 2), (1, 3)):  # the replicate groups: the same shard on both nodes
        plans = [results[r][4] for r in group]
        assert plans[0] is not None and plans[0] == plans[1]
        assert {e["collective"] for e in plans[0]["entries"]} == {"allreduce"}
    for _, _, ratio, steps, plan, losses in results:
        assert steps == 20 and sum(losses[-3:]) < sum(losses[:3])
        if faked:
            assert {e["codec"] for e in plan["entries"]} == {"codec"} and ratio > 5
    for a, b in zip(results[0][1], results[3][1]):
        assert torch.equal(a, b)


# -- plain FSDP across nodes: two hops, the codec only between nodes -------------------------
def two_hop_worker(rank, world_size, spec):
    """2 "nodes" of 2 ranks, FSDP over all 4: the flat codec reduce-scatter against two hops."""
    import os
    os.environ["GROUP_RANK"] = str(rank // 2)
    plain, _ = train(sharded_model(), rank, 4)
    runs = {}
    for two_hop in (False, True):
        model = sharded_model()
        state = cp.fsdp.compress(model, spec, policy="fixed", two_hop=two_hop)
        params, losses = train(model, rank, 4)
        runs[two_hop] = (params, losses, state.stats.network_bytes, state.stats.intra_node_bytes)
    return plain, runs


def test_two_hop_reduce_scatter_tracks_fsdp_and_sends_a_third_across_nodes():
    """QSGD-8 with error feedback in two hops against FSDP's own training (the hops' exactness
    with Identity is pinned in-process: tests/test_collective_buffers.py)."""
    results = run_workers(two_hop_worker, 4, "qsgd8+ef")
    for plain, runs in results:
        params, losses, network, intra = runs[True]
        assert relative(params, plain) < 0.02
        _, _, flat_network, flat_intra = runs[False]
        # a rank sends N - 1 = 1 chunk across nodes instead of W - 1 = 3 (headers aside)
        assert 0.3 < network / flat_network < 0.4, (network, flat_network)
        assert intra > 0 and flat_intra == 0
    for a, b in zip(results[0][1][True][0], results[3][1][True][0]):
        assert torch.equal(a, b)  # every rank holds the same parameters


def two_hop_refusal_worker(rank, world_size):
    import torch.distributed as dist
    try:
        cp.fsdp.compress(sharded_model(), "qsgd4", policy="fixed", two_hop=True,
                         replicate_group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_two_hop_and_hybrid_sharding_are_refused_together():
    assert "pass one or the other" in run_workers(two_hop_refusal_worker, 2)[0]


# -- checkpoints ------------------------------------------------------------------------------
def resume_worker(rank, world_size, spec, how, folder):
    """Each rank saves its shard of the model and optimizer and its commpress state (rounding
    generator, error-feedback memories, plan) after 3 steps, with ``torch.save`` per rank or
    with ``torch.distributed.checkpoint`` beside a per-rank commpress file (README's two
    recipes); a fresh model resumed from them trains 3 more steps bit-identically to the
    uninterrupted run."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model = sharded_model()
        state = cp.fsdp.compress(model, spec, policy="fixed")
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), state

    def steps(model, opt, first, count):
        for step in range(first, first + count):
            x = torch.randn(16, 33, generator=torch.Generator().manual_seed(1000 * rank + step))
            nn.functional.mse_loss(model(x), x[:, :7]).backward()
            opt.step()
            opt.zero_grad()

    mine = os.path.join(folder, f"commpress-rank{rank}.pt")
    model, opt, state = fresh()
    steps(model, opt, 0, 3)
    if how == "torch.save":
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "commpress": state.state_dict()}, mine)
    else:
        model_state, opt_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "opt": opt_state}, checkpoint_id=folder)
        torch.save(state.state_dict(), mine)
    steps(model, opt, 3, 3)
    model2, opt2, state2 = fresh()
    if how == "torch.save":
        saved = torch.load(mine, weights_only=False)  # DTensor shards
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        state2.load_state_dict(saved["commpress"])
    else:
        model_state, opt_state = get_state_dict(model2, opt2)
        loaded = {"model": model_state, "opt": opt_state}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(model2, opt2, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["opt"])
        state2.load_state_dict(torch.load(mine, weights_only=True))
    steps(model2, opt2, 3, 3)
    return all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(model.parameters(), model2.parameters())), state2.iter


@pytest.mark.parametrize("spec,how", [("qsgd4", "torch.save"), ("qsgd4+ef", "torch.save"),
                                      ("qsgd4+ef", "dcp"), ("qsgd4+ef21", "torch.save")])
def test_resume_from_per_rank_checkpoints_is_bit_identical(spec, how, tmp_path):
    for same, steps in run_workers(resume_worker, 2, spec, how, str(tmp_path)):
        assert same and steps == 6
