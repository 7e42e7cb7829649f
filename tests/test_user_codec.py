"""A codec of one's own, as README's "Your own codec" shows it: registered by name and wire id,
checked like the built-in ones, and trained with end to end through the DDP hook."""
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from commpress.codecs import Codec, Payload, register_codec
from distributed import run_workers


@register_codec("int8-tensor")
class Int8PerTensor(Codec):
    """Each value rounded to the nearest of 255 levels of one scale per payload."""

    codec_id, name = 64, "int8-tensor"  # ids from 64 on are left to users' codecs
    unbiased = False  # rounds to nearest: use error feedback ("+ef") with it

    def _body_bytes(self, numel):
        return 4 + numel  # one fp32 scale, one int8 code per value

    def _encode_body(self, flat, generator, out):
        scale = flat.abs().max().float().clamp_min(1e-30) / 127
        out[:4].copy_(scale.reshape(1).view(torch.uint8))
        out[4:].view(torch.int8).copy_((flat.float() / scale).round())

    def _decode_body(self, body, out, alpha=None):
        scale = body[:4].clone().view(torch.float32)  # a payload may start at any byte
        self._store(body[4:].view(torch.int8).float() * scale, out, alpha)


def test_round_trip_size_and_checks():
    codec = cp.get_codec("int8-tensor")
    x = torch.randn(1000)
    payload = codec.encode(x)
    assert payload.nbytes == codec.wire_bytes(1000) == cp.codecs.HEADER_BYTES + 1004
    assert (codec.decode(payload) - x).abs().max() <= x.abs().max() / 127 / 2 + 1e-6
    misaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), payload.data])[1:]
    assert torch.equal(codec.decode(Payload(misaligned)), codec.decode(payload))
    foreign = cp.QSGD(bits=8).encode(x)
    try:
        codec.decode(foreign)
        raise AssertionError("a QSGD payload was decoded as int8-tensor")
    except ValueError as exc:
        assert "encoded by qsgd" in str(exc)


def user_codec_worker(rank, world_size):
    cp.register_named_hook("int8t", Int8PerTensor)
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4)))
    state = cp.register_hook(model, "int8t+ef", policy="fixed", log_every=0, min_numel=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(40):
        x = torch.randn(16, 32, generator=data)
        loss = nn.functional.mse_loss(model(x), x[:, :4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, state.stats.last_step.ratio, [p.detach() for p in model.parameters()]


def test_trains_end_to_end_under_the_ddp_hook():
    (losses, ratio, params), (_, _, params1) = run_workers(user_codec_worker, 2)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert ratio > 3  # 8 bits a value, the biases in fp32
    for a, b in zip(params, params1):
        assert torch.equal(a, b)
