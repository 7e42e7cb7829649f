"""The calibrated policy: what it times, how it decides, and that every rank follows one plan
that survives checkpoints, falls back to fp32 when the codec does not pay, and is measured
again when any rank sees the step's reduction time drift."""
import io
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
import commpress.engine.averaging
from commpress.engine.averaging import GroupAverager
from commpress.engine.reduction import ReductionEngine
import commpress.engine.policy
from commpress.comm import LoopbackGroup
from commpress.comm.calibration import (FP32, MAX_UNREAD, TRIAL_STEPS, WINDOW, Candidate,
                                        DriftMonitor, Plan, PlanEntry, Trials, candidates, decide,
                                        finalists, measure)
from distributed import run_workers

FP16 = Candidate("fp16", "allreduce")
GATHER, SCATTER, HIER = (Candidate("codec", c) for c in ("allgather", "reduce_scatter", "hierarchical"))


# -- the pieces, in one process ----------------------------------------------------------------
def test_candidates_most_exact_first():
    q = cp.QSGD(bits=4)
    assert candidates(q, "auto", 2, False) == [FP32, FP16, GATHER]
    assert candidates(q, "auto", 4, True) == [FP32, FP16, GATHER, SCATTER, HIER]
    assert candidates(q, "reduce_scatter", 2, False) == [FP32, FP16, SCATTER]
    assert candidates(cp.BF16(), "auto", 4, False) == [FP32, Candidate("codec", "allreduce")]
    assert candidates(cp.Identity(), "auto", 4, True) == [FP32]


@pytest.mark.parametrize("seconds, expected", [
    ([1.0, 0.5, 0.1], GATHER),      # the codec pays
    ([1.0, 0.5, 0.49], FP16),       # within 5% of fp16, which is more exact
    ([0.10, 0.2, 0.096], FP32),     # a near tie goes to fp32
    ([0.10, 0.2, 0.5], FP32),       # a fast link
])
def test_decide_takes_the_most_exact_within_the_margin(seconds, expected):
    assert decide([FP32, FP16, GATHER], seconds) == expected


def test_measure_is_the_slowest_rank_and_the_same_everywhere():
    def body(transport):
        delay = 0.02 * (transport.rank + 1)  # rank 1 is the slow one
        return measure([lambda: time.sleep(delay), lambda: None], transport)

    results = LoopbackGroup(2).run(body)
    assert results[0] == results[1]
    assert 0.04 <= results[0][0] < 0.2 and results[0][1] < 0.02


def test_plan_round_trip_nearest_size_and_refusals():
    plan = Plan(3, {100: PlanEntry(100, FP32, {"fp32": 1e-3}),
                    10_000: PlanEntry(10_000, GATHER, {"fp32": 2e-3, "qsgd4/allgather": 1e-3})})
    again = Plan.from_state_dict(plan.state_dict(), candidates(cp.QSGD(), "auto", 3, True))
    assert again.state_dict() == plan.state_dict() and again.step == 3
    assert again.entry_for(90).choice == FP32 and again.entry_for(5_000).choice == GATHER
    assert "qsgd4/allgather" in again.summary(cp.QSGD(bits=4))
    with pytest.raises(ValueError, match="not a candidate"):  # a plan of another configuration
        Plan.from_state_dict(plan.state_dict(), candidates(cp.QSGD(), "reduce_scatter", 3, False))
    with pytest.raises(ValueError, match="malformed"):
        Plan.from_state_dict({"step": 1}, [FP32])


def test_drift_monitor_flags_a_slower_or_faster_link_only():
    monitor = DriftMonitor()
    for seconds in [0.1] * WINDOW + [0.15] * WINDOW:
        monitor.add(seconds / 2, step_done=False)  # two buckets a step
        monitor.add(seconds / 2, step_done=True)
    assert monitor.reference == pytest.approx(0.1) and not monitor.drifted()
    for _ in range(WINDOW):
        monitor.add(0.25, step_done=True)
    assert monitor.drifted()
    monitor.reset()
    for seconds in [0.1] * WINDOW + [0.04] * WINDOW:
        monitor.add(seconds, step_done=True)
    assert monitor.drifted()


