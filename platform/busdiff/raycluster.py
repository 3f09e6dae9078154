"""One way to reach Ray: join the cluster under ``ray job submit``, else start an embedded local one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a worker imports this module for know_own_cluster: keep that light
    from busdiff.config import RayConfig

#: Ray 2.60 turns token authentication on for a head started on a machine with ~/.ray/auth_token (any
#: local ray.init() writes one); a client without RAY_AUTH_MODE=token then fails with a long traceback.
AUTH_HINT = (
    "the Ray cluster requires token authentication and this process has no token: set "
    "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token, or RAY_AUTH_TOKEN) for `ray start "
    "--head`, `ray job submit` and busdiff alike (README: \"`ray job submit` on this machine\")"
)


class ClusterError(ValueError):
    """Ray could not be joined for a reason the user can fix; the message says how."""


def _auth_failure(e: BaseException) -> bool:
    """Whether ``e`` or an exception it came from is Ray's AuthenticationError."""
    seen: BaseException | None = e
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: Lines Ray prints on runs where nothing is wrong; connect() drops them from this process's stderr.
#: Ray core logs one for every restartable actor whose constructor takes an object-store reference
#: ("If the arguments in the object store go out of scope or are lost, the actor restart will fail",
#: ray-project/ray#53727). Ray Data's actor pools (MapWorker, e.g. generation's Text2Img and Img2Img) and Ray
#: Train's PreemptionWatcher pass such references on every run and hold them as long as the actors live,
#: so their restarts do work (ray-project/ray#57733): a false alarm for these classes. The same line about
#: any other actor still shows. No Ray setting hides just this line: it is the C++ core's ERROR log, written
#: to fd 2; RAY_BACKEND_LOG_LEVEL=fatal would hide every C++ error of every Ray process, and
#: RAY_LOG_TO_STDERR=0 leaves it (tried, Ray 2.60).
RAY_NOISE = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: '(MapWorker\(.*\)|PreemptionWatcher)' and ID: '\w+' "
    r"has constructor arguments in the object store and max_restarts > 0"
)

#: The filter process of _drop_from_stderr: stdin to stdout, dropping the lines that match argv[1]. A
#: partial line is held until its newline, or passed on after 0.2 s without more (a progress bar).
_FILTER = """
import re, select, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # `ray job stop` signals the driver's whole
    signal.signal(s, signal.SIG_IGN)  # tree: outlive the driver and pass on its last lines, end at EOF
noise, out, buf = re.compile(sys.argv[1].encode()), sys.stdout.buffer, b""
def put(data):
    try:
        out.write(data); out.flush()
    except OSError:  # the reader went away (`busdiff ... 2>&1 | head`): keep draining
        pass
while True:
    if buf and not select.select([0], [], [], 0.2)[0]:
        put(buf); buf = b""
    chunk = sys.stdin.buffer.raw.read(1 << 16)
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\\n")
    put(b"".join(line + b"\\n" for line in lines if not noise.search(line)))
put(buf)
"""
_filter: subprocess.Popen | None = None


def _drop_from_stderr(noise: re.Pattern[str]) -> None:
    """Route this process's stderr (fd 2: Python's, and the log lines of Ray's C++ core, which no logging
    filter sees) through a filter process that drops the lines ``noise`` matches and passes the rest on as
    they come. A process, not a thread, so nothing is lost when this one dies abruptly (the filter drains
    the pipe to its end); in a session of its own, so Ctrl-C stops only this process. Ray's own processes,
    started before, keep the original stderr. BUSDIFF_RAY_NOISE=show turns it off."""
    global _filter
    if _filter is not None or os.environ.get("BUSDIFF_RAY_NOISE") == "show":
        return
    sys.stderr.flush()
    read, write = os.pipe()
    command = [sys.executable, "-c", _FILTER, noise.pattern]
    _filter = subprocess.Popen(command, stdin=read, stdout=2, start_new_session=True)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)


def know_own_cluster() -> None:
    """Every worker's setup hook (connect passes it): RAY_ADDRESS names the worker's own cluster.

    Ray Train's PlacementGroupCleaner (a detached actor) asks the state API about the training controller
    with no address; without RAY_ADDRESS that guesses from the Ray processes on the host, and where several
    clusters run on one machine (an embedded local one beside a `ray start` head, or other users') it
    fails ("Found multiple active Ray instances", a traceback) and stops watching, so a crashed run's
    placement group would not be removed."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def connect(cfg: RayConfig) -> dict[str, Any]:
    """Connect to Ray and return the cluster's resources.

    With ``cfg.address`` unset, plain ``ray.init()`` joins the cluster when RAY_ADDRESS is set (as it
    is under ``ray job submit``) and starts a local cluster otherwise; only a local start takes the
    resource caps from ``cfg`` (Ray refuses them when joining).
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    joining = cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    kwargs: dict[str, Any] = {
        "address": cfg.address,
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": f"{__name__}.know_own_cluster"},
    }
    if not joining:
        kwargs.update(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.include_dashboard,
        )
    try:
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    except Exception as e:
        if _auth_failure(e):
            raise ClusterError(AUTH_HINT) from None
        raise
    _drop_from_stderr(RAY_NOISE)
    # A failing stage UDF re-raises its own exception in the driver (else Ray Data's UserCodeException,
    # "UDF failed to process a data block", hides e.g. the OSError of an unwritable generate.out)
    from ray.data import DataContext

    DataContext.get_current().raise_original_map_exception = True
    return ray.cluster_resources()
