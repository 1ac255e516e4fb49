"""Weight sync: manifests, bit-exact packing, a real 3-rank gloo group, and failures that name.

Group members are threads of this process: every `SyncGroup` owns its `TCPStore` and
`ProcessGroupGloo`, and gloo runs its collectives on its own threads, so a rank blocked in
`work.wait()` does not hold up the others. Failure tests use a 2 s timeout and assert that
every rank returns within a few seconds of it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpe_ray.weight_sync.codec import (
    ALIGN_BYTES,
    Bucket,
    GroupSpec,
    Manifest,
    SyncGroup,
    SyncStats,
    TensorSpec,
    WeightSyncError,
    adopt_buckets,
    bucket_view,
    dtype_from_name,
    dtype_name,
    free_port,
    manifest_for,
    pack,
    plan_manifest,
    receive_buckets,
    receive_into,
    send_buckets,
    unpack,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8]
FAIL_TIMEOUT_S = 2.0
SLACK_S = 3.0  # gloo and the TCPStore give up a little after the timeout they were given


def _random(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) of `dtype`."""
    numel = torch.Size(shape).numel()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: same dtype, same shape, same bytes (so NaN payloads count too)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _mixed() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": _random((3, 5), torch.float32, gen),  # 60 bytes
        "b": _random((7,), torch.bfloat16, gen),  # 14 bytes
        "scalar": torch.tensor(2.5),  # 0-dim, 4 bytes
        "empty": torch.zeros(0, 4),  # 0 bytes
        "ids": torch.arange(11, dtype=torch.int64),  # 88 bytes
        "big": _random((100,), torch.float32, gen),  # 400 bytes: more than a bucket
    }


def _entries(tensors: dict[str, torch.Tensor]):
    return [(n, x.shape, x.dtype) for n, x in tensors.items()]


def _layout(m: Manifest) -> dict[str, tuple[int, int, int]]:
    return {s.name: (b.index, s.offset, s.nbytes) for b in m.buckets for s in b.tensors}


# --- plan_manifest -------------------------------------------------------------------------