class _FakeTimer:
    """A stopped CudaTimer whose work the GPU finishes when the test says."""

    def __init__(self, seconds):
        self.value, self.finished, self.waited = seconds, False, False

    def done(self):
        return self.finished

    def seconds(self):
        self.waited = not self.finished
        return self.value


def test_drift_monitor_reads_gpu_timers_in_order_once_done():
    monitor = DriftMonitor()
    timers = [_FakeTimer(0.1) for _ in range(2 * WINDOW)]
    for timer in timers[:WINDOW]:
        monitor.add_timer(timer, step_done=True)
    assert monitor.reference is None  # nothing finished, nothing read, nothing waited for
    timers[1].finished = True
    monitor.add_timer(timers[WINDOW], step_done=True)
    assert monitor.reference is None  # the oldest is not done: read in order
    for timer in timers:
        timer.finished = True
    for timer in timers[WINDOW + 1:]:
        monitor.add_timer(timer, step_done=True)
    assert monitor.reference == pytest.approx(0.1) and not monitor.drifted()
    assert not any(timer.waited for timer in timers)
    # a GPU far behind: the oldest is waited for rather than piling up timers
    slow = [_FakeTimer(0.1) for _ in range(MAX_UNREAD + 1)]
    for timer in slow:
        monitor.add_timer(timer, step_done=True)
    assert slow[0].waited and not slow[1].waited


def test_state_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        cp.CompressionState(cp.QSGD(), policy="fastest")
    with pytest.raises(ValueError, match="recalibrate_every"):
        cp.CompressionState(cp.QSGD(), recalibrate_every=-1)


# -- the hook, on real processes -------------------------------------------------------------
class SlowQSGD(cp.QSGD):
    """QSGD that takes 50 ms more per encode: a codec that never pays."""

    def encode(self, *args, **kwargs):
        time.sleep(0.05)
        return super().encode(*args, **kwargs)


def model_and_data(rank, width=256):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    return model, torch.Generator().manual_seed(10 + rank)


def train(model, steps, data, opt, width=256):
    for _ in range(steps):
        x = torch.randn(8, width, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :4]).backward()
        opt.step()


def fake_timings(runs, control, device=None, prepare=None):
    """``fake_timings.seconds`` for fp32, fp16 and the codec's collectives, as if measured."""
    fake_timings.calls += 1
    for run in runs:  # the runs still communicate, as in a real calibration
        if prepare is not None:
            prepare()
        run()
    return fake_timings.seconds[:len(runs)]


fake_timings.calls = 0
#: the codec far ahead: no other plan comes within TRIAL_FACTOR, so no trial steps
fake_timings.seconds = [1.0, 0.5, 0.1, 0.2, 0.3]


def default_policy_worker(rank, world_size, codec):
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=0.1)  # several buckets
    state = cp.register_hook(ddp, cp.CompressionState(codec, log_every=0))
    worker_calls = []
    reduce_group = ReductionEngine.reduce
    ReductionEngine.reduce = lambda *a: worker_calls.append(1) or reduce_group(*a)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(ddp, 2, data, opt)  # fp32, then the calibration step
    before = len(worker_calls)
    train(ddp, 2 + 3 * TRIAL_STEPS, data, opt)  # trial steps of up to 3 finalists, then the plan
    return (state.state_dict()["plan"], state.stats.summary(), state.stats.last_step.wire_bytes,
            state.stats.last_step.fp32_bytes, len(worker_calls) - before,
            [p.detach() for p in model.parameters()])


