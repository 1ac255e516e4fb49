"""Joining Ray: where the cluster is, whether Ray answers there, `ray.init` that a stop ends
cleanly; and the driver's step counter.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from cpe_ray.config import Config
from cpe_ray.errors import STOP_SIGNALS, ConfigError, CpeError, Stopped, quiet_stop_signals

# Set by Ray's job supervisor for a job's driver only (not by `ray start`, not in a shell).
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Between attempts to reach cluster.address, and the longest one attempt waits: a signal is
# answered between attempts, so Ctrl-C and SIGTERM stop the wait within about this long.
CONNECT_RETRY_S = 1.0


def ray_address(cfg: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where to run: `cluster.address`, else the job's cluster when this is a Ray job's driver
    (a driver that started a Ray of its own there could not run the job's actors: they
    inherit its runtime env, whose working dir lives in the outer cluster), else None: a
    fresh local Ray, whatever RAY_ADDRESS a user's shell holds."""
    if cfg.cluster.address:
        return cfg.cluster.address
    return "auto" if JOB_DRIVER_ENV in environ else None


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of host:port or ray://host:port; an IPv6 host is written [::1]:6379."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or (":" in host and not bracketed):
        raise ConfigError(f"cluster.address={address!r} is not host:port, ray://host:port or "
                          "auto (an IPv6 host in brackets: [::1]:6379)")
    return host.strip("[]"), int(port)


def _ray_answers(address: str, timeout_s: float) -> tuple[bool, str]:
    """(True, "") when Ray answers one gRPC call at `address` within `timeout_s` (its GCS for
    host:port, its client server for ray://), else (False, gRPC's status and detail)."""
    import grpc

    target = address.removeprefix("ray://")
    channel = grpc.insecure_channel(target)
    try:
        if address.startswith("ray://"):
            from ray.core.generated import ray_client_pb2 as client_pb
            from ray.core.generated import ray_client_pb2_grpc as client_grpc

            client_grpc.RayletDriverStub(channel).ClusterInfo(
                client_pb.ClusterInfoRequest(type=client_pb.ClusterInfoType.PING),
                timeout=timeout_s)
        else:
            from ray.core.generated import gcs_service_pb2 as gcs_pb
            from ray.core.generated import gcs_service_pb2_grpc as gcs_grpc

            gcs_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_pb.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code()
        # a cluster with token authentication refuses us, but it is Ray that refuses
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return True, ""
        return False, f"{code.name.lower()}: {' '.join(str(exc.details()).split())[:200]}"
    finally:
        channel.close()
    return True, ""


def _not_http2(reason: str) -> bool:
    """gRPC's words for a server that answered in something other than HTTP/2 (an HTTP/1
    server, the dashboard): no Ray will come up behind it, so there is no point waiting."""
    return "parsing HTTP/2" in reason or "http1" in reason.lower()


def wait_reachable(address: str, timeout_s: float) -> None:
    """Until Ray answers at `address` (host:port of its GCS, or ray://host:port of its client
    server), at most `timeout_s`; else one line. The port must accept a connection and Ray
    must answer a gRPC call: `ray.init` against anything else that listens there (an HTTP
    server, the dashboard's port, a silent socket) retries forever inside C++, where neither
    Ctrl-C nor SIGTERM reaches it. Each attempt takes at most CONNECT_RETRY_S, so a signal
    stops the wait within about that long."""
    if address == "auto":
        return
    host, port = _host_port(address)
    hint = "(cluster.connect_timeout_s sets the wait)"
    deadline = time.monotonic() + timeout_s
    opened = False  # the port accepted a connection at least once
    while True:
        began = time.monotonic()
        attempt_s = max(min(deadline - began, CONNECT_RETRY_S), 0.1)
        try:
            with socket.create_connection((host, port), timeout=attempt_s):
                listening, reason = True, ""
        except OSError as exc:
            listening, reason = False, (exc.strerror or str(exc) or type(exc).__name__).lower()
        opened = opened or listening
        if listening and os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS cluster's certificates are Ray's business: the port has to do
        if listening:
            answered, reason = _ray_answers(address, attempt_s)
            if answered:
                return
            if _not_http2(reason) or "unimplemented" in reason:
                raise CpeError(f"cluster.address={address}: something listens there but it "
                               f"is not Ray ({reason}); give the address of Ray's GCS "
                               "(`ray start --head` prints it, port 6379 by default) or "
                               "ray://host:10001 for Ray Client")
        left = deadline - time.monotonic()
        if left <= 0:
            if opened:
                raise CpeError(f"cluster.address={address}: the port is open but no Ray "
                               f"answered within {timeout_s:g} s ({reason}); give the address "
                               f"of Ray's GCS (port 6379 by default) or ray://host:10001 {hint}")
            raise CpeError(
                f"cluster.address={address}: no Ray cluster answered within {timeout_s:g} s "
                f"({reason}); start it (ray start --head) or fix the address {hint}")
        time.sleep(max(min(began + CONNECT_RETRY_S - time.monotonic(), left), 0))


def check_cluster(cfg: Config) -> None:
    """That Ray answers at `cluster.address` (`wait_reachable`); a local Ray has nothing to
    check."""
    address = ray_address(cfg)
    if address:
        wait_reachable(address, cfg.cluster.connect_timeout_s)


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray unless this process already has; True if it did.

    A stop (Ctrl-C, SIGTERM, SIGHUP) or a failure half-way through `ray.init` ends the Ray
    processes it had started, and the caller's signal handlers are back afterwards (`ray.init`
    sets a SIGTERM handler of its own that exits without any cleanup)."""
    import ray

    if ray.is_initialized():
        return False
    check_cluster(cfg)
    address = ray_address(cfg)
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    except BaseException as exc:
        quiet_stop_signals()
        ray.shutdown()
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:  # Ray's handler
            raise Stopped(f"stopped by {STOP_SIGNALS[signal.SIGTERM]}",
                          128 + signal.SIGTERM) from None
        if isinstance(exc, ConnectionError):
            detail = " ".join(str(exc).split())[:300]
            raise CpeError(f"cluster.address={address}: could not join the Ray cluster "
                           f"({detail})") from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return True


def progress_bar(total: int, start: int, desc: str, progress: bool) -> Any:
    """A step counter on a terminal; none when output goes to a file or `ray job logs`
    (carriage-return redraws would fill the log), where each step's line still prints."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc=desc,
                disable=None if progress else True, dynamic_ncols=True)
