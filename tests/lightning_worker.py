"""A Lightning user's script: ``python lightning_worker.py OUT MODE`` trains a small regression
model with ``Trainer(accelerator="cpu", devices=2)``; Lightning starts the second process
itself (re-running this script), as it does for users. Each rank writes OUT/rank{R}.json.

MODE ``commpress``: :class:`commpress.lightning.CompressedDDPStrategy`; ``lightning-hook``:
Lightning's own ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=compress_hook)``, which on CPU
never registers the hook."""
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

import commpress as cp
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


def main(out: Path, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    data = DataLoader(TensorDataset(x, x[:, :1] - 0.5 * x[:, 1:2]), batch_size=32)
    if mode == "commpress":
        strategy = CompressedDDPStrategy("qsgd4", state_kwargs={"log_every": 0, "policy": "fixed"})
    else:
        state = cp.state_from_name("qsgd4", log_every=0, policy="fixed")
        strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=cp.compress_hook)
    model = Regression()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    state = strategy.compression_state if mode == "commpress" else strategy._ddp_comm_state
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "global_step": trainer.global_step, "iter": state.iter,
        "network_bytes": state.stats.network_bytes, "fp32_bytes": state.stats.fp32_bytes,
        "last_ratio": state.stats.last_step.ratio,
        "summary": state.stats.summary(),
        "params": [p.detach().double().sum().item() for p in model.parameters()],
        "warnings": [str(w.message) for w in caught if "commpress" in str(w.message)]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