def test_plan_manifest_greedy_offsets_alignment_and_oversized_tensor() -> None:
    m = plan_manifest(_entries(_mixed()), bucket_bytes=128)
    # a at 0 (60 B); b at 64, the next multiple of ALIGN_BYTES (ends at 78); scalar would start
    # at 128 and end past 128: bucket 1. empty starts at 64 and ends there; ids (88 B) from 64
    # would end at 152: bucket 2. big (400 B) from 128 would not fit either: its own bucket.
    assert ALIGN_BYTES == 64
    assert _layout(m) == {
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
    assert _layout(m) == {"x": (0, 0, 64), "y": (0, 64, 64), "z": (1, 0, 1)}
    assert [b.nbytes for b in m.buckets] == [128, 1]
    # An oversized tensor first in the stream opens no empty bucket before it, and the one
    # after it starts a new bucket.
    m = plan_manifest([("big", (1000,), torch.int64), ("s", (), torch.int8)], bucket_bytes=100)
    assert _layout(m) == {"big": (0, 0, 8000), "s": (1, 0, 1)}
    assert m.max_bucket_bytes == 8000 and m.total_bytes == 8001
    # Alignment applies inside a bucket only: 1-byte tensors each take an aligned slot.
    m = plan_manifest([(f"u{i}", (1,), torch.uint8) for i in range(5)], bucket_bytes=130)
    assert _layout(m) == {"u0": (0, 0, 1), "u1": (0, 64, 1), "u2": (0, 128, 1),
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
    assert list(d) == ["buckets"] and len(d["buckets"]) == 4
    assert Manifest.from_dict(d) == m

    def plain(x) -> bool:  # only what msgspec and JSON carry: no dataclasses, no torch
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list | tuple):
            return all(plain(v) for v in x)
        return isinstance(x, str | int)

    assert plain(d)
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
            assert _same(view, t[name])
            # A view into the buffer: same storage, at the manifest's offset.
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            if spec.nbytes:  # an empty tensor reports data_ptr() 0
                assert view.data_ptr() == buf.data_ptr() + spec.offset
                assert buf.data_ptr() <= view.data_ptr() < buf.data_ptr() + bucket.nbytes
        if any(s.nbytes for s in bucket.tensors):  # writing the buffer shows through the views
            buf[: bucket.nbytes] = 0
            assert all(not _bits(v).any() for _, v in named)


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
    assert name == "t" and _same(view, src.T.contiguous())


SHAPES = st.lists(st.integers(0, 5), max_size=3)  # [] is 0-dim; a 0 makes it empty


@settings(max_examples=50, deadline=None)
@given(entries=st.lists(st.tuples(SHAPES, st.sampled_from(DTYPES)), min_size=1, max_size=10),
       bucket_bytes=st.integers(1, 600), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_property(entries, bucket_bytes, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": _random(tuple(shape), dtype, gen)
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
            assert _same(view, tensors[name])


# --- a real gloo group ---------------------------------------------------------------------


def _spec(world: int, timeout: float = 20.0) -> GroupSpec:
    return GroupSpec("gloo", "127.0.0.1", free_port("127.0.0.1"), world, timeout)


def _run_ranks(fns: list[Callable[[], Any]], join_s: float = 30.0) -> tuple[list, list]:
    """Run each rank in a daemon thread; return (result or raised exception, seconds) per rank."""
    results: list[Any] = [None] * len(fns)
    seconds: list[float] = [float("nan")] * len(fns)
    start = time.monotonic()

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:  # the test inspects it
            results[i] = exc
        seconds[i] = time.monotonic() - start

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True, name=f"rank{i}")
               for i, fn in enumerate(fns)]
    for th in threads:
        th.start()
    deadline = start + join_s
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [th.name for th in threads if th.is_alive()]
    assert not hung, f"ranks hung: {hung}"
    return results, seconds


def _join(spec: GroupSpec) -> list[SyncGroup]:
    groups, _ = _run_ranks([lambda r=r: SyncGroup(spec, r) for r in range(spec.world_size)])
    for g in groups:
        assert isinstance(g, SyncGroup), g
    return groups


def _ok(results: list) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _assert_names(exc: BaseException, spec: GroupSpec, rank: int, what: str) -> None:
    assert isinstance(exc, WeightSyncError), repr(exc)
    msg = str(exc)
    assert spec.endpoint in msg and f"rank {rank} of {spec.world_size} {what}" in msg, msg
    assert "\n" not in msg


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {}
    for i in range(8):
        w[f"layer{i}.w"] = _random((6 + i, 16), torch.float32, gen)  # 384-832 bytes
        w[f"layer{i}.b"] = _random((16 + i,), torch.bfloat16, gen)  # 32-46 bytes
        if i == 3:
            w["head"] = _random((3000,), torch.float32, gen)  # 12000 bytes: a bucket of its own
    w["ids"] = torch.randint(-(2**62), 2**62, (33,), dtype=torch.int64, generator=gen)
    w["scale"] = _random((), torch.float32, gen)
    w["unused"] = torch.zeros(0, 3, dtype=torch.float16)
    return w


def test_three_rank_gloo_sync_twice_over_one_group() -> None:
    first = _model(1)
    m = manifest_for(first.items(), bucket_bytes=2048)
    # Several packed buckets on either side of a lone oversized one, so that both staging
    # buffers are reused on both sides.
    sizes = [len(b.tensors) for b in m.buckets]
    assert len(sizes) >= 6 and sizes.count(1) == 1 and m.max_bucket_bytes == 12000
    lone = sizes.index(1)
    assert m.buckets[lone].tensors[0].name == "head" and 2 <= lone <= len(sizes) - 3
    spec = _spec(3)
    groups = _join(spec)
    assert [g.rank for g in groups] == [0, 1, 2]

    for round_, sent in enumerate([first, _model(2)]):
        events: list[tuple[str, int]] = []

        @contextmanager
        def fetch(bucket: Bucket, sent=sent, events=events):
            # As ZeRO-3 would: gather on entry, free on exit. Packing must happen inside.
            events.append(("enter", bucket.index))
            held = {s.name: sent[s.name].clone() for s in bucket.tensors}
            yield held
            for t in held.values():
                t.fill_(0)
            events.append(("exit", bucket.index))

        got: list[dict[str, torch.Tensor]] = [{}, {}]
        loads: list[list[tuple[list[str], int, bool]]] = [[], []]

        def receiver(rank: int, got=got, loads=loads) -> SyncStats:
            def load(named):
                storage = {v.untyped_storage().data_ptr() for _, v in named}
                assert len(storage) == 1  # one bucket, one buffer
                views = all(v._is_view() for _, v in named)
                loads[rank - 1].append(([n for n, _ in named], storage.pop(), views))
                for name, view in named:  # valid only during the call: copy out
                    got[rank - 1][name] = view.clone()
            return receive_buckets(groups[rank], m, load)

        results, _ = _run_ranks([lambda: send_buckets(groups[0], m, fetch),
                                 lambda: receiver(1), lambda: receiver(2)])
        _ok(results)
        for stats in results:
            assert isinstance(stats, SyncStats)
            assert (stats.buckets, stats.bytes) == (len(m.buckets), m.total_bytes)
            assert stats.seconds >= 0
        assert events == [(e, b.index) for b in m.buckets for e in ("enter", "exit")]
        for rank in (1, 2):
            received = got[rank - 1]
            assert list(received) == list(sent)
            for name in sent:
                assert _same(received[name], sent[name]), (round_, rank, name)
            calls = loads[rank - 1]
            assert [names for names, _, _ in calls] == [[s.name for s in b.tensors]
                                                        for b in m.buckets]
            assert all(views for _, _, views in calls)
            # Double buffering: bucket i lands in buffer i % 2, alternating between two.
            ptrs = [p for _, p, _ in calls]
            assert len(set(ptrs)) == 2
            assert all(ptrs[i] == ptrs[i % 2] for i in range(len(ptrs)))


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 700))
    net[0].to(torch.bfloat16)
    return net  # 1[...].weight (44800 bytes) exceeds the bucket: a lone, unpacked bucket