@pytest.mark.parametrize("codec", [cp.QSGD(bits=4), cp.EliasQSGD(levels=8)], ids=repr)
def test_default_policy_plans_alike_on_every_rank(codec):
    """Also with payloads whose size depends on the data (the policy times them like any)."""
    results = run_workers(default_policy_worker, 2, codec)
    plan, summary = results[0][0], results[0][1]
    assert plan == results[1][0] and plan["step"] >= 1
    assert len(plan["entries"]) >= 2  # every bucket size timed
    for entry in plan["entries"]:
        assert set(entry["seconds"]) == {"fp32", "fp16", f"{codec.short_name}/allgather"}
    assert "plan of step" in summary
    for p0, p1 in zip(results[0][-1], results[1][-1]):
        assert torch.equal(p0, p1)


def test_codec_that_does_not_pay_falls_back_to_fp32():
    results = run_workers(default_policy_worker, 2, SlowQSGD(bits=4))
    for entry in results[0][0]["entries"]:
        assert entry["codec"] != "codec", entry  # fp32, or fp16 if its trial steps were faster
        assert entry["seconds"]["qsgd4/allgather"] > entry["seconds"]["fp32"] + 0.04
    trials = results[0][0]["trials"]  # fp32, fp16 or a per-bucket mix: never the codec
    assert not any("qsgd" in t for t in trials), trials
    wire, fp32, worker_calls = results[0][2:5]
    assert wire <= fp32  # nothing compressed after the plan
    assert worker_calls == 0  # plain all-reduces from the hook, as DDP's own


def checkpoint(model, opt, state, data):
    """As a user checkpoints: torch.save, then a weights-only load."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "state": state.state_dict(), "data": data.get_state()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resumed(saved, rank):
    """A fresh process's model, DDP wrapper, optimizer, ``qsgd4+ef`` state and data stream,
    resumed from :func:`checkpoint`'s ``saved``."""
    model, data = model_and_data(rank)
    model.load_state_dict(saved["model"])
    ddp = DDP(model, bucket_cap_mb=25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    state = cp.register_hook(ddp, "qsgd4+ef", log_every=0, min_numel=256)
    state.load_state_dict(saved["state"])
    data.set_state(saved["data"])
    return model, ddp, opt, state, data


def resume_worker(rank, world_size):
    commpress.engine.policy.measure = fake_timings  # the codec wins: its random stream must resume too
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, "qsgd4+ef", log_every=0, min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(ddp, 4, data, opt)
    saved = checkpoint(model, opt, state, data)
    train(ddp, 3, data, opt)
    ratio = state.stats.last_step.fp32_bytes / state.stats.last_step.wire_bytes
    calls_before = fake_timings.calls
    model2, ddp2, opt2, state2, data2 = resumed(saved, rank)
    train(ddp2, 3, data2, opt2)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    return (saved["state"]["plan"], state2.state_dict()["plan"], ratio,
            fake_timings.calls - calls_before, same)


def test_plan_survives_a_checkpoint_and_resume_is_bit_identical():
    for plan, resumed_plan, ratio, calibrations_after_resume, same in run_workers(resume_worker, 2):
        assert plan["entries"][0]["codec"] == "codec" and plan == resumed_plan
        assert ratio > 4  # the codec was used
        assert calibrations_after_resume == 0 and same


def drift_worker(rank, world_size):
    commpress.engine.policy.measure = fake_timings
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, "qsgd4", log_every=0, recalibrate_every=3)
    if rank == 1:  # only this rank sees its link slow down
        state._policy.drift.drifted = lambda: True
    plan_steps = []
    for _ in range(9):
        train(ddp, 1, data, torch.optim.SGD(model.parameters(), lr=0.01))
        plan_steps.append(state.plan.step if state.plan else None)
    return plan_steps, fake_timings.calls


def test_drift_seen_by_one_rank_recalibrates_every_rank():
    results = run_workers(drift_worker, 2)
    assert results[0] == results[1]
    # first plan in step 1; checks every 3 steps after the plan (4, 7) each find rank 1's drift
    assert results[0][0] == [None, 1, 1, 1, 4, 4, 4, 7, 7]


