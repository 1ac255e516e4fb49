"""The weight codec: manifests, bit-exact packing, bucket views, and inline tensor encoding."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.weight_sync.codec import (
    ALIGN_BYTES,
    Bucket,
    Manifest,
    TensorSpec,
    WeightSyncError,
    decode_tensor,
    dtype_from_name,
    dtype_name,
    encode_tensors,
    manifest_for,
    pack,
    plan_manifest,
    unpack,
)
from tests.weight_sync.tensors import DTYPES, bits, layout, random_tensor, same


def _mixed() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": random_tensor((3, 5), torch.float32, gen),  # 60 bytes
        "b": random_tensor((7,), torch.bfloat16, gen),  # 14 bytes
        "scalar": torch.tensor(2.5),  # 0-dim, 4 bytes
        "empty": torch.zeros(0, 4),  # 0 bytes
        "ids": torch.arange(11, dtype=torch.int64),  # 88 bytes
        "big": random_tensor((100,), torch.float32, gen),  # 400 bytes: more than a bucket
    }


def _entries(tensors: dict[str, torch.Tensor]):
    return [(n, x.shape, x.dtype) for n, x in tensors.items()]


# --- plan_manifest -------------------------------------------------------------------------


def test_plan_manifest_greedy_offsets_alignment_and_oversized_tensor() -> None:
    m = plan_manifest(_entries(_mixed()), bucket_bytes=128)
    # a at 0 (60 B); b at 64, the next multiple of ALIGN_BYTES (ends at 78); scalar would start
    # at 128 and end past 128: bucket 1. empty starts at 64 and ends there; ids (88 B) from 64
    # would end at 152: bucket 2. big (400 B) from 128 would not fit either: its own bucket.
    assert ALIGN_BYTES == 64
    assert layout(m) == {
        "a": (0, 0, 60), "b": (0, 64, 14),
        "scalar": (1, 0, 4), "empty": (1, 64, 0),
        "ids": (2, 0, 88),
        "big": (3, 0, 400),
    }
    assert [b.index for b in m.buckets] == [0, 1, 2, 3]
    assert [b.nbytes for b in m.buckets] == [78, 64, 88, 400]  # alignment gaps included
    assert m.total_bytes == 630 and m.num_tensors == 6 and m.max_bucket_bytes == 400
    specs = {s.name: s for b in m.buckets for s in b.tensors}
    assert specs["scalar"].shape == () and specs["empty"].shape == (0, 4)
    assert {n: s.dtype for n, s in specs.items()} == {
        "a": "float32", "b": "bfloat16", "scalar": "float32", "empty": "float32",
        "ids": "int64", "big": "float32",
    }
    assert manifest_for(_mixed().items(), 128) == m


def test_plan_manifest_boundaries_and_string_dtypes() -> None:
    # Exactly filling a bucket keeps the tensor in it; one byte more starts the next.
    m = plan_manifest([("x", (16,), "float32"), ("y", [16], "float32"), ("z", (1,), "uint8")],
                      bucket_bytes=128)
    assert layout(m) == {"x": (0, 0, 64), "y": (0, 64, 64), "z": (1, 0, 1)}
    assert [b.nbytes for b in m.buckets] == [128, 1]
    # An oversized tensor first in the stream opens no empty bucket before it, and the one
    # after it starts a new bucket.
    m = plan_manifest([("big", (1000,), torch.int64), ("s", (), torch.int8)], bucket_bytes=100)
    assert layout(m) == {"big": (0, 0, 8000), "s": (1, 0, 1)}
    assert m.max_bucket_bytes == 8000 and m.total_bytes == 8001
    # Alignment applies inside a bucket only: 1-byte tensors each take an aligned slot.
    m = plan_manifest([(f"u{i}", (1,), torch.uint8) for i in range(5)], bucket_bytes=130)
    assert layout(m) == {"u0": (0, 0, 1), "u1": (0, 64, 1), "u2": (0, 128, 1),
                          "u3": (1, 0, 1), "u4": (1, 64, 1)}
    assert [b.nbytes for b in m.buckets] == [129, 65]
    empty = plan_manifest([], 64)
    assert empty.buckets == () and empty.total_bytes == 0 and empty.max_bucket_bytes == 0
    assert empty.num_tensors == 0


@pytest.mark.parametrize("bucket_bytes", [0, -1])
def test_plan_manifest_rejects_nonpositive_bucket_bytes(bucket_bytes: int) -> None:
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan_manifest([("x", (1,), torch.float32)], bucket_bytes)


def test_manifest_dict_and_json_round_trip() -> None:
    m = plan_manifest(_entries(_mixed()), bucket_bytes=128)
    d = m.to_dict()
    assert list(d) == ["buckets", "adapter", "version"] and len(d["buckets"]) == 4
    assert d["adapter"] is None and d["version"] == 0
    assert Manifest.from_dict(d) == m
    lora = Manifest(m.buckets, adapter={"r": 8, "target_modules": ["q_proj"]}, version=3)
    assert Manifest.from_dict(json.loads(json.dumps(lora.to_dict()))) == lora

    def plain(x) -> bool:  # only what msgspec and JSON carry: no dataclasses, no torch
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list | tuple):
            return all(plain(v) for v in x)
        return isinstance(x, str | int)

    assert plain(d["buckets"]) and plain(d["version"])
    wire = json.loads(json.dumps(d))  # tuples come back as lists
    assert wire["buckets"][1] == {
        "index": 1, "nbytes": 64,
        "tensors": [
            {"name": "scalar", "shape": [], "dtype": "float32", "offset": 0, "nbytes": 4},
            {"name": "empty", "shape": [0, 4], "dtype": "float32", "offset": 64, "nbytes": 0},
        ],
    }
    back = Manifest.from_dict(wire)
    assert back == m
    assert back.buckets[1].tensors[0] == TensorSpec("scalar", (), "float32", 0, 4)
    assert isinstance(back.buckets[0], Bucket) and back.buckets[0].tensors[0].shape == (3, 5)


# --- pack / unpack -------------------------------------------------------------------------


def test_pack_unpack_bit_exact_and_views_not_copies() -> None:
    t = _mixed()
    m = plan_manifest(_entries(t), bucket_bytes=256)
    buf = torch.full((m.max_bucket_bytes + 32,), 0xAB, dtype=torch.uint8)
    for bucket in m.buckets:
        flat = pack(bucket, t, buf)
        assert flat.numel() == bucket.nbytes and flat.data_ptr() == buf.data_ptr()
        named = unpack(bucket, flat)
        assert [n for n, _ in named] == [s.name for s in bucket.tensors]
        for (name, view), spec in zip(named, bucket.tensors, strict=True):
            assert same(view, t[name])
            # A view into the buffer: same storage, at the manifest's offset.
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            if spec.nbytes:  # an empty tensor reports data_ptr() 0
                assert view.data_ptr() == buf.data_ptr() + spec.offset
                assert buf.data_ptr() <= view.data_ptr() < buf.data_ptr() + bucket.nbytes
        if any(s.nbytes for s in bucket.tensors):  # writing the buffer shows through the views
            buf[: bucket.nbytes] = 0
            assert all(not bits(v).any() for _, v in named)


def test_pack_rejects_wrong_shape_or_dtype_naming_the_tensor() -> None:
    t = _mixed()
    m = plan_manifest(_entries(t), bucket_bytes=128)
    buf = torch.empty(m.max_bucket_bytes, dtype=torch.uint8)
    with pytest.raises(WeightSyncError, match=r"tensor a is \(5, 3\) torch.float32, manifest "
                                              r"says \(3, 5\) float32"):
        pack(m.buckets[0], dict(t, a=torch.zeros(5, 3)), buf)
    with pytest.raises(WeightSyncError, match=r"tensor b is \(7,\) torch.float16, manifest "
                                              r"says \(7,\) bfloat16"):
        pack(m.buckets[0], dict(t, b=torch.zeros(7, dtype=torch.float16)), buf)
    with pytest.raises(WeightSyncError, match=r"tensor scalar is \(1,\).*says \(\) float32"):
        pack(m.buckets[1], dict(t, scalar=torch.zeros(1)), buf)


def test_pack_accepts_non_contiguous_sources() -> None:
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    m = plan_manifest([("t", (4, 3), torch.float32)], bucket_bytes=1024)
    buf = torch.empty(m.max_bucket_bytes, dtype=torch.uint8)
    [(name, view)] = unpack(m.buckets[0], pack(m.buckets[0], {"t": src.T}, buf))
    assert name == "t" and same(view, src.T.contiguous())


SHAPES = st.lists(st.integers(0, 5), max_size=3)  # [] is 0-dim; a 0 makes it empty


@settings(max_examples=50, deadline=None)
@given(entries=st.lists(st.tuples(SHAPES, st.sampled_from(DTYPES)), min_size=1, max_size=10),
       bucket_bytes=st.integers(1, 600), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_property(entries, bucket_bytes, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": random_tensor(tuple(shape), dtype, gen)
               for i, (shape, dtype) in enumerate(entries)}
    m = plan_manifest(_entries(tensors), bucket_bytes)
    specs = [s for b in m.buckets for s in b.tensors]
    assert [s.name for s in specs] == list(tensors)  # order kept, nothing dropped
    assert m.num_tensors == len(tensors)
    assert [b.index for b in m.buckets] == list(range(len(m.buckets)))
    assert m.total_bytes == sum(b.nbytes for b in m.buckets)
    prev: Bucket | None = None
    for b in m.buckets:
        assert b.tensors, "no empty buckets"
        ends = [s.offset + s.nbytes for s in b.tensors]
        assert b.nbytes == ends[-1]
        assert b.tensors[0].offset == 0
        assert all(s.offset % ALIGN_BYTES == 0 for s in b.tensors)
        # Non-overlapping, in order, each at the first aligned offset after the one before.
        for s, end_before in zip(b.tensors[1:], ends, strict=False):
            assert s.offset == -(-end_before // ALIGN_BYTES) * ALIGN_BYTES
        assert b.nbytes <= bucket_bytes or len(b.tensors) == 1  # only a lone tensor overflows
        if prev is not None:  # greedy: the bucket closed because its successor did not fit
            start = -(-prev.nbytes // ALIGN_BYTES) * ALIGN_BYTES
            assert start + b.tensors[0].nbytes > bucket_bytes
        prev = b
    buf = torch.empty(m.max_bucket_bytes, dtype=torch.uint8)
    for bucket in m.buckets:
        for name, view in unpack(bucket, pack(bucket, tensors, buf)):
            assert same(view, tensors[name])


def test_dtype_names_round_trip_and_reject_unknown() -> None:
    for dtype in DTYPES + [torch.bool, torch.complex64]:
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_from_name("float") is torch.float32  # aliases resolve
    for bad in ("float99", "Tensor", "nn", ""):
        with pytest.raises(ValueError, match="unknown dtype name"):
            dtype_from_name(bad)
    with pytest.raises(ValueError, match="unknown dtype name"):
        plan_manifest([("x", (1,), "float99")], 64)


def test_tensor_encoding_round_trips() -> None:
    tensors = [("a", torch.randn(3, 4).to(torch.bfloat16)), ("b", torch.tensor(2.5)),
               ("c", torch.empty(0, 3))]
    for (name, want), entry in zip(tensors, encode_tensors(tensors), strict=True):
        got_name, got = decode_tensor(entry, "cpu")
        assert got_name == name and got.dtype == want.dtype and torch.equal(got, want)
