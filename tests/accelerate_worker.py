"""An Accelerate user's script, run under ``torchrun --nproc_per_node=2``: the hook goes on the
model ``accelerator.prepare`` returns (a ``DistributedDataParallel`` when there are several
processes). Writes OUT/rank{R}.json."""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

import commpress as cp

STEPS = 6


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # one process: no DDP
        state = cp.register_hook(model, "qsgd4", log_every=0, policy="fixed")
    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(STEPS):
        x = torch.randn(32, 64, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "iter": state.iter, "network_bytes": state.stats.network_bytes,
        "fp32_bytes": state.stats.fp32_bytes,
        "last_ratio": state.stats.last_step.ratio,
        "params": [p.detach().double().sum().item() for p in model.parameters()]}))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
