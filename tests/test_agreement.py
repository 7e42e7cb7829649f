"""The configuration agreement every front end uses, on in-process ranks."""
import pytest

from commpress.comm import LoopbackGroup
from commpress.comm.agreement import ConfigurationMismatch, agree


def test_equal_fields_pass_and_cost_one_small_all_gather():
    def rank_fn(transport):
        agree(transport, {"codec": "QSGD(bits=4)", "numel": 1000})
        return transport.sent_bytes
    assert LoopbackGroup(3).run(rank_fn) == [16, 16, 16]  # (W-1) x 8 bytes


def test_differences_are_named_on_every_rank():
    messages = []

    def rank_fn(transport):
        try:
            agree(transport, {"codec": "QSGD(bits=4)", "numel": 1000 + 200 * (transport.rank == 2)})
        except ConfigurationMismatch as exc:
            messages.append(str(exc))
    LoopbackGroup(3).run(rank_fn)
    assert len(messages) == 3
    assert all("numel: rank 0 1000, rank 1 1000, rank 2 1200" in m and "codec" not in m
               for m in messages)


def test_two_different_checks_pair_up_instead_of_hanging():
    """One rank checking an AC/DC phase change while the other checks its next step."""
    def rank_fn(transport):
        fields = {"acdc_phase": "sparse"} if transport.rank == 0 else {"step": 11, "phase": "dense"}
        with pytest.raises(ConfigurationMismatch, match="acdc_phase: rank 0 'sparse', rank 1 None"):
            agree(transport, fields)
    LoopbackGroup(2).run(rank_fn)


def test_long_descriptions_stay_comparable():
    def rank_fn(transport):
        with pytest.raises(ConfigurationMismatch, match="layout"):
            agree(transport, {"layout": list(range(5000 + transport.rank))})
    LoopbackGroup(2).run(rank_fn)
