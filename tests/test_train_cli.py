"""The main job, end to end, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_train(*args, timeout=400):
    """``commpress train ARGS --quiet`` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "commpress.cli", "train", *args, "--quiet"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_commpress_train_reports(tmp_path):
    out = tmp_path / "report.json"
    proc = run_train("qsgd4", "natural+ef", "--epochs", "2", "--json", str(out))
    assert "test acc" in proc.stdout and "qsgd4" in proc.stdout
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    results = {r["method"]: r for r in report["results"]}
    assert set(results) == {"fp32-allreduce", "qsgd4", "natural+ef"}
    for r in results.values():
        assert r["replicas_identical"]
        assert r["accuracy"] > 0.8  # two epochs on digits already reach ~95%
    assert results["qsgd4"]["ratio"] > 5 and results["natural+ef"]["ratio"] > 3
    for r in results.values():  # learning curves: one point per epoch by default
        assert [p["steps"] for p in r["curve"]] == [r["steps"] // 2, r["steps"]]


@pytest.mark.parametrize("args, message", [
    (["qsgd9"], "unknown hook 'qsgd9'"), (["--eval-every", "0"], "--eval-every must be >= 1"),
    # these three are refused before the workers start, not inside them
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--batch-size", "1000"], "digits has 1438 training examples, fewer than --batch-size 1000 x 2"),
    (["qsgd1+ef"], "error_feedback='ef' diverges with QSGD(bits=1"),
    (["--acdc-last-dense", "0.2"], "--acdc-last-dense shapes the AC/DC schedule: it needs --acdc"),
    (["powersgd0"], "or powersgdR (PyTorch's PowerSGD hook at rank R, e.g. powersgd1, powersgd4)")])
def test_commpress_train_rejects_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, "-m", "commpress.cli", "train", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize("gpus, workers, device, backend, expected", [
    (0, 2, "auto", "auto", ("cpu", "gloo")),
    (2, 2, "auto", "auto", ("cuda", "nccl")),
    (1, 2, "auto", "auto", ("cpu", "gloo")),     # NCCL takes one GPU per rank
    (1, 2, "cuda", "gloo", ("cuda", "gloo")),    # sharing a GPU over gloo, if asked for
    (1, 2, "cuda", "auto", "NCCL needs a GPU per rank: 2 ranks on this node, 1 GPU"),
    (0, 2, "cuda", "auto", "CUDA is not available"),
    (2, 2, "cpu", "nccl", "--backend nccl needs --device cuda")])
def test_device_and_backend_give_each_nccl_rank_a_gpu(monkeypatch, gpus, workers, device,
                                                       backend, expected):
    import argparse

    from commpress.train import device_and_backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for name in ("RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device=device, backend=backend, workers=workers)
    if isinstance(expected, tuple):
        assert device_and_backend(args) == expected
    else:
        with pytest.raises(SystemExit, match=expected):
            device_and_backend(args)
    # under torchrun, the node's ranks are LOCAL_WORLD_SIZE, whatever --workers says
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    if gpus and backend != "gloo" and device != "cpu":
        assert device_and_backend(args) == ("cuda", "nccl")


def test_commpress_train_acdc_reports_both_members(tmp_path):
    out = tmp_path / "report.json"
    proc = run_train("--acdc", "0.9", "--epochs", "8", "--json", str(out))
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    for method in ("acdc90", "acdc90:qsgd4"):
        r = results[method]
        assert abs(r["final_density"] - 0.1) < 0.01          # the run ends sparse
        assert r["sparse_phase_bytes_per_step"] <= 0.12 * r["dense_phase_bytes_per_step"]
        assert r["accuracy"] > 0.8 and r["dense_member_accuracy"] > 0.8
    assert "acdc90 dense" in proc.stdout and "sparse 90%" in proc.stdout


def test_commpress_train_libsvm_logistic_regression_with_curves(tmp_path):
    """The LIBSVM-like task of the convergence benchmark: logistic regression learns, QSGD-4
    compresses it, and every run records test accuracy and loss against bytes and training
    time every --eval-every steps and at the end."""
    out = tmp_path / "report.json"
    proc = run_train("qsgd4", "--data", "libsvm", "--epochs", "2", "--lr", "2",
                     "--eval-every", "7", "--json", str(out))
    assert "logistic regression" in proc.stdout
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    base, qsgd = results["fp32-allreduce"], results["qsgd4"]
    assert base["accuracy"] > 0.7 and abs(qsgd["accuracy"] - base["accuracy"]) < 0.02
    assert qsgd["ratio"] > 5
    for r in (base, qsgd):
        steps = [p["steps"] for p in r["curve"]]
        assert steps == list(range(7, r["steps"] + 1, 7)) + ([r["steps"]] if r["steps"] % 7 else [])
        last = r["curve"][-1]
        assert (last["wire_bytes"], last["accuracy"], last["test_loss"]) == (
            r["wire_bytes"], r["accuracy"], r["test_loss"])
        for before, after in zip(r["curve"], r["curve"][1:]):
            assert after["wire_bytes"] > before["wire_bytes"] and after["seconds"] > before["seconds"]
        assert last["seconds"] <= r["seconds"]
        assert r["curve"][0]["test_loss"] > last["test_loss"]  # it learns


def test_language_model_data_and_model():
    """The lm task: byte sequences of the standard library with held-out files, next bytes as
    targets, and a model that cannot see the future."""
    import torch

    from commpress.train import LM_CONTEXT, load_data, make_model

    x_train, y_train, x_test, y_test = load_data("lm", seed=0)
    assert x_train.shape[1] == LM_CONTEXT and len(x_train) > 8 * len(x_test) > 0
    assert torch.equal(x_train[0, 1:], y_train[0, :-1]) and int(x_train.max()) < 256
    model = make_model(0, "lm").eval()
    x = x_test[:2].clone()
    logits = model(x)
    assert logits.shape == (2, 256, LM_CONTEXT)
    x[:, 40] = (x[:, 40] + 1) % 256  # a later byte changes nothing before it
    assert torch.allclose(model(x)[:, :, :40], logits[:, :, :40], atol=1e-5)
    assert not torch.allclose(model(x)[:, :, 40:], logits[:, :, 40:], atol=1e-5)


def test_commpress_train_language_model_with_adamw(tmp_path):
    out = tmp_path / "report.json"
    proc = run_train("qsgd4", "--data", "lm", "--epochs", "1", "--json", str(out))
    assert "byte-level transformer" in proc.stdout and "adamw" in proc.stdout
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    for r in results.values():
        assert r["replicas_identical"] and r["test_loss"] < 3.0, r  # uniform bytes: 5.5 nats
    assert results["qsgd4"]["ratio"] > 5


def test_commpress_train_uneven_shards_do_not_hang(tmp_path):
    """5 workers do not divide the 1437 training images (287 or 288 each): every rank still runs
    the same number of steps (a rank with one more backward would wait for the others forever)."""
    out = tmp_path / "report.json"
    run_train("qsgd4", "--workers", "5", "--epochs", "1", "--json", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert report["world_size"] == 5
    for r in report["results"]:
        assert r["replicas_identical"] and r["steps"] == 1437 // 5 // 32


def test_commpress_train_device_choice_is_checked_before_workers_start():
    proc = subprocess.run([sys.executable, "-m", "commpress.cli", "train", "qsgd4", "--backend",
                           "nccl", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--backend nccl needs --device cuda" in proc.stderr


def test_commpress_version():
    import commpress
    proc = subprocess.run([sys.executable, "-m", "commpress.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"commpress {commpress.__version__}"


def test_commpress_bench_lists_benchmarks_and_passes_help_through():
    listing = subprocess.run([sys.executable, "-m", "commpress.cli", "bench", "--help"],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    for name in ("bandwidth", "codec_throughput", "ddp_step", "memory", "convergence"):
        assert f"  {name} " in listing.stdout
    own = subprocess.run([sys.executable, "-m", "commpress.cli", "bench", "memory", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert own.returncode == 0 and "--numel" in own.stdout  # the benchmark's own options
    # by default results go to an untracked folder, never over the committed ones
    assert "benchmarks/results/local/memory.json" in " ".join(own.stdout.split())
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/local/memory.json"],
                             cwd=Path(__file__).resolve().parent.parent)
    assert ignored.returncode in (0, 128)  # ignored, or not a git checkout


def test_hook_names_cover_every_qsgd_width_and_need_a_ddp_model():
    import torch

    import commpress as cp
    for bits in range(2, 9):
        assert cp.state_from_name(f"qsgd{bits}+ef").codec.bits == bits
    assert cp.state_from_name("qsgd1").codec.bits == 1
    with pytest.raises(ValueError, match="diverges with QSGD.bits=1"):
        cp.state_from_name("qsgd1+ef21")
    with pytest.raises(TypeError, match="DistributedDataParallel model, got Linear"):
        cp.register_hook(torch.nn.Linear(2, 2), "qsgd4")



def test_every_train_option_has_help_and_a_default():
    import argparse

    from commpress import train
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.dest} has no help text"
        assert action.default is not None or "default" in action.help, f"{action.dest}: no default"


def powersgd_worker(rank, world_size, matrix_rank):
    """The elements PyTorch's PowerSGD hook all-reduces per step, counted at dist.all_reduce."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from commpress.train import make_model

    model = torch.nn.parallel.DistributedDataParallel(make_model(0, "digits"), bucket_cap_mb=1024)
    model.register_comm_hook(powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=matrix_rank, start_powerSGD_iter=2),
        powerSGD_hook.powerSGD_hook)
    counted, all_reduce = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = counting
    for step in range(4):
        counted.clear()
        model(torch.randn(8, 1, 8, 8)).square().mean().backward()
    return sum(counted)


@pytest.mark.parametrize("matrix_rank", [1, 4])
def test_powersgd_bytes_are_what_pytorchs_hook_sends(matrix_rank):
    from commpress.train import make_model, powersgd_bytes_per_step
    from distributed import run_workers

    elements = run_workers(powersgd_worker, 2, matrix_rank)[0]
    assert powersgd_bytes_per_step(make_model(0, "digits"), matrix_rank, 2) == 4 * elements


def test_commpress_train_compares_with_pytorchs_powersgd(tmp_path):
    out = tmp_path / "report.json"
    run_train("powersgd1", "--epochs", "2", "--json", str(out))
    r = {r["method"]: r for r in json.loads(out.read_text())["results"]}["powersgd1"]
    # rank 1 learns (65% after 2 epochs, against 88% for fp32) while sending 17x fewer bytes
    assert r["replicas_identical"] and r["accuracy"] > 0.5 and r["ratio"] > 10