def test_adopt_buckets_puts_parameters_in_place() -> None:
    net, learner = _net(0), _net(1)
    params = dict(net.named_parameters())
    m = manifest_for(learner.named_parameters(), bucket_bytes=1024)
    before = {n: p.detach().clone() for n, p in params.items()}
    buffers = adopt_buckets(params, m)
    assert buffers is not None and [b.numel() for b in buffers] == [b.nbytes for b in m.buckets]
    for bucket, flat in zip(m.buckets, buffers, strict=True):
        for spec in bucket.tensors:
            p = params[spec.name]
            assert p is net.get_parameter(spec.name) and isinstance(p, torch.nn.Parameter)
            assert _same(p.detach(), before[spec.name])  # values kept
            if spec.nbytes:
                assert p.data_ptr() == flat.data_ptr() + spec.offset
    # A manifest that does not match every parameter changes nothing.
    other = manifest_for([("0.weight", torch.zeros(16, 8))], 1024)  # float32, not bfloat16
    fresh = dict(_net(0).named_parameters())
    ptrs = {n: p.data_ptr() for n, p in fresh.items()}
    assert adopt_buckets(fresh, other) is None
    assert adopt_buckets(fresh, manifest_for([("nope", torch.zeros(1))], 64)) is None
    assert {n: p.data_ptr() for n, p in fresh.items()} == ptrs


