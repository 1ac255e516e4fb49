"""The sync group: a real 3-rank gloo group, adopted buckets, and failures that name.

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

from cpe_ray.weight_sync.codec import (
    Bucket,
    WeightSyncError,
    bucket_view,
    manifest_for,
    plan_manifest,
)
from cpe_ray.weight_sync.group import (
    GroupSpec,
    SyncGroup,
    SyncStats,
    adopt_buckets,
    free_port,
    receive_buckets,
    receive_into,
    send_buckets,
)
from tests.weight_sync.tensors import layout, random_tensor, same

FAIL_TIMEOUT_S = 2.0
SLACK_S = 3.0  # gloo and the TCPStore give up a little after the timeout they were given


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
        w[f"layer{i}.w"] = random_tensor((6 + i, 16), torch.float32, gen)  # 384-832 bytes
        w[f"layer{i}.b"] = random_tensor((16 + i,), torch.bfloat16, gen)  # 32-46 bytes
        if i == 3:
            w["head"] = random_tensor((3000,), torch.float32, gen)  # 12000 bytes: a bucket of its own
    w["ids"] = torch.randint(-(2**62), 2**62, (33,), dtype=torch.int64, generator=gen)
    w["scale"] = random_tensor((), torch.float32, gen)
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
                assert same(received[name], sent[name]), (round_, rank, name)
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
            assert same(p.detach(), before[spec.name])  # values kept
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
        assert all(same(params[n].detach(), sent[n]) for n in sent), round_
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
        assert all(same(e.detach(), p.detach()) for e, p in
                   zip(engine.parameters(), learner.parameters(), strict=True)), round_
    assert groups[0].staging == []  # nothing was packed


def test_gloo_sync_of_empty_buckets_and_empty_manifest() -> None:
    spec = _spec(2)
    groups = _join(spec)
    m = plan_manifest([("e", (0,), torch.float32), ("f", (2, 0), torch.bfloat16)], 64)
    assert layout(m) == {"e": (0, 0, 0), "f": (0, 0, 0)}  # both at 0: nothing to align
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
    assert list(got) == ["w", "b"] and all(same(got[n], weights[n]) for n in weights)


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
        assert all(same(got[rank - 1][n], weights[n]) for n in ("w0", "w1"))


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
