"""A Lightning user's script: ``python lightning_worker.py OUT MODE`` trains a small regression
model with ``Trainer(accelerator="cpu", devices=2)``; Lightning starts the second process
itself (re-running this script), as it does for users. Each rank writes OUT/rank{R}.json.

MODE ``commpress``: :class:`commpress.lightning.CompressedDDPStrategy`; ``lightning-hook``:
Lightning's own ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=compress_hook)``, which on CPU
never registers the hook; ``fsdp``: Lightning's ``ModelParallelStrategy`` (FSDP2), the model
sharded in ``configure_model`` and compressed there with :func:`commpress.fsdp.compress`."""
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

import commpress as cp
from commpress.comm.transport import release_default_group
from commpress.lightning import CompressedDDPStrategy

STEPS = 8


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ShardedRegression(Regression):
    """The README's Lightning FSDP recipe: shard in ``configure_model``, then compress."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self.compression = cp.fsdp.compress(self.net, "qsgd4", policy="fixed")


def main(out: Path, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    data = DataLoader(TensorDataset(x, x[:, :1] - 0.5 * x[:, 1:2]), batch_size=32)
    if mode == "commpress":
        strategy = CompressedDDPStrategy("qsgd4", state_kwargs={"log_every": 0, "policy": "fixed"})
    elif mode == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        state = cp.state_from_name("qsgd4", log_every=0, policy="fixed")
        strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=cp.compress_hook)
    model = ShardedRegression() if mode == "fsdp" else Regression()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    state = {"commpress": lambda: strategy.compression_state, "fsdp": lambda: model.compression,
             "lightning-hook": lambda: strategy._ddp_comm_state}[mode]()
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "global_step": trainer.global_step, "iter": state.iter,
        "network_bytes": state.stats.network_bytes, "fp32_bytes": state.stats.fp32_bytes,
        "last_ratio": state.stats.last_step.ratio,
        "summary": state.stats.summary(),
        "params": [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum().item()
                   for p in model.parameters()],
        "warnings": [str(w.message) for w in caught if "commpress" in str(w.message)]}))
    # as PyTorch asks of every script: destroy the group Lightning made (else a gloo thread
    # still releasing the last step's work when the interpreter finalizes aborts the process)
    del trainer, model, strategy, state
    release_default_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
