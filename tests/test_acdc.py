"""AC/DC: schedules, masks and the sparse-phase hook, on real gloo process groups."""
import datetime
import io

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from commpress.acdc import magnitude_masks, prunable_weights
from distributed import run_workers


def test_paper_schedule_boundaries():
    s = cp.ACDCSchedule.paper(100)
    assert s.prune_steps == [10, 20, 30, 40, 50, 60, 70, 85]
    assert s.restore_steps == [15, 25, 35, 45, 55, 65, 75]
    assert s.sparse[-1] == (85, 100) and s.total == 100
    assert sum(b - a for a, b in s.sparse) == 50            # half the epochs are sparse
    assert [s.phase_at(t) for t in (0, 9, 10, 14, 15, 75, 84, 85, 99, 100)] == \
        ["dense", "dense", "sparse", "sparse", "dense", "dense", "dense", "sparse", "sparse", "sparse"]
    in_steps = cp.ACDCSchedule.paper(100, steps_per_epoch=390)
    assert in_steps.prune_steps == [390 * e for e in s.prune_steps]
    assert in_steps.total == 39_000


def test_paper_schedule_with_a_longer_last_dense_phase():
    """The dense member is taken at the end of the last dense phase; a longer one drops the
    alternations that would end inside it and keeps the final sparse phase."""
    s = cp.ACDCSchedule.paper(100, last_dense=0.3)
    assert s.sparse == [(10, 15), (20, 25), (30, 35), (40, 45), (50, 55), (85, 100)]
    assert cp.ACDCSchedule.paper(100, last_dense=0.10) == cp.ACDCSchedule.paper(100)
    for bad in (0.05, 0.8):
        with pytest.raises(ValueError, match="last_dense"):
            cp.ACDCSchedule.paper(100, last_dense=bad)


def test_paper_schedule_keeps_distinct_phases_in_short_runs():
    """5% of a short run is under one epoch: phases must neither round to nothing nor run
    into each other (15 epochs must not give (3, 4), (4, 5): one sparse phase where the paper
    has two)."""
    assert cp.ACDCSchedule.paper(10).sparse == [(1, 2), (3, 4), (5, 6), (8, 10)]
    for epochs in range(2, 60):
        s = cp.ACDCSchedule.paper(epochs)
        assert s.sparse[-1][1] == epochs, epochs          # ends with the final sparse phase
        dense_before = [a - b for (_, b), (a, _) in zip([(0, 0)] + s.sparse, s.sparse)]
        assert min(dense_before) >= 1, (epochs, s.sparse)  # a dense epoch before every phase
    with pytest.raises(ValueError, match="at least 2 epochs"):
        cp.ACDCSchedule.paper(1)


def test_ramp_raises_the_first_phase_sparsity_along_the_cubic_curve():
    s = cp.ACDCSchedule([(10, 30), (40, 50)], 60, ramp_steps=20)
    fractions = [s.sparsity_fraction(t) for t in range(10, 30, 2)]  # one per stage
    assert fractions == pytest.approx([1 - (1 - k / 10) ** 3 for k in range(1, 11)])
    assert [s.sparsity_fraction(t) for t in (10, 11)] == [fractions[0]] * 2
    assert all(s.sparsity_fraction(t) == 1.0 for t in (0, 9, 30, 40, 49, 100))
    assert cp.ACDCSchedule.paper(100, ramp_steps=5).ramp_steps == 5
    assert cp.ACDCSchedule([(0, 3)], 3).sparsity_fraction(0) == 1.0  # no ramp: at once
    with pytest.raises(ValueError, match=r"ramp_steps \(21\) must fit in the first sparse phase"):
        cp.ACDCSchedule([(10, 30)], 60, ramp_steps=21)
    with pytest.raises(ValueError, match="ramp_steps must be a non-negative integer, got -1"):
        cp.ACDCSchedule([(10, 30)], 60, ramp_steps=-1)
    with pytest.raises(ValueError, match="needs a sparse phase"):
        cp.ACDCSchedule([], 60, ramp_steps=5)


