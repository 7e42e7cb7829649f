"""Run under horovodrun by tests/test_horovod.py; rank 0 writes JSON to argv[1]."""
import json
import sys

import horovod.torch as hvd
import torch

import commpress as cp
import commpress.horovod as cphvd

hvd.init()
rank, size = hvd.rank(), hvd.size()
out = {"size": size}

# allreduce of every codec: identity exact, compressed ones close and identical on all ranks
x = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
exact = hvd.allreduce(x, op=hvd.Average)
for name, codec in {"identity": cp.Identity(), "fp16": cp.FP16(), "qsgd4": cp.QSGD(bits=4),
                    "natural": cp.NaturalCompression(), "dithering": cp.NaturalDithering()}.items():
    mean = cphvd.allreduce(x, codec, generator=torch.Generator().manual_seed(rank))
    same = len({t.numpy().tobytes() for t in hvd.allgather_object(mean)}) == 1
    out[name] = {"rel_err": ((mean - exact).norm() / exact.norm()).item(), "same": same}

# training: fp32 (Identity) vs QSGD-4 through commpress.horovod.DistributedOptimizer
true_w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
for label, codec in (("train_fp32", cp.Identity()), ("train_qsgd4", cp.QSGD(bits=4, bucket_size=128))):
    torch.manual_seed(rank)   # different inits: broadcast_parameters must align them
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     model.named_parameters(), codec=codec, policy="fixed",
                                     min_numel=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    losses = []
    for step in range(80):
        g = torch.Generator().manual_seed(100 * rank + step)
        xb = torch.randn(32, 64, generator=g)
        loss = torch.nn.functional.mse_loss(model(xb), xb @ true_w.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out[label] = {"identical": len({t.numpy().tobytes() for t in hvd.allgather_object(flat)}) == 1,
                  "first": losses[0], "last": sum(losses[-5:]) / 5,
                  "ratio": opt.comm_stats.wire_bytes and
                  (2 * (size - 1) / size * 4 * flat.numel() * 80) / opt.comm_stats.wire_bytes}

# Horovod's own arguments, with Horovod's meaning, and reduction during backward
def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 4))


def grads_of(model, opt_kwargs, batch_seed=0, extra=None):
    """One backward through a wrapped SGD(lr=0); returns (reduced grads, the exact hvd ones,
    how many groups had started before step())."""
    opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                     model.named_parameters(), **opt_kwargs)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(10 * rank + batch_seed))
    model(x).square().mean().backward()
    started = len(opt._cp_started)
    if extra is not None:
        extra()  # e.g. an unrelated Horovod operation on this thread while reductions run
    local = [p.grad.clone() for p in model.parameters()]
    opt.step()
    exact = [hvd.allreduce(g, op=opt_kwargs.get("op", hvd.Average)) for g in local]
    err = max(((p.grad - e).norm() / e.norm()).item() for p, e in zip(model.parameters(), exact))
    return err, started, len(opt._cp_groups), opt


args = {}
err, started, groups, opt = grads_of(net(), {"compression": hvd.Compression.none, "num_groups": 3})
args["num_groups"] = {"err": err, "started": started, "groups": groups}
args["summary"] = opt.comm_stats.summary()
err, started, groups, _ = grads_of(net(), {"compression": hvd.Compression.none, "op": hvd.Sum})
args["sum"] = {"err": err}
err, *_ = grads_of(net(), {"compression": hvd.Compression.fp16, "gradient_predivide_factor": 2.0,
                           "process_set": hvd.global_process_set})
args["fp16_predivide"] = {"err": err}
model = net()
layers = [m for m in model if isinstance(m, torch.nn.Linear)]
err, started, groups, _ = grads_of(model, {"codec": cp.Identity(),
                                           "groups": [list(layers[0].parameters())]},
                                   extra=lambda: hvd.allreduce(torch.ones(3), name="user.metric"))
args["groups_and_foreign_op"] = {"err": err, "started": started, "groups": groups}
refused = {}
for label, kwargs in {"custom_compression": {"compression": type("C", (hvd.Compression.none,), {})},
                      "adasum": {"codec": cp.Identity(), "op": hvd.Adasum},
                      "both": {"codec": cp.QSGD(bits=4), "compression": hvd.Compression.fp16}}.items():
    try:
        cphvd.DistributedOptimizer(torch.optim.SGD(net().parameters(), lr=0.1), **kwargs)
        refused[label] = None
    except ValueError as exc:
        refused[label] = str(exc)
try:  # complex parameters: their gradients were cast to float, the imaginary parts lost
    cphvd.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))],
                                               lr=0.1), codec=cp.QSGD(bits=4))
    refused["complex"] = None
