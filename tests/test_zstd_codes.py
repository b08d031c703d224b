"""Frames of quantized codes (compressor/zstd.py): literals only where that costs few bytes, LZ matches
where codes repeat; every frame, from either producer, decodes to the same bytes with either of
zstandard's decoders (its C extension, as the codec uses, and its CFFI backend's libzstd)."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from compressor import EncodingSpec, blocked, decode_array, encode, zstd


def _relu_codes(bits: int, n: int = 1 << 19, seed: int = 0) -> np.ndarray:
    """Packed per-tensor codes of a post-ReLU tensor: a skewed alphabet with few repeats."""
    x = np.maximum(np.random.default_rng(seed).standard_normal(n), 0).astype(np.float32)
    return np.frombuffer(encode(x, EncodingSpec.parse(f"int{bits}+none")).payload, np.uint8)


def _smooth_codes(n: int = 1 << 18) -> np.ndarray:
    """8-bit codes of a smooth image-like ramp: rows that repeat, which LZ matches shrink."""
    row = np.linspace(0, 255, 224).astype(np.uint8)
    return np.tile(row, n // row.size + 1)[:n]


def _matches_frame(codes: np.ndarray) -> bytes:
    return zstd._compressor(zstd.CODES_LEVEL, 0, codes=True).compress(codes)


def _sequences(frame: bytes) -> int:
    return sum(block.get("sequences", 0) for block in zstd.frame_blocks(frame))


def _decoders() -> list:
    from zstandard import backend_cffi

    return [zstandard.ZstdDecompressor(), backend_cffi.ZstdDecompressor()]


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_codes_become_literals_only_at_about_the_same_size(bits: int) -> None:
    codes = _relu_codes(bits)
    frame = zstd.compress(codes, 1, codes=True)
    assert _sequences(frame) == 0
    assert any(block.get("literals") == "huffman" for block in zstd.frame_blocks(frame))
    assert _sequences(_matches_frame(codes)) > 0  # what it replaces had matches
    assert len(frame) <= len(_matches_frame(codes)) * (1 + zstd.LITERALS_TOLERANCE)
    assert zstd.decompress(frame, codes.size).tobytes() == codes.tobytes()


def test_repeating_codes_keep_their_matches() -> None:
    n = 1 << 18
    codes = _smooth_codes(n)
    frame = zstd.compress(codes, 1, codes=True)
    assert frame == _matches_frame(codes)
    assert len(frame) < len(zstd.compress_literals(codes)) / 2
    assert zstd.decompress(frame, n).tobytes() == codes.tobytes()


def test_short_codes_keep_their_matches_however_they_compress() -> None:
    for n in (1000, zstd.MIN_LITERALS_BYTES - 1):
        codes = _relu_codes(8, n)
        assert zstd.compress(codes, 1, codes=True) == _matches_frame(codes)
    codes = _relu_codes(8, zstd.MIN_LITERALS_BYTES)
    assert _sequences(zstd.compress(codes, 1, codes=True)) == 0


@pytest.mark.parametrize(
    "codes",
    [
        _relu_codes(8),
        _relu_codes(2, n=5000),
        _smooth_codes(),
        np.zeros(300_000, np.uint8),
        np.zeros(0, np.uint8),
        np.arange(256, dtype=np.uint8),
    ],
    ids=["relu-8bit", "relu-2bit-small", "smooth", "zeros", "empty", "one-of-each"],
)
def test_both_producers_frames_decode_bit_identically_with_both_decoders(codes: np.ndarray) -> None:
    for frame in (zstd.compress_literals(codes), _matches_frame(codes), zstd.compress(codes, 1, codes=True)):
        assert zstandard.get_frame_parameters(frame).content_size == codes.size
        for decoder in _decoders():
            assert decoder.decompress(frame) == codes.tobytes()
        assert zstd.decompress(frame, codes.size).tobytes() == codes.tobytes()
        assert zstd.decompress(frame, codes.size, writable=False).tobytes() == codes.tobytes()


def test_frames_outlive_the_reused_output_buffer() -> None:
    small, large = _relu_codes(8, seed=1), _relu_codes(8, n=3 << 20, seed=2)  # reused buffer, and one past its cap
    assert zstd.compress_bound(large.size) > blocked.MAX_REUSED_BYTES
    first = zstd.compress_literals(small)
    later = [zstd.compress_literals(_relu_codes(8, seed=3)), zstd.compress_literals(large)]
    assert zstd.decompress(first, small.size).tobytes() == small.tobytes()
    assert zstd.decompress(later[1], large.size).tobytes() == large.tobytes()


def test_literals_frames_keep_the_codes_window() -> None:
    frame = zstd.compress_literals(_relu_codes(8))
    assert zstandard.get_frame_parameters(frame).window_size == 1 << zstd.CODES_PARAMS["window_log"]


def test_the_same_codes_give_the_same_frame_from_any_buffer() -> None:
    codes = _relu_codes(4)
    frames = {zstd.compress(c, 1, codes=True) for c in (codes, codes.tobytes(), memoryview(codes.tobytes()))}
    assert len(frames) == 1


def test_without_the_cffi_backend_codes_keep_their_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.maximum(np.random.default_rng(1).standard_normal((1, 64, 32, 32)), 0).astype(np.float32)
    spec = EncodingSpec.parse("int8")
    literal_msg = encode(x, spec)
    monkeypatch.setattr(zstd, "_lib", None)
    match_msg = encode(x, spec)
    assert _sequences(match_msg.payload) > 0 and _sequences(literal_msg.payload) == 0
    codes = np.frombuffer(encode(x, EncodingSpec.parse("int8+none")).payload, np.uint8)
    assert match_msg.payload == _matches_frame(codes)
    assert decode_array(match_msg).tobytes() == decode_array(literal_msg).tobytes()
    with pytest.raises(RuntimeError, match="CFFI backend"):
        zstd.compress_literals(b"abc")


def test_worker_threads_and_other_levels_are_zstandards_frames() -> None:
    codes = _relu_codes(8)
    assert zstd.compress(codes, 3, codes=True) == zstandard.ZstdCompressor(level=3, write_content_size=True).compress(
        codes
    )
    assert _sequences(zstd.compress(codes, 1, 2, codes=True)) > 0


def test_a_binding_that_cannot_make_literals_frames_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    assert zstd.literals_frames_work()

    class NoSequenceApi:  # a libzstd binding without (or with a changed) ZSTD_compressSequences
        def __getattr__(self, name: str) -> object:
            if name == "ZSTD_compressSequences":
                raise AttributeError(name)
            return getattr(zstd._lib, name)

    monkeypatch.setattr(zstd._local, "literals", None, raising=False)
    monkeypatch.setattr(zstd, "_lib", NoSequenceApi())
    assert not zstd.literals_frames_work()