def test_bad_schedules_and_settings_raise():
    with pytest.raises(ValueError, match="overlaps"):
        cp.ACDCSchedule([(10, 20), (15, 25)], 100)
    with pytest.raises(ValueError, match="non-positive length"):
        cp.ACDCSchedule([(10, 5)], 100)
    with pytest.raises(ValueError, match="outside"):
        cp.ACDCSchedule([(90, 110)], 100)
    with pytest.raises(ValueError, match="positive"):
        cp.ACDCSchedule([], 0)
    with pytest.raises(ValueError, match="non-negative"):
        cp.ACDCSchedule.alternating(100, warmup=-1, sparse_len=5, dense_len=5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            cp.ACDC(model, opt, sparsity=bad, schedule=cp.ACDCSchedule([(0, 1)], 2))
    with pytest.raises(ValueError, match="scope"):
        cp.ACDC(model, opt, sparsity=0.5, schedule=cp.ACDCSchedule([(0, 1)], 2), scope="row")
    with pytest.raises(ValueError, match=r"pairs of steps, got 1"):
        cp.ACDCSchedule([1, 3], 5)
    with pytest.raises(ValueError, match="steps_per_unit must be a positive integer, got 0"):
        cp.ACDCSchedule([(1, 3)], 5, steps_per_unit=0)
    schedule = cp.ACDCSchedule([(0, 1)], 2)
    # each refused here, not accepted or failing later with an AttributeError
    other = torch.optim.SGD(torch.nn.Linear(4, 4).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer does not update the model's weights \['0.weight'\]"):
        cp.ACDC(model, other, schedule=schedule)
    with pytest.raises(TypeError, match="optimizer must be the model's torch optimizer, got NoneType"):
        cp.ACDC(model, None, schedule=schedule)
    with pytest.raises(TypeError, match="state must be the model's CompressionState or None, got str"):
        cp.ACDC(model, opt, "qsgd4", schedule=schedule)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        cp.ACDC(model.state_dict(), opt, schedule=schedule)


def test_checkpoint_of_another_model_or_malformed_is_refused_by_name():
    """Masks are multiplied into the weights: a checkpoint's masks of another shape, for other
    layers, or holding values other than 0/1 must not load (they would broadcast into the
    weights, scale them, or fail at the next step with a KeyError)."""
    def coordinator(*widths):
        model = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
        return cp.ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5,
                       schedule=cp.ACDCSchedule([(1, 3)], 5))
    acdc = coordinator(8, 8, 2)
    acdc.step()
    saved = acdc.state_dict()
    assert saved["phase"] == "sparse"
    with pytest.raises(ValueError, match=r"mask '0.weight' is \(8, 8\), the weight \(4, 8\)"):
        coordinator(8, 4, 2).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"are not this model's prunable weights"):
        coordinator(8, 8, 2, 2).load_state_dict(saved)
    scaled = {**saved, "masks": {k: v.float() * 0.5 for k, v in saved["masks"].items()}}
    with pytest.raises(ValueError, match="mask '0.weight' holds values other than 0 and 1"):
        acdc.load_state_dict(scaled)
    with pytest.raises(ValueError, match="phase must be 'dense' or 'sparse', got 'banana'"):
        acdc.load_state_dict({**saved, "phase": "banana"})
    with pytest.raises(ValueError, match="a sparse phase needs a mask per prunable weight"):
        acdc.load_state_dict({**saved, "masks": {}})
    with pytest.raises(ValueError, match=r"not an AC/DC checkpoint .* missing \['steps'"):
        acdc.load_state_dict({"model": 1})
    as_floats = {**saved, "masks": {k: v.float() for k, v in saved["masks"].items()}}
    acdc.load_state_dict(as_floats)  # 0/1 in another dtype is a mask
    assert all(m.dtype == torch.bool for m in acdc.masks.values())
    assert all(torch.equal(acdc.masks[k], saved["masks"][k]) for k in saved["masks"])