def test_gloo_receive_into_adopted_parameters_twice() -> None:
    net = _net(0)
    params = dict(net.named_parameters())
    learner = _net(1)
    m = manifest_for(learner.named_parameters(), bucket_bytes=1024)
    assert [len(b.tensors) for b in m.buckets].count(1) >= 1
    buffers = adopt_buckets(params, m)
    assert buffers is not None
    spec = _spec(2)
    groups = _join(spec)
    x = torch.randn(3, 8)
    for round_ in range(2):
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(round_)
        sent = {n: p.detach().clone() for n, p in learner.named_parameters()}
        results, _ = _run_ranks([
            lambda: send_buckets(groups[0], m, lambda b: nullcontext(
                dict(learner.named_parameters()))),
            lambda: receive_into(groups[1], m, buffers),
        ])
        _ok(results)
        assert [(r.buckets, r.bytes) for r in results] == [(len(m.buckets), m.total_bytes)] * 2
        assert all(_same(params[n].detach(), sent[n]) for n in sent), round_
        with torch.no_grad():
            x16 = x.to(torch.bfloat16)
            want = learner[1](learner[0](x16).float())
            assert torch.equal(net[1](net[0](x16).float()), want)


def test_bucket_view_finds_adopted_buckets_and_lone_tensors_only() -> None:
    net = _net(0)
    params = dict(net.named_parameters())
    m = manifest_for(net.named_parameters(), bucket_bytes=1024)
    lone = [b for b in m.buckets if len(b.tensors) == 1 and b.tensors[0].nbytes > 1024]
    shared = [b for b in m.buckets if len(b.tensors) > 1]
    assert lone and shared
    assert bucket_view(lone[0], params) is not None  # one contiguous tensor: no packing
    assert bucket_view(shared[0], params) is None  # separate tensors: must be packed
    buffers = adopt_buckets(params, m)
    assert buffers is not None
    for bucket, flat in zip(m.buckets, buffers, strict=True):
        view = bucket_view(bucket, params)
        assert view is not None and view.data_ptr() == flat.data_ptr()
        assert view.numel() == bucket.nbytes and torch.equal(view, flat)
    # a tensor out of its manifest place (a copy) makes the bucket packable only
    moved = dict(params, **{shared[0].tensors[-1].name:
                            params[shared[0].tensors[-1].name].detach().clone()})
    assert bucket_view(shared[0], moved) is None


def test_adopted_sender_sends_in_place_without_staging() -> None:
    learner, engine = _net(1), _net(0)
    m = manifest_for(learner.named_parameters(), bucket_bytes=1024)
    assert adopt_buckets(dict(learner.named_parameters()), m) is not None
    received = adopt_buckets(dict(engine.named_parameters()), m)
    groups = _join(_spec(2))
    for round_ in range(2):
        with torch.no_grad():  # an optimiser step writes through the adopted views
            for p in learner.parameters():
                p.mul_(1.5).add_(round_)
        results, _ = _run_ranks([
            lambda: send_buckets(groups[0], m, lambda b: nullcontext(
                dict(learner.named_parameters())), persistent=True),
            lambda: receive_into(groups[1], m, received),
        ])
        _ok(results)
        assert all(_same(e.detach(), p.detach()) for e, p in
                   zip(engine.parameters(), learner.parameters(), strict=True)), round_
    assert groups[0].staging == []  # nothing was packed


def test_gloo_sync_of_empty_buckets_and_empty_manifest() -> None:
    spec = _spec(2)
    groups = _join(spec)
    m = plan_manifest([("e", (0,), torch.float32), ("f", (2, 0), torch.bfloat16)], 64)
    assert _layout(m) == {"e": (0, 0, 0), "f": (0, 0, 0)}  # both at 0: nothing to align
    loaded: list[tuple[str, tuple[int, ...]]] = []
    tensors = {"e": torch.zeros(0), "f": torch.zeros(2, 0, dtype=torch.bfloat16)}
    results, _ = _run_ranks([
        lambda: send_buckets(groups[0], m, lambda b: nullcontext(tensors)),
        lambda: receive_buckets(groups[1], m,
                                lambda named: loaded.extend((n, tuple(v.shape)) for n, v in named)),
    ])
    _ok(results)
    assert loaded == [("e", (0,)), ("f", (2, 0))]
    assert [(s.buckets, s.bytes) for s in results] == [(1, 0), (1, 0)]
    nothing = plan_manifest([], 64)
    results, _ = _run_ranks([
        lambda: send_buckets(groups[0], nothing, lambda b: pytest.fail("fetched")),
        lambda: receive_buckets(groups[1], nothing, lambda named: pytest.fail("loaded")),
    ])
    _ok(results)
    assert [(s.buckets, s.bytes) for s in results] == [(0, 0), (0, 0)]


