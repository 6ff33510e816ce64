"""Joining a Ray cluster (`--ray auto|ADDRESS|local`), for batches and for data-parallel
calibration. Ray is an optional extra: qconvert[ray]."""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

from qconvert.errors import UsageError


@contextlib.contextmanager
def ray_cluster(address: str) -> Iterator:
    """The ray module, connected to the cluster at `address` ('auto': the one this machine is
    in; 'local': a new one on this machine, stopped after); disconnected after. Ray's driver
    prints its raylet's messages on stdout, which is --json's: they go to stderr meanwhile; its
    SIGINT/SIGTERM handlers are replaced by the ones before (Ray's exit on SIGTERM would skip
    the caller's clean-up)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'qconvert[ray]'") from None
    with contextlib.redirect_stdout(sys.stderr):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({' '.join(str(e).split())[:200]})") \
                from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        try:
            yield ray
        finally:
            ray.shutdown()


def node_resources(ray) -> tuple[int, int, int]:
    """(the most CPUs, the most memory in bytes) of any live node, and the number of them."""
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return (max((int(n.get("CPU", 0)) for n in alive), default=0),
            int(max((n.get("memory", 0) for n in alive), default=0)), len(alive))