def test_finalists_are_the_plans_near_the_fastest_without_duplicates():
    q = cp.QSGD(bits=4)
    options = candidates(q, "auto", 2, False)
    labels = ["fp32", "fp16", "qsgd4/allgather"]

    def isolated(seconds):
        return Plan(1, {1000: PlanEntry(1000, decide(options, seconds), dict(zip(labels, seconds)))})
    near = finalists(isolated([0.10, 0.09, 0.08]), options, q)
    assert [p.label(q) for p in near] == ["fp32", "fp16", "qsgd4/allgather"]
    assert [p.label(q) for p in finalists(isolated([1.0, 0.5, 0.1]), options, q)] == ["qsgd4/allgather"]
    assert [p.label(q) for p in finalists(isolated([0.10, 0.3, 0.5]), options, q)] == ["fp32"]
    trials = Trials(near, first=2)
    assert trials.last == 2 + 3 * TRIAL_STEPS - 1 and trials.plan_for(5) is near[0]


def trials_worker(rank, world_size):
    commpress.engine.policy.measure = fake_timings
    fake_timings.seconds = [0.10, 0.09, 0.08]  # three finalists
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, "qsgd4", log_every=0, min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    wire = []
    for _ in range(2 + 3 * TRIAL_STEPS + 1):  # fp32, calibration, trials, the plan
        train(ddp, 1, data, opt)
        wire.append(state.stats.last_step.wire_bytes / state.stats.last_step.fp32_bytes)
    return wire, state.state_dict()["plan"]


def test_trial_steps_take_turns_then_every_rank_adopts_one_plan():
    results = run_workers(trials_worker, 2)
    wire, plan = results[0]
    assert plan == results[1][1] and plan["step"] == 1 + 3 * TRIAL_STEPS
    assert set(plan["trials"]) == {"fp32", "fp16", "qsgd4/allgather"}
    trial = wire[2:2 + 3 * TRIAL_STEPS]  # steps 2..10: fp32, fp16, the codec, in turn
    assert all(w == 1 for w in trial[0::3]) and all(0.45 < w < 0.55 for w in trial[1::3])
    assert all(w < 0.2 for w in trial[2::3])


def trial_resume_worker(rank, world_size):
    """A checkpoint saved during the trial steps: the resumed run goes on with the same trial
    plans at the same steps (calibrating again, in fp32, would drift from the uninterrupted
    run by rounding)."""
    commpress.engine.policy.measure = fake_timings
    fake_timings.seconds = [0.10, 0.09, 0.08]  # three finalists: trials over steps 2..16
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, "qsgd4+ef", log_every=0, min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(ddp, 5, data, opt)  # fp32, the calibration step, 3 trial steps
    saved = checkpoint(model, opt, state, data)
    train(ddp, 6, data, opt)  # still trial steps
    model2, ddp2, opt2, state2, data2 = resumed(saved, rank)
    calls = fake_timings.calls
    train(ddp2, 6, data2, opt2)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    return saved["state"]["calibration"] is not None, fake_timings.calls - calls, same


def test_checkpoint_saved_during_the_trial_steps_resumes_them():
    for has_progress, calibrations_after_resume, same in run_workers(trial_resume_worker, 2):
        assert has_progress and calibrations_after_resume == 0 and same


def pinned_plan_worker(rank, world_size, plan_file):
    """A plan saved by one run and pinned in two more: those never time anything and train
    bit-identically; a plan of fp16 all-reduces says that "+ef" is idle under it, and counts
    the all-reduces' time."""
    commpress.engine.policy.measure = fake_timings  # the codec wins the calibration of the first run
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=0.1)
    state = cp.register_hook(ddp, "qsgd4+ef", log_every=0, min_numel=256)
    train(ddp, 3, data, torch.optim.SGD(model.parameters(), lr=0.01))
    if rank == 0:
        state.save_plan(plan_file)
    torch.distributed.barrier()
    calls, params = fake_timings.calls, []
    for _ in range(2):
        model, data = model_and_data(rank)
        ddp = DDP(model, bucket_cap_mb=0.1)
        pinned = cp.register_hook(ddp, "qsgd4+ef", log_every=0, min_numel=256, plan=plan_file)
        train(ddp, 6, data, torch.optim.SGD(model.parameters(), lr=0.01))
        params.append([p.detach().clone() for p in model.parameters()])
    same = all(torch.equal(a, b) for a, b in zip(*params))
    fp16_plan = Plan(0, {1000: PlanEntry(1000, FP16, {})})
    model, data = model_and_data(rank)
    ddp = DDP(model, bucket_cap_mb=0.1)
    fp16 = cp.register_hook(ddp, "qsgd4+ef", log_every=0, plan=fp16_plan.state_dict())
    train(ddp, 6, data, torch.optim.SGD(model.parameters(), lr=0.01))
    return (state.plan.state_dict(), pinned.plan.state_dict(), fake_timings.calls - calls, same,
            fp16.stats.summary(), fp16.stats.comm_seconds, pinned.stats.last_step.ratio)