except TypeError as exc:
    refused["complex"] = str(exc)
args["refused"] = refused

# sparse_as_dense: an embedding with sparse gradients
emb = torch.nn.Embedding(50, 8, sparse=True)
opt = cphvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.0), sparse_as_dense=True,
                                 codec=cp.Identity())
emb(torch.tensor([rank, 7])).sum().backward()
opt.step()
args["sparse_as_dense"] = {"row7": emb.weight.grad[7].tolist(), "row0": emb.weight.grad[0].tolist()}

# Horovod's gradient-clipping recipe: synchronize, clip, step under skip_synchronize
model = net()
opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), codec=cp.QSGD(bits=8))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(8, 32, generator=torch.Generator().manual_seed(rank + 10 * step))).sum().backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    with opt.skip_synchronize():
        opt.step()
    hvd.allreduce(torch.ones(1))  # unnamed: fine once step() has waited for the reductions
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
args["clip_identical"] = len({t.numpy().tobytes() for t in hvd.allgather_object(flat)}) == 1
args["clip_steps"] = opt.comm_stats.steps

# a group's reduction failing (on every rank): step() raises it once every group has ended,
# and the next backward, without zero_grad(), is a fresh step (not "gradients were computed
# more than backward_passes_per_step times")
class FailingOnce(cp.Identity):  # fp32 payloads through the allgather: exact means
    armed = True

    def encode(self, tensor, generator=None):
        if FailingOnce.armed:
            FailingOnce.armed = False
            raise RuntimeError("injected encode failure")
        return super().encode(tensor, generator)


model = net()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), codec=FailingOnce(),
                                 collective="allgather", num_groups=2, policy="fixed", min_numel=0)
x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
model(x).square().mean().backward()
try:
    opt.step()
    args["failed_step"] = None
except RuntimeError as exc:
    args["failed_step"] = str(exc)
for p in model.parameters():
    p.grad = None
model(x).square().mean().backward()
local = [p.grad.clone() for p in model.parameters()]
opt.step()
exact = [hvd.allreduce(g) for g in local]
args["after_failure_err"] = max(((p.grad - e).norm() / e.norm()).item()
                                for p, e in zip(model.parameters(), exact))
out["horovod_args"] = args


# the default policy (calibrated): one plan on every rank, adopted after the trial steps
def train_steps(opt, model, steps, first=0):
    for step in range(first, first + steps):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank + 10 * step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_every_rank(value):
    return len({json.dumps(v, sort_keys=True) if not isinstance(v, torch.Tensor)
                else v.numpy().tobytes().hex() for v in hvd.allgather_object(value)}) == 1


default = {}
model = net()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                 model.named_parameters(), codec="qsgd4", num_groups=2)
flat = train_steps(opt, model, 20)
plan = opt.compression.state_dict()["plan"]
default.update(plan=plan, plan_alike=same_on_every_rank(plan), params_alike=same_on_every_rank(flat),
               summary=opt.comm_stats.summary(), steps=opt.comm_stats.steps)
# that plan pinned: nothing timed, the same choices
pinned = cphvd.DistributedOptimizer(torch.optim.SGD(net().parameters(), lr=0.01),
                                    codec="qsgd4", num_groups=2, plan=plan)
default["pinned"] = pinned.compression.plan.state_dict() == plan


# error feedback kinds, server feedback and a resumed run, bit-identical (the fixed policy)
def resumed(spec, collective, **kwargs):
    def make():
        model = net()
        opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                         model.named_parameters(), codec=spec, policy="fixed",
                                         collective=collective, min_numel=0, **kwargs)
        return model, opt
    model, opt = make()
    train_steps(opt, model, 3)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(),
             opt.compression.state_dict())
    straight = train_steps(opt, model, 3, first=3)
    model, opt = make()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    opt.compression.load_state_dict(saved[2])
    again = train_steps(opt, model, 3, first=3)
    return {"bit_identical": torch.equal(straight, again), "alike": same_on_every_rank(again),
            "finite": bool(torch.isfinite(again).all()), "ratio": opt.comm_stats.ratio}


feedback = {}
for spec, collective, kwargs in (("qsgd4+ef", "allgather", {}),
                                 ("qsgd4+ef", "reduce_scatter", {"server_feedback": True}),
                                 ("qsgd4+ef21", "reduce_scatter", {})):
    feedback[f"{spec}/{collective}{'/server' if kwargs else ''}"] = resumed(spec, collective, **kwargs)
default["feedback"] = feedback
out["default_policy"] = default

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
