"""Ray backend: each run is a Ray task with its CPU/GPU needs, on a cluster or a local Ray.

Inside the task the run still gets a process of its own (:func:`run_isolated`), so results
and peak memory are measured exactly as with the local backend. Tasks return their record;
the driver writes it to the store (only the driver touches the database). Progress events
come back through a small Ray queue (step events at most twice a second per run).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftbench.config import RunSpec
from peftbench.errors import UsageError
from peftbench.sweep.local import RunEventSink, available_cpus
from peftbench.sweep.plan import PlannedRun
from peftbench.sweep.worker import failed_record, run_isolated

_STEP_EVENT_INTERVAL = 0.5


def require_ray() -> Any:
    """The ``ray`` module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray, which is not installed: "
                         "pip install 'peftbench[ray]'") from None
    return ray


_CONNECT_TIMEOUT_S = 5.0
_RAY_ADDRESS_HELP = ("give the address that `ray start --head` prints (host:6379, or "
                     "ray://host:10001 for Ray Client), or `auto` on a node of the cluster")


def check_ray_address(address: str) -> None:
    """A UsageError unless ``address`` names a Ray cluster that answers within a few seconds.

    ``ray.init`` on an unreachable host:port retries for minutes; this probe makes the
    mistake a one-line error instead. ``auto`` and ``local`` are left to Ray, which
    answers those at once.
    """
    if address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    elif scheme != "ray":
        raise UsageError(f"--ray-address {address!r}: unknown scheme {scheme!r}; "
                         f"{_RAY_ADDRESS_HELP}.")
    host, colon, port_text = rest.rstrip("/").rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--ray-address {address!r} is not host:port; {_RAY_ADDRESS_HELP}.")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port_text)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {_CONNECT_TIMEOUT_S:g} s"
        raise UsageError(f"--ray-address {address!r}: no Ray cluster reachable at "
                         f"{host}:{port_text} ({reason}); {_RAY_ADDRESS_HELP}.") from None


def _task(spec_json: str, out_dir: str, threads: int, run_hash: str,
          queue: Any) -> dict[str, Any] | None:
    """The Ray task: one run in its own process, events forwarded to the driver."""
    last = 0.0

    def forward(event: dict[str, Any]) -> None:
        nonlocal last
        now = time.monotonic()
        if event["type"] == "step" and now - last < _STEP_EVENT_INTERVAL \
                and event["step"] != event["total"]:
            return
        last = now
        with contextlib.suppress(Exception):  # progress is best effort
            queue.put_nowait((run_hash, event))

    spec = RunSpec.model_validate_json(spec_json)
    return run_isolated(spec, Path(out_dir), forward, threads)


def _wants_gpu(spec: RunSpec, cluster_has_gpu: bool) -> bool:
    return spec.device == "cuda" or (spec.device == "auto" and cluster_has_gpu)


def _drain(queue: Any, on_event: RunEventSink) -> None:
    with contextlib.suppress(Exception):
        size = queue.qsize()
        if size:
            for run_hash, event in queue.get_nowait_batch(size):
                on_event(run_hash, event)


def run_ray(runs: Sequence[PlannedRun], on_event: RunEventSink, address: str | None = None,
            workers: int | None = None, cpus_per_run: int = 1
            ) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    """Yield ``(run, record)`` as Ray tasks finish.

    ``address``: a running cluster (``auto``, ``ray://host:10001`` ...); without it a local
    Ray instance with this machine's CPUs is started (and stopped at the end) unless Ray is
    already initialised in this process. ``workers`` caps the runs in flight (default:
    as many as the cluster's resources allow). Each task asks for ``cpus_per_run`` CPUs
    (its torch threads) and one GPU when its device is ``cuda``, or ``auto`` on a cluster
    with GPUs.
    """
    ray = require_ray()
    from ray.util.queue import Queue

    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            check_ray_address(address)
            try:
                ray.init(address=address, **options)
            except ConnectionError as exc:
                raise UsageError(f"--ray-address {address!r}: {exc}; {_RAY_ADDRESS_HELP}."
                                 ) from None
        else:
            ray.init(num_cpus=available_cpus(), include_dashboard=False, **options)
    in_flight: dict[Any, PlannedRun] = {}
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        queue = Queue(actor_options={"num_cpus": 0})
        task = ray.remote(max_retries=0)(_task)
        waiting = list(runs)
        limit = workers or len(waiting) or 1
        while waiting or in_flight:
            while waiting and len(in_flight) < limit:
                run = waiting.pop(0)
                ref = task.options(num_cpus=cpus_per_run,
                                   num_gpus=1 if _wants_gpu(run.spec, has_gpu) else 0,
                                   name=f"peftbench-run-{run.run_hash}").remote(
                    run.spec.model_dump_json(), str(run.out_dir), cpus_per_run, run.run_hash,
                    queue)
                in_flight[ref] = run
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            _drain(queue, on_event)
            for ref in done:
                run = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:  # worker or node died, OOM, ...
                    record = failed_record(run.spec, f"Ray task failed: {exc}")
                if record is not None:
                    yield run, record
        _drain(queue, on_event)
    finally:
        for ref in in_flight:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
