"""Weight sync: manifests, bit-exact packing, a real 3-rank gloo group, and failures that name."""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.weight_sync import (
    ALIGN_BYTES,
    GroupSpec,
    Manifest,
    SyncGroup,
    WeightSyncError,
    dtype_from_name,
    free_port,
    pack,
    plan_manifest,
    receive_buckets,
    send_buckets,
    unpack,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(11, dtype=torch.int64),
        "big": torch.randn(100, generator=gen),  # 400 bytes: larger than the bucket
    }


def test_plan_manifest_offsets_alignment_and_oversized_tensor() -> None:
    t = _tensors()
    m = plan_manifest(((n, x.shape, x.dtype) for n, x in t.items()), bucket_bytes=128)
    specs = {s.name: (b.index, s.offset, s.nbytes) for b in m.buckets for s in b.tensors}
    # a: 60 bytes at 0; b: 14 bytes at 64 (aligned); scalar would start at 128 > 128 - 4
    assert specs["a"] == (0, 0, 60) and specs["b"] == (0, 64, 14)
    assert specs["scalar"] == (1, 0, 4) and specs["empty"] == (1, 64, 0)
    # ids (88 bytes) would end at 64 + 88 > 128: a new bucket
    assert specs["ids"] == (2, 0, 88)
    assert specs["big"] == (3, 0, 400)  # alone in its own, oversized bucket
    assert all(s.offset % ALIGN_BYTES == 0 for b in m.buckets for s in b.tensors)
    assert m.num_tensors == 6 and m.max_bucket_bytes == 400
    assert [b.nbytes for b in m.buckets] == [78, 64, 88, 400]  # alignment gaps included
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_manifest([], 0)


def test_pack_unpack_bit_exact_views_and_mismatch() -> None:
    t = _tensors()
    m = plan_manifest(((n, x.shape, x.dtype) for n, x in t.items()), bucket_bytes=256)
    buf = torch.empty(m.max_bucket_bytes, dtype=torch.uint8)
    for bucket in m.buckets:
        flat = pack(bucket, t, buf)
        for name, view in unpack(bucket, flat):
            assert view.dtype == t[name].dtype and torch.equal(view, t[name])
            if view.numel():
                start = buf.data_ptr()
                assert start <= view.data_ptr() < start + buf.numel()  # a view, not a copy
    wrong = dict(t, a=torch.zeros(5, 3))
    with pytest.raises(WeightSyncError, match="tensor a is"):
        pack(m.buckets[0], wrong, buf)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 6), max_size=3), st.sampled_from(DTYPES)),
                min_size=1, max_size=8), st.integers(1, 512))
def test_pack_unpack_roundtrip_property(entries, bucket_bytes) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": (torch.rand(shape, generator=gen) * 100).to(dtype)
               for i, (shape, dtype) in enumerate(entries)}
    m = plan_manifest(((n, x.shape, x.dtype) for n, x in tensors.items()), bucket_bytes)
    assert m.num_tensors == len(tensors)
    buf = torch.empty(max(m.max_bucket_bytes, 1), dtype=torch.uint8)
    for bucket in m.buckets:
        assert bucket.nbytes <= max(bucket_bytes, max(s.nbytes for s in bucket.tensors))
        for name, view in unpack(bucket, pack(bucket, tensors, buf)):
            assert torch.equal(view, tensors[name])


def _spec(world: int, timeout: float = 20.0) -> GroupSpec:
    return GroupSpec("gloo", "127.0.0.1", free_port("127.0.0.1"), world, timeout)


def _run_ranks(targets) -> list:
    """Run each rank's function in a thread; return results or raised exceptions."""
    results: list = [None] * len(targets)

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate(targets)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a rank hung"
    return results


def test_three_rank_gloo_sync_twice_over_one_group() -> None:
    gen = torch.Generator().manual_seed(2)
    weights = {f"w{i}": torch.randn(40 + i, 30, generator=gen) for i in range(7)}
    weights["h"] = torch.randn(64, generator=gen).to(torch.bfloat16)
    m = plan_manifest(((n, x.shape, x.dtype) for n, x in weights.items()), bucket_bytes=6000)
    assert len(m.buckets) >= 5  # both in-flight buffers get reused
    spec = _spec(3)
    groups: list = [None] * 3
    _run_ranks([lambda r=r: groups.__setitem__(r, SyncGroup(spec, r)) for r in range(3)])
    for round_ in range(2):
        sent = {n: x + round_ for n, x in weights.items()}
        got = [{}, {}]

        def receiver(r, into):
            def load(named):
                for name, view in named:
                    into[name] = view.clone()  # views are valid during the call only
            return receive_buckets(groups[r], m, load)

        results = _run_ranks([
            lambda s=sent: send_buckets(groups[0], m, lambda b: nullcontext(s)),
            lambda g=got: receiver(1, g[0]), lambda g=got: receiver(2, g[1]),
        ])
        for stats in results:
            assert not isinstance(stats, BaseException), stats
            assert stats.buckets == len(m.buckets) and stats.bytes == m.total_bytes
        for received in got:
            assert received.keys() == sent.keys()
            assert all(torch.equal(received[n], sent[n]) for n in sent)


def test_peer_that_never_joins_fails_in_bounded_time_naming_the_group() -> None:
    spec = _spec(2, timeout=2)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        SyncGroup(spec, 0)
    assert time.monotonic() - start < spec.timeout_s + 5
    assert spec.endpoint in str(err.value) and "rank 0 of 2 could not join" in str(err.value)


def test_receiver_that_stops_receiving_fails_the_sender_in_bounded_time() -> None:
    weights = {"w": torch.ones(1000)}
    m = plan_manifest([("w", (1000,), torch.float32)], bucket_bytes=1 << 20)
    spec = _spec(2, timeout=2)
    groups: list = [None] * 2
    _run_ranks([lambda r=r: groups.__setitem__(r, SyncGroup(spec, r)) for r in range(2)])
    start = time.monotonic()
    result = _run_ranks([lambda: send_buckets(groups[0], m, lambda b: nullcontext(weights))])[0]
    elapsed = time.monotonic() - start
    assert isinstance(result, WeightSyncError), result
    assert spec.endpoint in str(result) and "rank 0 of 2" in str(result)
    assert elapsed < spec.timeout_s + 5


def test_group_spec_and_dtype_validation() -> None:
    with pytest.raises(ValueError, match="sync backend"):
        GroupSpec("mpi", "127.0.0.1", 1, 2, 1.0)
    with pytest.raises(ValueError, match="at least one engine rank"):
        GroupSpec("gloo", "127.0.0.1", 1, 1, 1.0)
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name("float99")
    assert dtype_from_name("bfloat16") is torch.bfloat16
