"""Ray Jobs: submit a run to a cluster through its dashboard, follow, list, read, stop.

A job uploads a working directory (``runtime_env.working_dir``, minus ``excludes``) to the
cluster; Ray unpacks it on every node that runs a process of the job and makes it that
process's working directory and the first entry of its ``sys.path``. The job's driver runs
on the head node by default; its stage actors run on the nodes of their devices.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cluster.errors import UserError
from cluster.remote import Address, auth_hint, first_line, is_auth_failure, probe
from cluster.tables import render_table

# Never uploaded: environments, caches, VCS data, build output and local run directories.
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "build",
    "dist",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(UserError):
    """A job request the cluster cannot serve: unknown job id, refused submission."""


@dataclass
class JobRequest:
    entrypoint: str  # a shell command run on the head, in the unpacked working directory
    working_dir: Path
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None

    def runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {"working_dir": str(self.working_dir), "excludes": list(self.excludes)}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


def job_client(addr: Address, verbose: bool = False):
    """A ``JobSubmissionClient`` for the dashboard at ``addr``, after a bounded reachability probe.
    Unless ``verbose``, Ray's INFO lines about packaging and uploading are not shown."""
    probe(addr)
    from ray.job_submission import JobSubmissionClient

    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
        # It warns that .git/.venv are excluded by default, which DEFAULT_EXCLUDES says anyway.
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(addr.url)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError (version)
        raise _error(e, f"the Ray dashboard at {addr.url}") from e


def _error(e: Exception, what: str) -> UserError:
    text = f"{type(e).__name__} {e}"
    if is_auth_failure(text):
        return JobError(f"{what} refused this machine: {auth_hint()}")
    return JobError(f"{what}: {first_line(e)}")


def submit(client, req: JobRequest) -> str:
    """Upload the working directory and start the job; its submission id."""
    try:
        return client.submit_job(
            entrypoint=req.entrypoint,
            runtime_env=req.runtime_env(),
            metadata=req.metadata or None,
            submission_id=req.submission_id,
        )
    except Exception as e:  # RuntimeError from the server, ValueError for a too-large upload
        raise _error(e, "job submission") from e


def status(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except Exception as e:
        raise _error(e, f"job {job_id}") from e


def info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except Exception as e:
        raise _error(e, f"job {job_id}") from e


def wait_status(client, job_id: str, until: tuple[str, ...], timeout_s: float, poll_s: float = 0.5) -> str:
    """Poll the job's status until it is one of ``until`` or terminal, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    st = status(client, job_id)
    while st not in until and st not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        st = status(client, job_id)
    return st


def follow(client, job_id: str, out: IO[str] | None = None, settle_s: float = 60.0) -> str:
    """Stream the job's logs to ``out`` until it ends; its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream broke: fall back to polling the status
        print(f"splitlearn: log stream ended early ({first_line(e)}); waiting for the job's status", file=sys.stderr)
    # The stream closes when the job ends; give the status a bounded moment to catch up.
    return wait_status(client, job_id, TERMINAL, settle_s)


def logs(client, job_id: str) -> str:
    try:
        return client.get_job_logs(job_id)
    except Exception as e:
        raise _error(e, f"job {job_id}") from e


def stop(client, job_id: str, timeout_s: float = 30.0) -> str:
    """Ask the job to stop and wait (bounded) for it to end; its status."""
    try:
        client.stop_job(job_id)
    except Exception as e:
        raise _error(e, f"job {job_id}") from e
    return wait_status(client, job_id, TERMINAL, timeout_s)


def list_jobs(client, drivers: bool = False) -> list[Any]:
    """Submitted jobs, oldest first (``drivers``: also scripts that attached with ray.init)."""
    try:
        jobs = client.list_jobs()
    except Exception as e:
        raise _error(e, "job list") from e
    if not drivers:
        jobs = [j for j in jobs if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def format_jobs(jobs: list[Any]) -> str:
    header = ("job", "status", "started", "ended", "entrypoint")
    rows: list[tuple[str, ...]] = []
    for j in jobs:
        entry = " ".join(j.entrypoint.split())
        entry = entry if len(entry) <= 70 else entry[:67] + "..."
        rows.append(
            (j.submission_id or j.job_id or "-", str(j.status.value), _when(j.start_time), _when(j.end_time), entry)
        )
    return render_table(header, rows) if jobs else "no jobs"