def test_masks_prune_only_conv_linear_weights_exactly():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10), torch.nn.Linear(10, 3))
    names = [n for n, _ in prunable_weights(model)]
    assert names == ["0.weight", "3.weight", "4.weight"]
    assert [n for n, _ in prunable_weights(model, keep_first_last=True)] == ["3.weight"]
    weights = prunable_weights(model)
    total = sum(w.numel() for _, w in weights)
    for scope in ("global", "layerwise"):
        masks = magnitude_masks(weights, 0.9, scope)
        kept = sum(int(m.sum()) for m in masks.values())
        assert abs(kept - 0.1 * total) <= len(masks)
    ties = [("w", torch.ones(1000))]
    assert int(magnitude_masks(ties, 0.9)["w"].sum()) == 100   # exactly k even when all tie


def test_attention_input_projections_are_pruned_with_the_linear_layers():
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 16), block)
    names = [n for n, _ in prunable_weights(model)]
    assert names == ["1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight",
                     "1.linear1.weight", "1.linear2.weight"]  # no embedding, no norms
    separate = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    assert [n for n, _ in prunable_weights(separate)] == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acdc = cp.ACDC(model, opt, None, sparsity=0.9, schedule=cp.ACDCSchedule([(0, 3)], 3))
    for _ in range(2):
        model(torch.randint(0, 10, (4, 5))).sum().backward()
        opt.step()
        opt.zero_grad()
        acdc.step()
        w = block.self_attn.in_proj_weight
        assert int((w != 0).sum()) == int(acdc.masks["1.self_attn.in_proj_weight"].sum())
    assert acdc.density == pytest.approx(0.1, abs=0.01)


def big_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16))


def data(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 256, generator=g)
    return x, x[:, :16] - x[:, 16:32]


def run_steps(model, opt, acdc, rank, first, last, check=None):
    for step in range(first, last):
        x, y = data(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if check:
            check(model)
        opt.step()
        opt.zero_grad()
        acdc.step()
        if acdc.phase == "sparse" and check:
            for name, w in acdc.weights:
                assert torch.all(w[~acdc.masks[name]] == 0), f"pruned weights of {name} moved"


def acdc_worker(rank, world_size, spec, tied, schedule=None, policy="fixed"):
    # dense 0-4 (0-1 plain all-reduce), sparse 4-8, dense 8-10
    schedule = schedule or cp.ACDCSchedule([(4, 8)], 10)
    model = big_model()
    if tied:  # many equal magnitudes: masks must still agree
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.sign(p) * (torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5) * 0.01 + 0.01)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, spec, log_every=0, policy=policy)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    acdc = cp.ACDC(ddp, opt, state, sparsity=0.9, schedule=schedule)
    seen_masks, grads_outside = [], []

    def check(m):
        if acdc.phase == "sparse":
            for name, w in acdc.weights:
                grads_outside.append(w.grad[~acdc.masks[name]].abs().max().item())

    densities = []
    for step in range(schedule.total):
        run_steps(ddp, opt, acdc, rank, step, step + 1, check)
        if acdc.phase == "sparse":
            seen_masks.append({k: v.clone() for k, v in acdc.masks.items()})
            densities.append(acdc.density)
    return {"masks": seen_masks, "densities": densities, "grads_outside": max(grads_outside),
            "dense": state.phase_stats["dense"].last_step.wire_bytes,
            "sparse": state.phase_stats["sparse"].last_step.wire_bytes,
            "sparse_steps": state.phase_stats["sparse"].steps,
            "params": [p.detach().clone() for p in ddp.parameters()]}


@pytest.mark.parametrize("spec,low,high", [("fp32", 0.09, 0.11), ("qsgd4", 0.08, 0.12)])
def test_sparse_phase_sends_only_the_mask(spec, low, high):
    results = run_workers(acdc_worker, 2, spec, False)
    for r in results:
        assert r["sparse_steps"] == 4
        ratio = r["sparse"] / r["dense"]
        assert low <= ratio <= high, (spec, ratio, r["sparse"], r["dense"])
        assert r["grads_outside"] == 0.0     # the hook returns zeros off the mask
    for m0, m1 in zip(results[0]["masks"], results[1]["masks"]):
        assert all(torch.equal(m0[k], m1[k]) for k in m0)
    for p0, p1 in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p0, p1)


