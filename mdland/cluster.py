"""The Ray every stage runs on: `init_ray` joins the cluster this process is given (RAY_ADDRESS, or one `ray start`
began on this machine) or starts a local one, in one way for every stage, so a local Ray hosts Serve as a cluster
built from `cluster/Dockerfile` does.

Serve's HTTP ingress is HAProxy (`RAY_SERVE_ENABLE_HA_PROXY`, Ray 2.56 and later): one C process per node that
forwards each request straight to a replica's own HTTP server, instead of a Python proxy actor per node that relays
it to the replica as a Ray call. For the detector's small requests the relay is much of the cost: on 2 CPU cores,
1.8x the requests/s and half the single-request latency (`mdland bench serve`, README). Serve reads the setting
where the cluster's processes start, so it is set before a local Ray starts (here) or on every node (the image).
`RAY_SERVE_ENABLE_HA_PROXY=0` in the environment keeps the proxy actors.
"""

import os
import socket
import sys

from mdland.log import get_logger

log = get_logger(__name__)


def free_port() -> int:
    """A TCP port nothing listens on, on any interface (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster `ray.init(address)` would join (RAY_ADDRESS, or one `ray start` began on this machine), or
    None where it would start a local one."""
    from ray._private.services import canonicalize_bootstrap_address

    address = address or os.environ.get("RAY_ADDRESS")
    if address and "://" in address:  # ray://host:10001: Ray Client
        return address
    return canonicalize_bootstrap_address(address)


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` unless Ray is up in this process already, with Serve's HAProxy ingress for a local Ray.
    A replica that stops is drained for 2 s, not Ray's 30: HAProxy on its node, not an outside load balancer, has to
    stop sending it requests, and retries any it refuses on another replica. `num_cpus` / `num_gpus` size a local
    Ray only: a cluster this process joins has its own (and Ray refuses them)."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(kwargs.get("address"))
    if address is not None:
        log.info("joining the Ray cluster at %s", address)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_cpus", "num_gpus")}
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # HAProxy's read-only stats page and Prometheus exporter would listen on fixed ports of every interface, so a
    # second local Ray on the machine (a `mdland serve` beside the demo) could not start its HAProxy.
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ[key] = str(free_port())
    ray.init(**kwargs)
    if not sys.stdout.isatty():
        # Ray Data run inside an actor (a training run's data) would draw terminal progress bars through the driver
        # into a log file: hundreds of cursor-up codes and blank lines. Without Ray's tqdm they are logged as lines.
        ray.data.DataContext.get_current().use_ray_tqdm = False


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local one), rather than joined a cluster."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # the node this driver started, or joined
    return node is not None and node.is_head()


def check_gpus(needed: int, field: str) -> None:
    """Refuse work that asks for `needed` GPUs when the Ray this process started has fewer: it can never get them,
    and Ray Train and Ray Data would wait for them for ever. A cluster this process joined may add GPU nodes (an
    autoscaler), so there it only warns."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if have >= needed:
        return
    message = f"{field}: the run needs {needed} GPU(s) and the Ray cluster has {have:g}"
    if ray_started_here():
        raise ValueError(f"{message} (a local Ray on this machine); set use_gpu=false to run on the CPU")
    log.warning("%s: waiting for the cluster to add them", message)
