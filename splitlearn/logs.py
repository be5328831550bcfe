"""A quiet terminal: the libraries' log records and Python warnings (transformers' notices,
Ray's banners, DeepSpeed's accelerator note, deprecation warnings) go to the run's log file
(``<run>/log.txt``), not to the user's screen, so an error is the last and only line a user
needs. So does what the stage workers print (their warnings, DeepSpeed's accelerator note in
an offloaded stage's worker), which Ray forwards to the driver (:func:`route_worker_output`). Records before the run has a directory are held in memory and written when it has one
(a command without a run, such as ``validate``, drops them). ``-v`` shows everything.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

OWN = ("splitlearn", "cluster", "partitioners", "__main__")  # our loggers: on the screen
WORKER_LOGGER = "ray.workers"  # what Ray forwards from the workers' stdout and stderr
_WORKER_HANDLER = "splitlearn_worker_output"
LIBRARY_LOGGERS = ("transformers", "DeepSpeed", "deepspeed", "ray", "torch", "peft", "accelerate", "datasets")
HELD_RECORDS = 10_000  # at most this many library lines wait for the run directory
FORMAT = "%(levelname)s %(name)s: %(message)s"


class LibraryLog(logging.Handler):
    """Library records of this process: held until :meth:`attach` names the run's log file,
    then appended to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.held: list[str] = []
        self.path: Path | None = None
        self.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.path is None:
                if len(self.held) < HELD_RECORDS:
                    self.held.append(line)
                return
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except Exception:  # a log line must never fail the run
            self.handleError(record)

    def attach(self, path: Path) -> None:
        """From now on write to ``path``, starting with what was held."""
        self.path = path
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self.held)
        self.held = []


class _OwnOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN


_library_log: LibraryLog | None = None


def setup(verbose: bool) -> LibraryLog:
    """The screen shows splitlearn's own records (and everything with ``verbose``); every
    record also goes to the run's log. Python warnings become log records."""
    global _library_log
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_splitlearn", False)]:
        root.removeHandler(h)
    screen = logging.StreamHandler(sys.stderr)
    screen.setFormatter(logging.Formatter(FORMAT))
    for name in OWN:  # ours at WARNING unless asked (`train` shows its INFO lines itself)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        screen.addFilter(_OwnOnly())
    _library_log = LibraryLog()
    for h in (screen, _library_log):
        setattr(h, "_splitlearn", True)  # noqa: B010  (marks the handlers a later setup replaces)
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    quiet_library_handlers()
    return _library_log


def quiet_library_handlers() -> None:
    """Libraries that print through handlers of their own (transformers, DeepSpeed) send
    their records to the root logger instead, which routes them. Call again after importing
    such a library; a no-op before :func:`setup`."""
    if _library_log is None:
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, LibraryLog)]:
            lg.removeHandler(h)
        lg.propagate = True


def attach_run_log(run_dir: Path) -> None:
    """The run has a directory: library records go to ``<run_dir>/log.txt`` from now on."""
    if _library_log is not None:
        quiet_library_handlers()
        _library_log.attach(run_dir / "log.txt")


def route_worker_output() -> None:
    """What the workers print, which Ray forwards to this driver's terminal (``log_to_driver``),
    becomes records of the ``ray.workers`` logger instead: the run's log, the screen only
    with ``-v``. Call after ``ray.init``; a no-op before :func:`setup` or without Ray."""
    if _library_log is None or "ray" not in sys.modules:
        return
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")  # Ray's printer to the terminal
    dispatcher.remove_handler(_WORKER_HANDLER)
    dispatcher.add_handler(_WORKER_HANDLER, _log_worker_lines)


def _log_worker_lines(batch: dict[str, Any]) -> None:
    """One batch of a worker's output lines (Ray's record: ``lines``, ``is_err``, ``pid``,
    ``actor_name`` or ``task_name``) as log records, stderr at WARNING."""
    lg = logging.getLogger(WORKER_LOGGER)
    level = logging.WARNING if batch.get("is_err") else logging.INFO
    who = batch.get("actor_name") or batch.get("task_name") or "worker"
    for line in batch.get("lines", []):
        lg.log(level, "%s pid=%s: %s", who, batch.get("pid"), line)
