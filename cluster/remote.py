"""Reaching a running Ray cluster from outside it: addresses, a bounded reachability probe,
token authentication, and the list of its nodes (from the GCS or from the dashboard).

Two kinds of address name a cluster:

- the **GCS address** ``HOST:PORT`` (port 6379 by default): what ``ray start --address`` and
  ``ray.init(address=...)`` take; nodes join through it.
- the **dashboard address** ``http://HOST:PORT`` (port 8265 by default): the Jobs and State
  HTTP API; job clients only need this one.

Every call here is bounded: a TCP connect with a short timeout comes first, so an address
that does not answer fails in seconds instead of in Ray's own (long) retry loop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cluster.errors import PlacementError

GCS_DEFAULT_PORT = 6379
DASHBOARD_DEFAULT_PORT = 8265
PROBE_TIMEOUT_S = 3.0

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")


# -- addresses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A parsed cluster address. ``dashboard`` is true for ``http(s)://`` addresses."""

    host: str
    port: int
    dashboard: bool
    scheme: str = "http"

    @property
    def gcs(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.url if self.dashboard else self.gcs


def parse_address(text: str, *, dashboard: bool | None = None) -> Address:
    """``HOST:PORT`` (GCS) or ``http://HOST:PORT`` (dashboard). ``dashboard=True`` reads a bare
    ``HOST[:PORT]`` as a dashboard address (the job commands), ``False`` forbids URLs."""
    raw = text.strip()
    if not raw:
        raise PlacementError("empty cluster address; give HOST:PORT (GCS) or http://HOST:8265 (dashboard)")
    has_scheme = "://" in raw
    if has_scheme and dashboard is False:
        raise PlacementError(f"address '{text}': expected the GCS address HOST:PORT (e.g. 10.0.0.1:6379), not a URL")
    is_dash = has_scheme or bool(dashboard)
    parts = urlsplit(raw if has_scheme else f"//{raw}")
    if has_scheme and parts.scheme not in ("http", "https"):
        raise PlacementError(f"address '{text}': only http:// and https:// dashboard addresses are supported")
    try:
        port = parts.port
    except ValueError as e:
        raise PlacementError(f"address '{text}': bad port ({e})") from e
    host = parts.hostname
    if not host or (parts.path not in ("", "/")):
        raise PlacementError(f"address '{text}': expected HOST:PORT or http://HOST:PORT")
    if port is None:
        port = DASHBOARD_DEFAULT_PORT if is_dash else GCS_DEFAULT_PORT
    return Address(host=host, port=port, dashboard=is_dash, scheme=parts.scheme or "http")


def address_from(cli_value: str | None, env_names: tuple[str, ...], what: str) -> str:
    """The address given on the command line, else the first set environment variable."""
    if cli_value:
        return cli_value
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    raise PlacementError(f"no cluster address: pass --address {what} or set {' or '.join(env_names)}")


def probe(addr: Address, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connect to the address within ``timeout_s``, else one PlacementError line."""
    what = "Ray dashboard" if addr.dashboard else "Ray GCS"
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout_s):
            return
    except TimeoutError as e:
        reason = f"no answer within {timeout_s:g} s"
        err: Exception = e
    except OSError as e:  # refused, unreachable, unknown host
        reason = e.strerror or type(e).__name__
        err = e
    raise PlacementError(
        f"cannot reach the {what} at {addr} ({reason}); is the head running and port {addr.port} open?"
    ) from err


# -- token authentication ------------------------------------------------------------------
#
# Ray 2.5x+ turns token authentication on for a new cluster (`ray start --head`, or an
# embedded `ray.init()`) whenever a token is available on that machine (~/.ray/auth_token,
# written by the first embedded `ray.init()`), unless RAY_AUTH_MODE=disabled. Processes that
# reach such a cluster by an explicit address (a joining node, `ray.init(address=...)`, the
# job client) do NOT turn it on by themselves: Ray will not send a local token to an address
# unless RAY_AUTH_MODE=token is set. We keep that rule (it keeps a token from leaking to an
# address the user mistyped) and only turn the refusal into one line that says what to set.


def token_source(env: dict[str, str] | None = None) -> str | None:
    """Where Ray takes the token from, in its order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if env is None:
        env = dict(os.environ)
    if env.get(AUTH_TOKEN_ENV, "").strip():
        return AUTH_TOKEN_ENV
    path = env.get(AUTH_TOKEN_PATH_ENV) or str(DEFAULT_TOKEN_PATH)
    return path if Path(path).expanduser().is_file() else None


def auth_hint() -> str:
    """What to set when a cluster refuses this machine for want of its token."""
    where = f"{AUTH_TOKEN_ENV}, {AUTH_TOKEN_PATH_ENV} or ~/.ray/auth_token; `ray get-auth-token` on the head prints it"
    if os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
        return (
            f"the cluster requires token authentication: set {AUTH_MODE_ENV}=token and give the head's token ({where})"
        )
    source = token_source()
    if source is None:
        return f"{AUTH_MODE_ENV}=token but no token was found here: give the head's token ({where})"
    return f"the token here (from {source}) is not the cluster's: give the head's token ({where})"


def is_auth_failure(text: str) -> bool:
    return any(k in text for k in ("InvalidAuthToken", "Unauthenticated", "Authentication", "Unauthorized"))


# -- the nodes of a cluster ----------------------------------------------------------------

_NODES_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    try:
        print("SPLITLEARN-NODES " + json.dumps(ray.nodes(), default=str), flush=True)
    finally:
        ray.shutdown()
    """
)


def nodes_via_gcs(addr: Address, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """``ray.nodes()`` of the cluster at a GCS address, from a short-lived driver in a child
    process so the wait is bounded by ``timeout_s`` and this process never joins the cluster."""
    probe(addr)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        r = subprocess.run(
            [sys.executable, "-c", _NODES_SCRIPT, addr.gcs],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        raise PlacementError(
            f"the Ray cluster at {addr.gcs} did not answer within {timeout_s:g} s; {auth_hint()}"
        ) from e
    for line in r.stdout.splitlines():
        if line.startswith("SPLITLEARN-NODES "):
            return json.loads(line.split(" ", 1)[1])
    text = r.stderr + r.stdout
    if is_auth_failure(text):
        raise PlacementError(f"the Ray cluster at {addr.gcs} refused this machine: {auth_hint()}")
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), f"exit code {r.returncode}")
    raise PlacementError(f"cannot attach to the Ray cluster at {addr.gcs}: {last}")


def nodes_via_dashboard(addr: Address, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The alive nodes from the dashboard's State API, in the shape of ``ray.nodes()``."""
    probe(addr)
    from ray.util.state import list_nodes

    try:
        states = list_nodes(
            address=addr.url, detail=True, timeout=int(max(1, timeout_s)), raise_on_missing_output=False
        )
    except Exception as e:  # AuthenticationError, ConnectionError, RayStateApiException
        if is_auth_failure(f"{type(e).__name__} {e}"):
            raise PlacementError(f"the Ray dashboard at {addr.url} refused this machine: {auth_hint()}") from e
        raise PlacementError(f"the Ray dashboard at {addr.url} did not list its nodes: {first_line(e)}") from e
    return [
        {
            "NodeID": s.node_id,
            "Alive": s.state == "ALIVE",
            "NodeManagerAddress": s.node_ip,
            "NodeName": s.node_name,
            "Resources": dict(s.resources_total or {}),
            "Labels": dict(s.labels or {}),
            "IsHead": bool(s.is_head_node),
        }
        for s in states
    ]


def cluster_nodes(addr: Address, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The nodes of the cluster at ``addr``, through the dashboard or the GCS as it names."""
    return nodes_via_dashboard(addr, timeout_s) if addr.dashboard else nodes_via_gcs(addr, timeout_s)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