# --- failures: a WeightSyncError naming group and rank, in bounded time ---------------------


def test_peers_that_never_join_fail_the_ranks_that_came_in_bounded_time() -> None:
    # Three groups whose rendezvous cannot complete, run side by side to save time: the
    # TCPStore server (rank 0) alone waits for clients; rank 1 alone finds no server; ranks 0
    # and 1 of a 3-rank group wait for rank 2.
    alone_master = _spec(2, FAIL_TIMEOUT_S)
    alone_client = _spec(2, FAIL_TIMEOUT_S)
    short = _spec(3, FAIL_TIMEOUT_S)
    results, seconds = _run_ranks([
        lambda: SyncGroup(alone_master, 0), lambda: SyncGroup(alone_client, 1),
        lambda: SyncGroup(short, 0), lambda: SyncGroup(short, 1),
    ])
    _assert_names(results[0], alone_master, 0, "could not join")
    assert "DistStoreError" in str(results[0]) and "1/2 clients joined" in str(results[0])
    assert isinstance(results[0].__cause__, torch.distributed.DistStoreError)
    assert f"within {FAIL_TIMEOUT_S:g} s" in str(results[0]) and "new port" in str(results[0])
    _assert_names(results[1], alone_client, 1, "could not join")
    assert "DistNetworkError" in str(results[1])
    _assert_names(results[2], short, 0, "could not join")
    assert "2/3 clients joined" in str(results[2])
    _assert_names(results[3], short, 1, "could not join")  # waits for the store key of rank 0
    assert all(s > FAIL_TIMEOUT_S - 0.5 for s in seconds)
    # The server gives up about 1 s after the timeout; the others within a second of it.
    assert max(seconds[0], seconds[2], seconds[3]) < FAIL_TIMEOUT_S + SLACK_S
    # A client retries its connect once, after a random back-off of up to about the timeout.
    assert seconds[1] < 2 * FAIL_TIMEOUT_S + SLACK_S


def test_a_lone_side_of_a_sync_times_out_on_its_own() -> None:
    weights = {"w": torch.ones(1000), "b": torch.arange(10)}
    m = manifest_for(weights.items(), bucket_bytes=1 << 20)
    assert len(m.buckets) == 1
    # Group a: rank 1 joined but never receives. Group b: rank 0 joined but never sends.
    # gloo's root waits for each peer to post its receive, so either side fails alone.
    spec_a, spec_b = _spec(2, FAIL_TIMEOUT_S), _spec(2, FAIL_TIMEOUT_S)
    groups_a, groups_b = _join(spec_a), _join(spec_b)
    results, seconds = _run_ranks([
        lambda: send_buckets(groups_a[0], m, lambda b: nullcontext(weights)),
        lambda: receive_buckets(groups_b[1], m, lambda named: pytest.fail("loaded")),
    ])
    _assert_names(results[0], spec_a, 0, "failed in")
    assert "Timed out waiting 2000ms for send" in str(results[0])
    _assert_names(results[1], spec_b, 1, "failed in bucket 0")
    assert "Timed out waiting 2000ms for recv" in str(results[1])
    assert all(FAIL_TIMEOUT_S - 0.5 < s < FAIL_TIMEOUT_S + SLACK_S for s in seconds), seconds
    # The same peers on a new port work again.
    spec = _spec(2)
    groups = _join(spec)
    got: dict[str, torch.Tensor] = {}
    results, _ = _run_ranks([
        lambda: send_buckets(groups[0], m, lambda b: nullcontext(weights)),
        lambda: receive_buckets(groups[1], m, lambda named: got.update(
            (n, v.clone()) for n, v in named)),
    ])
    _ok(results)
    assert list(got) == ["w", "b"] and all(_same(got[n], weights[n]) for n in weights)