def test_a_pinned_plan_is_never_measured_and_runs_are_bit_identical(tmp_path):
    for adopted, pinned, calls, same, summary, comm, ratio in run_workers(
            pinned_plan_worker, 2, str(tmp_path / "plan.json")):
        assert adopted["entries"] and pinned["entries"] == adopted["entries"]
        assert calls == 0 and same
        assert ratio > 3  # the pinned plan is the codec's
        assert "error feedback (ef) idle" in summary and comm > 0, summary


def test_pinned_plans_are_checked_when_the_state_is_made(tmp_path):
    with pytest.raises(ValueError, match="policy='fixed' has none"):
        cp.CompressionState(cp.QSGD(), policy="fixed", plan=Plan(0, {1: PlanEntry(1, FP32, {})}))
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="plan.json.*is not JSON"):
        cp.CompressionState(cp.QSGD(), plan=bad)
    with pytest.raises(ValueError, match="holds no plan"):
        cp.CompressionState(cp.QSGD(), plan={"config": {}, "plan": None})
    scatter = Plan(0, {1: PlanEntry(1, SCATTER, {})})
    with pytest.raises(ValueError, match="does not fit this configuration"):
        cp.CompressionState(cp.QSGD(), collective="allgather", plan=scatter)
    state = cp.CompressionState(cp.QSGD(), plan=scatter)  # a whole state dict holds one too
    again = cp.CompressionState(cp.QSGD(), plan={"config": {}, "plan": scatter.state_dict()})
    assert again.plan.state_dict() == state.plan.state_dict() == scatter.state_dict()


def sampled_calibration_worker(rank, world_size, spec):
    """Buckets over SAMPLE_NUMEL values are timed on a sample (lowered here to 3000 of a
    bucket of 8580, cutting a parameter): every candidate reduces the sample
    only, with error feedback on a scratch memory of the sample's size."""
    commpress.engine.averaging.SAMPLE_NUMEL = 3000
    reduced = []
    average = GroupAverager.average
    GroupAverager.average = lambda averager, runtime, group, *a: (
        reduced.append(group.buffer.numel()), average(averager, runtime, group, *a))[1]
    model, data = model_and_data(rank, width=64)
    ddp = DDP(model, bucket_cap_mb=25)
    state = cp.register_hook(ddp, spec, log_every=0, min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(ddp, 2, data, opt, width=64)  # fp32, then the calibration step
    bucket = sum(p.numel() for p in model.parameters())
    plan = state._policy.trials.plans[-1] if state._policy.trials else state.plan  # the per-bucket decision
    return bucket, reduced, plan


@pytest.mark.parametrize("spec", ["qsgd4+ef", "qsgd4+ef21"])
def test_a_large_bucket_is_calibrated_on_a_sample(spec):
    for bucket, reduced, plan in run_workers(sampled_calibration_worker, 2, spec):
        assert bucket > 2 * 3000
        calibration_runs = reduced[1:-1]  # between the two steps' own reductions (fp32)
        assert calibration_runs and set(calibration_runs) == {3000}, reduced
        assert reduced[0] == reduced[-1] == bucket
        assert plan is not None and all(e.seconds for e in plan.entries.values())