def test_masks_identical_with_tied_magnitudes():
    results = run_workers(acdc_worker, 2, "fp32", True)
    assert results[0]["masks"], "no sparse phase seen"
    for m0, m1 in zip(results[0]["masks"], results[1]["masks"]):
        assert all(torch.equal(m0[k], m1[k]) for k in m0)


@pytest.mark.parametrize("policy", ["calibrated", "fixed"])
def test_ramped_first_prune_nests_its_masks_on_every_rank(policy):
    """The ramp re-prunes during the first sparse phase: each stage keeps a subset of the last
    stage's weights (the pruned ones are zero, the smallest magnitudes), the same on both
    ranks, and the hook sends only the current stage's entries (under the default policy
    too)."""
    schedule = cp.ACDCSchedule([(2, 10)], 12, ramp_steps=5)
    results = run_workers(acdc_worker, 2, "qsgd4", False, schedule, policy)
    expected = [1 - 0.9 * schedule.sparsity_fraction(t) for t in range(2, 10)]
    for r in results:
        assert r["densities"] == pytest.approx(expected, abs=1e-3)
        assert r["grads_outside"] == 0.0
        for before, after in zip(r["masks"], r["masks"][1:]):
            assert all(not torch.any(after[k] & ~before[k]) for k in before)
    assert len({round(d, 4) for d in results[0]["densities"]}) == 6  # 5 stages, then 0.1
    for m0, m1 in zip(results[0]["masks"], results[1]["masks"]):
        assert all(torch.equal(m0[k], m1[k]) for k in m0)
    for p0, p1 in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p0, p1)


def resume_worker(rank, world_size, spec, ramp_steps=0):
    schedule = cp.ACDCSchedule([(3, 9)], 12, ramp_steps=ramp_steps)

    def build():
        ddp = DDP(big_model(), bucket_cap_mb=25)
        state = cp.register_hook(ddp, spec, log_every=0, policy="fixed")
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        return ddp, state, opt, cp.ACDC(ddp, opt, state, sparsity=0.9, schedule=schedule)

    ddp, state, opt, acdc = build()
    run_steps(ddp, opt, acdc, rank, 0, 6)
    saved_density = acdc.density
    buf = io.BytesIO()
    torch.save({"model": ddp.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict(),
                "acdc": acdc.state_dict()}, buf)
    run_steps(ddp, opt, acdc, rank, 6, 12)
    expected = [p.detach().clone() for p in ddp.parameters()]
    sparse_member, dense_member = acdc.sparse_dense_pair()

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ddp2, state2, opt2, acdc2 = build()
    ddp2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    state2.load_state_dict(ckpt["comm"])
    acdc2.load_state_dict(ckpt["acdc"])
    assert acdc2.phase == "sparse" and acdc2.density == saved_density < 1
    run_steps(ddp2, opt2, acdc2, rank, 6, 12)
    same = all(torch.equal(a, b.detach()) for a, b in zip(expected, ddp2.parameters()))
    sparse2, dense2 = acdc2.sparse_dense_pair()
    current = ddp2.module.state_dict()
    members_match = all(torch.equal(dense_member[k], dense2[k]) and torch.equal(dense2[k], current[k])
                        and torch.equal(sparse_member[k], sparse2[k]) for k in dense_member)
    weights = torch.cat([v.reshape(-1) for v in sparse2.values() if v.dim() == 2])
    return same, members_match, (weights == 0).float().mean().item()


@pytest.mark.parametrize("spec,ramp_steps", [("fp32", 0), ("qsgd4+ef", 0), ("qsgd4+ef", 5)])
def test_resume_mid_sparse_phase(spec, ramp_steps):
    """ramp_steps=5: saved at step 6, in the middle of the first phase's ramp (3-7)."""
    for same, members_match, sparse_zeros in run_workers(resume_worker, 2, spec, ramp_steps):
        assert same
        # the schedule ends dense: the dense member is the current weights, the sparse one
        # the weights when the sparse phase ended (saved across the resume)
        assert members_match and abs(sparse_zeros - 0.9) < 1e-3