def test_sender_dying_mid_stream_fails_every_receiver_at_that_bucket() -> None:
    weights = {f"w{i}": torch.full((100,), float(i)) for i in range(6)}
    m = manifest_for(weights.items(), bucket_bytes=400)
    assert len(m.buckets) == 6
    spec = _spec(3, FAIL_TIMEOUT_S)
    groups = _join(spec)

    @contextmanager
    def fetch(bucket: Bucket):
        if bucket.index == 2:
            raise RuntimeError("gather failed")
        yield weights

    got: list[dict[str, torch.Tensor]] = [{}, {}]

    def receiver(rank: int):
        return receive_buckets(groups[rank], m, lambda named: got[rank - 1].update(
            (n, v.clone()) for n, v in named))

    results, seconds = _run_ranks([lambda: send_buckets(groups[0], m, fetch),
                                   lambda: receiver(1), lambda: receiver(2)])
    # The sender's own error comes through as it is; it is not a sync failure.
    assert isinstance(results[0], RuntimeError) and str(results[0]) == "gather failed"
    assert seconds[0] < 1.0
    for rank in (1, 2):
        _assert_names(results[rank], spec, rank, "failed in bucket 2")
        assert FAIL_TIMEOUT_S - 0.5 < seconds[rank] < FAIL_TIMEOUT_S + SLACK_S
        # Buckets 0 and 1 were broadcast before the failure and arrived intact.
        assert list(got[rank - 1]) == ["w0", "w1"]
        assert all(_same(got[rank - 1][n], weights[n]) for n in ("w0", "w1"))


def test_receiver_dying_mid_stream_fails_the_sender_not_the_other_receiver_at_once() -> None:
    weights = {f"w{i}": torch.full((100,), float(i)) for i in range(6)}
    m = manifest_for(weights.items(), bucket_bytes=400)
    spec = _spec(3, FAIL_TIMEOUT_S)
    groups = _join(spec)

    def dying_load(named):
        if named[0][0] == "w1":
            raise ValueError("load failed")

    got: list[str] = []
    results, seconds = _run_ranks([
        lambda: send_buckets(groups[0], m, lambda b: nullcontext(weights)),
        lambda: receive_buckets(groups[1], m, dying_load),
        lambda: receive_buckets(groups[2], m, lambda named: got.extend(n for n, _ in named)),
    ])
    assert isinstance(results[1], ValueError) and seconds[1] < 1.0  # load's error, unwrapped
    # Rank 1 had posted receives for buckets 0-2 when it died, so the root's send of
    # bucket 3 never completes; it notices when it waits for that slot again.
    _assert_names(results[0], spec, 0, "failed in bucket 3")
    # The broadcast goes from the root to each peer: rank 2 keeps receiving until the root
    # stops, then times out on its own.
    _assert_names(results[2], spec, 2, "failed in bucket")
    assert got == [f"w{i}" for i in range(len(got))] and len(got) >= 3
    assert max(seconds) < 2 * FAIL_TIMEOUT_S + SLACK_S


# --- small pieces --------------------------------------------------------------------------


def test_group_spec_validation_endpoint_and_dict() -> None:
    with pytest.raises(ValueError, match="sync backend must be one of"):
        GroupSpec("mpi", "127.0.0.1", 1234, 2, 1.0)
    for world in (1, 0, -3):
        with pytest.raises(ValueError, match="at least one engine rank"):
            GroupSpec("gloo", "127.0.0.1", 1234, world, 1.0)
    spec = GroupSpec("nccl", "10.0.0.7", 29555, 4, 30.0, name="sync-a")
    assert spec.endpoint == "sync-a@10.0.0.7:29555"
    assert GroupSpec(**json.loads(json.dumps(spec.to_dict()))) == spec
    assert GroupSpec("gloo", "h", 1, 2, 1.0).endpoint == "cpe-weight-sync@h:1"


def test_free_port_is_bindable() -> None:
    for host in ("127.0.0.1", ""):
        port = free_port(host)
        assert 0 < port < 65536
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
            s.listen()


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
