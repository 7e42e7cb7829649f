"""The native serial coder of the variable-length payloads (``codecs/native.py``) against the
vectorised torch coder it replaces on the CPU: the same bytes from the same codes, the same
values decoded, forged long codes refused, and the vectorised coder where it cannot be built
(the same single-byte changes refused: ``test_elias``)."""
import logging

import pytest
import torch

import commpress as cp
from commpress.codecs import HEADER_BYTES, native
from commpress.codecs.elias import _Sections

CODECS = [cp.EliasQSGD(levels=1), cp.EliasQSGD(levels=2, bucket_size=64),
          cp.EliasQSGD(levels=5, bucket_size=511), cp.EliasQSGD(levels=8),
          cp.EliasQSGD(levels=3, bucket_size=128, norm="max"),
          cp.EliasQSGD(levels=127, bucket_size=64, norm="max")]


@pytest.fixture(scope="module")
def coder():
    library = native.library()
    if library is None:
        pytest.skip(f"the native coder cannot be built here: {native._failure or 'switched off'}")
    return library


def random_codes(codec, numel, density, seed):
    """Codes as the quantizer leaves them: the zero level (``levels``) but for a ``density``
    share of random signed levels, padded with zero codes to a multiple of 8."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.full((-(-numel // 8) * 8,), codec.levels, dtype=torch.uint8)
    chosen = torch.rand(numel, generator=g) < density
    levels = torch.randint(1, codec.levels + 1, (numel,), generator=g)
    signs = torch.randint(0, 2, (numel,), generator=g) * 2 - 1
    codes[:numel] = torch.where(chosen, codec.levels + signs * levels, codec.levels).to(torch.uint8)
    return codes


@pytest.mark.parametrize("thread_codes", [native.THREAD_CODES, 64, 1000], ids=lambda n: f"{n}-per-thread")
@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_native_and_vectorised_streams_are_the_same_bytes(coder, codec, thread_codes, monkeypatch):
    """Every size from 0 to a few words, whole 64-code blocks and a tail, densities from one
    non-zero to all of them (gaps up to the whole vector); written by one thread and by
    several (streams of ranges of codes appended at any bit offset)."""
    monkeypatch.setattr(native, "THREAD_CODES", thread_codes)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    for numel in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 70_001):
        for density in (0.0, 0.001, 0.03, 0.3, 1.0):
            codes = random_codes(codec, numel, density, seed=numel)
            out = torch.empty(2 * codec._stream_capacity(numel), dtype=torch.uint8)
            sizes = codec._native_streams(coder, codes, numel, out)
            vectorised = codec._vectorised_streams(codes, numel)
            assert sizes == vectorised[:3], (numel, density)
            assert torch.equal(out[: sum(s.numel() for s in vectorised[3])],
                               torch.cat(vectorised[3])), (numel, density)


@pytest.mark.parametrize("thread_codes", [native.THREAD_CODES, 64], ids=lambda n: f"{n}-per-thread")
@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_native_decoder_reads_what_the_vectorised_one_reads(coder, codec, thread_codes, monkeypatch):
    """Positions and levels, and the values written into ``out`` and added to it (the same
    fp32 roundings), for payloads of real encodings; read by one thread and by several
    (ranges of non-zeros read apart, then placed)."""
    monkeypatch.setattr(native, "THREAD_CODES", thread_codes)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    for numel, seed in ((1, 0), (100, 1), (5000, 2), (300_000, 3), (300_000, -1)):
        # (seed -1: every value non-zero, so that ranges meet at adjacent positions)
        x = (torch.randn(numel, generator=torch.Generator().manual_seed(seed)) ** 3 if seed >= 0
             else torch.full((numel,), -0.75))
        data = codec.encode(x, torch.Generator().manual_seed(abs(seed))).data
        parts = codec._sections(data[HEADER_BYTES:], numel)
        assert all(torch.equal(a, b) for a, b in zip(
            codec._read_natively(coder, parts, numel), codec._read_vectorised(parts, numel)[1:3]))
        start = torch.randn(numel, generator=torch.Generator().manual_seed(9))
        results = []
        for use_native in (True, False):
            monkeypatch.setattr(native, "library", (lambda: coder) if use_native else (lambda: None))
            payload = cp.Payload(data)
            results.append((codec.decode(payload), codec.decode_into(payload, start.clone(), alpha=0.37)))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])


def unary(zeros):
    """The bits of a unary length: ``zeros`` zeros, then a one."""
    return [0] * zeros + [1]


def as_bytes(bits):
    bits = bits + [0] * (-len(bits) % 8)
    return torch.tensor([int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)],
                        dtype=torch.uint8)


@pytest.mark.parametrize("gap_k,error", [(20, "non-zero past position"), (56, "non-zero past position"),
                                         (57, "records do not fill"), (70, "records do not fill")])
def test_forged_long_codes_are_refused(coder, gap_k, error):
    """A unary gap length of up to 2^56 (records of up to 63 bits, read across two words)
    decodes to a position past the end; a longer one is refused as it is read."""
    codec = cp.EliasQSGD(levels=1, bucket_size=64)
    lengths = as_bytes(unary(gap_k))
    rest_bits = gap_k + 1
    rests = torch.full((-(-rest_bits // 8),), 0xFF, dtype=torch.uint8)
    forged = _Sections(1, gap_k + 1, rest_bits, torch.ones(2), lengths, rests)
    with pytest.raises(ValueError, match=error):
        codec._read_natively(coder, forged, 100)


def test_without_a_compiler_the_vectorised_coder_runs(monkeypatch, tmp_path, caplog):
    """No compiler: one warning, and payloads still written and read (by the torch coder)."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_override", True)  # tried even where compiling is switched off
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("COMMPRESS_CACHE_DIR", str(tmp_path))
    codec = cp.EliasQSGD(levels=4)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="commpress.native"):
        assert native.library() is None
        payload = codec.encode(x, torch.Generator().manual_seed(1))
    assert "native coder unavailable" in caplog.text
    assert codec.decode(payload).shape == x.shape


def test_the_build_is_cached_per_source_and_compiler(monkeypatch, tmp_path, coder):
    """A fresh cache directory gets one library, which a second load reuses."""
    monkeypatch.setenv("COMMPRESS_CACHE_DIR", str(tmp_path))
    first = native._build(native.compiler())
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(native.compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left