def schedule_mismatch_worker(rank, world_size, policy):
    """Rank 1's sparse phase starts one step after rank 0's."""
    schedule = cp.ACDCSchedule([(4 + rank, 8)], 10)
    ddp = DDP(big_model())
    # "pinned": the calibrated policy held on a plan of fp32 all-reduces (the hook's direct path)
    pinned = {"step": 0, "entries": [{"numel": 1, "codec": "fp32", "collective": "allreduce",
                                      "seconds": {}}]}
    state = cp.register_hook(ddp, "qsgd4", log_every=0, **(
        dict(plan=pinned) if policy == "pinned" else dict(policy=policy)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    acdc = cp.ACDC(ddp, opt, state, sparsity=0.9, schedule=schedule)
    try:
        for step in range(10):
            run_steps(ddp, opt, acdc, rank, step, step + 1, lambda m: None)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("policy", ["fixed", "calibrated", "pinned"])
def test_sparse_phase_starting_a_step_apart_fails_with_a_named_error(policy):
    """Fails at once, not at the group timeout (30 minutes by default), under every policy:
    the calibrated default's plans of plain all-reduces agree on the step and phase too."""
    for message in run_workers(schedule_mismatch_worker, 2, policy, timeout=120,
                               pg_timeout=datetime.timedelta(seconds=20)):
        assert "configured differently" in message and "acdc_phase" in message, message


def train_alone(optimizer_name, sparsity, schedule, steps=30):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.01))
    acdc = cp.ACDC(model, opt, None, sparsity=sparsity, schedule=schedule) if schedule else None
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :4]).backward()
        opt.step()
        if acdc is not None:
            acdc.step()
    return model, opt, acdc


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_sparsity_zero_trains_exactly_like_no_acdc(optimizer_name):
    """Phase changes must not clear the whole optimizer state: with 3-step phases at sparsity
    0, that costs commpress train 17 points on digits (76.9% against fp32's 93.6%)."""
    schedule = cp.ACDCSchedule([(3, 6), (9, 12), (15, 18), (21, 24)], 30)
    plain, _, _ = train_alone(optimizer_name, 0.0, None)
    phased, _, _ = train_alone(optimizer_name, 0.0, schedule)
    for a, b in zip(plain.parameters(), phased.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_restore_zeroes_only_the_pruned_entries_directional_optimizer_state(optimizer_name):
    """Momentum and Adam's first moment of pruned entries are zero through the sparse phase
    and at the restore; Adam's second moment is kept (zeroed, Adam's bias correction made the
    restored weights' first steps 3-6 times its usual size)."""
    from commpress.acdc.coordinator import is_scale_state
    model, opt, acdc = train_alone(optimizer_name, 0.5, cp.ACDCSchedule([(10, 20)], 40), steps=19)
    masks = {name: acdc.masks[name].clone() for name, _ in acdc.weights}
    for name, w in acdc.weights:  # held at zero through the sparse phase
        for key, value in opt.state[w].items():
            if value.shape == w.shape and not is_scale_state(key):
                assert value[~masks[name]].abs().max() == 0, (name, key)
    opt.step()   # step 20 (the last gradients again), then the restore
    acdc.step()
    assert acdc.phase == "dense"
    kinds = set()
    for name, w in acdc.weights:
        for key, value in opt.state[w].items():
            if value.shape != w.shape:
                continue
            kinds.add(key)
            pruned = value[~masks[name]].abs()
            if is_scale_state(key):
                assert pruned.min() > 0, (name, key)                  # the scale is kept
            else:
                assert pruned.max() == 0, (name, key)                 # restarts from zero
            assert value[masks[name]].abs().max() > 0, (name, key)    # goes on, not reset
    assert kinds == ({"momentum_buffer"} if optimizer_name == "sgd" else {"exp_avg", "exp_avg_sq"})