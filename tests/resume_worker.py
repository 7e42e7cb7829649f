"""A training run that checkpoints and resumes, for torchrun --max-restarts.

``torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/resume_worker.py CKPT_DIR OUT
[KILL_AT]``: DDP with the qsgd4+ef hook and AC/DC, a checkpoint per rank every ``EVERY``
steps (model, optimizer, CompressionState, ACDC, the data and torch generators), written
atomically. With ``KILL_AT``, rank 1 SIGKILLs itself at that step of the first attempt;
torchrun restarts both ranks, which resume from their last checkpoint. Rank 0 writes the loss
of every step and the final parameters to OUT."""
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp

STEPS, EVERY = 40, 10


def checkpoint_path(directory, rank):
    return os.path.join(directory, f"rank{rank}.pt")


def main(directory, out, kill_at=None):
    # torchrun keeps one store across restarts, and a restarted rank can read a dead peer's
    # address from it (gloo: "Connection refused"); a prefix per attempt keeps them apart
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                            rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = DDP(model, bucket_cap_mb=25)  # one bucket, in DDP's first iteration too
    state = cp.register_hook(ddp, "qsgd4+ef", seed=1, log_every=0, policy="fixed", min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    acdc = cp.ACDC(ddp, opt, state, sparsity=0.8,
                   schedule=cp.ACDCSchedule([(10, 20), (30, STEPS)], STEPS))
    data = torch.Generator().manual_seed(100 + rank)
    start, losses = 0, []
    path = checkpoint_path(directory, rank)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)  # checkpoints are untrusted input
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["compression"])
        acdc.load_state_dict(saved["acdc"])
        data.set_state(saved["data_rng"])
        torch.set_rng_state(saved["torch_rng"])
        start, losses = saved["step"], saved["losses"]
    for step in range(start, STEPS):
        if kill_at is not None and step == kill_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(16, 32, generator=data)
        y = x[:, :4] - x[:, 4:8] + 0.1 * torch.randn(16, 4, generator=data)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acdc.step()
        losses.append(loss.item())
        if (step + 1) % EVERY == 0:
            tmp = path + ".tmp"
            torch.save({"step": step + 1, "losses": losses, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "compression": state.state_dict(),
                        "acdc": acdc.state_dict(), "data_rng": data.get_state(),
                        "torch_rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole
    if rank == 0:
        torch.save({"losses": losses, "params": [p.detach() for p in model.parameters()],
                    "resumed_from": start, "attempt": attempt, "density": acdc.density}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
