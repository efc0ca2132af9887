"""Logging of the launcher, the agents and every managed process (``dragon -l``).

Records go to one file per node under the runtime's log directory,
``<base>/<runtime id>/node-<index>.log``, where the base is ``$DRAGON_LOG_DIR`` (made
absolute by the launcher for every process) or ``$TMPDIR/dragon-rs-logs-<uid>``. Python records (the
``dragon`` logger and its children) and the Rust crates' records (``dragon.rs.<crate>...``,
written by the native module's sink, see ``dragon_runtime::logging``) share the file and
the line format::

    2026-12-05T16:50:01.123Z WARNING node=0 pid=1234 dragon.native.process: message

Levels come from ``dragon -l`` in DragonHPC's forms: ``-l LEVEL`` (NONE, DEBUG, INFO,
WARNING, ERROR, CRITICAL) sets the file level; ``-l dragon_file=LEVEL`` and
``-l actor_file=LEVEL`` (DragonHPC's combined and per-actor files: both are the per-node
file here, the more verbose wins) and ``-l stderr=LEVEL`` set one device. By default
warnings and errors go to the file (created only when something is written) and nothing to
stderr; the launcher prints the directory when a run fails and a log file exists.

Importing ``logging`` costs milliseconds, which every started process would pay; so this
module imports it only when a record is actually written (``warning()`` etc. check the level
first) or a caller asks for the ``dragon`` logger.
"""

from __future__ import annotations

import os
import sys
import time

LEVEL_ENV = "DRAGON_LOG_LEVEL"
DIR_ENV = "DRAGON_LOG_DIR"
NONE = 60  # above CRITICAL: nothing
LEVELS = {"NONE": NONE, "CRITICAL": 50, "ERROR": 40, "WARNING": 30, "INFO": 20, "DEBUG": 10}
DEVICES = ("stderr", "dragon_file", "actor_file")
DEFAULT_FILE_LEVEL = LEVELS["WARNING"]

_file: str | None = None  # this process's node log file, once configured
_file_level = NONE
_stderr_level = NONE
_node = 0
_handlers: list = []  # the handlers this module put on the "dragon" logger


def parse_levels(values: list[str]) -> tuple[int, int]:
    """(file level, stderr level) from ``-l`` values (each may hold several, comma-separated).
    Raises ValueError naming a bad level or device."""
    file_level, stderr_level = DEFAULT_FILE_LEVEL, NONE
    file_given: list[int] = []
    for value in values:
        for item in filter(None, (s.strip() for s in value.split(","))):
            device, _, name = item.rpartition("=")
            level = LEVELS.get(name.upper())
            if level is None:
                raise ValueError(f"bad log level {name!r} (one of {', '.join(LEVELS)})")
            if device and device not in DEVICES:
                raise ValueError(f"bad log device {device!r} (one of {', '.join(DEVICES)})")
            if device == "stderr":
                stderr_level = level
            else:
                file_given.append(level)
    if file_given:
        file_level = min(file_given)
    return file_level, stderr_level


def log_base() -> str:
    """Where runtimes keep their log directories: ``$DRAGON_LOG_DIR``, else
    ``$TMPDIR/dragon-rs-logs-<uid>`` (one per user, made 0700, so no other user can place
    files or links in it)."""
    d = os.environ.get(DIR_ENV)
    if d:
        return d
    # tempfile.gettempdir() without importing tempfile (~5 ms with shutil and random).
    tmp = next((os.environ[v] for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)), "/tmp")
    return os.path.join(tmp, f"dragon-rs-logs-{os.getuid()}")


def log_dir(runtime: int) -> str:
    """The runtime's log directory: ``<log_base()>/<runtime id>``."""
    return os.path.join(log_base(), f"{runtime:016x}")


def node_file(runtime: int, node: int) -> str:
    """The log file of node ``node``."""
    return os.path.join(log_dir(runtime), f"node-{node}.log")


def written_files(runtime: int) -> list[str]:
    """The runtime's log files that hold something (what the launcher names on failure)."""
    d = log_dir(runtime)
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [os.path.join(d, n) for n in names if os.path.getsize(os.path.join(d, n)) > 0]


def configure(runtime: int, node: int) -> None:
    """Points this process's logging (Python and Rust) at node ``node``'s file of
    ``runtime``, with the levels of ``$DRAGON_LOG_LEVEL`` (a bad value: the defaults)."""
    global _file, _file_level, _stderr_level, _node
    try:
        file_level, stderr_level = parse_levels([os.environ.get(LEVEL_ENV, "")])
    except ValueError:
        file_level, stderr_level = DEFAULT_FILE_LEVEL, NONE
    _file, _file_level, _stderr_level, _node = node_file(runtime, node), file_level, stderr_level, node
    from dragon import _native

    _native.log_configure(_file, file_level, stderr_level, node)
    if _handlers or "logging" in sys.modules:
        _install_handlers()


def enabled(level: int) -> bool:
    """Whether a record at ``level`` would be written anywhere by this module's handlers."""
    return level >= _file_level or level >= _stderr_level


class _Formatter:
    """The shared line format (UTC timestamps, node and pid), built on logging.Formatter
    when first needed."""

    @staticmethod
    def make():
        import logging

        node = _node

        class Formatter(logging.Formatter):
            def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
                t = time.gmtime(record.created)
                return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

        return Formatter(f"%(asctime)s %(levelname)s node={node} pid=%(process)d %(name)s: %(message)s")


def _install_handlers():
    import logging

    logger = logging.getLogger("dragon")
    for h in _handlers:
        logger.removeHandler(h)
        h.close()
    _handlers.clear()
    fmt = _Formatter.make()
    if _file is not None and _file_level < NONE:

        class NodeFileHandler(logging.FileHandler):
            def _open(self):
                os.makedirs(os.path.dirname(self.baseFilename), mode=0o700, exist_ok=True)
                fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                return open(fd, "a", encoding=self.encoding)

            def emit(self, record):
                # Logging never takes the runtime down: an unwritable log directory loses
                # the record (FileHandler opens the file outside its own error handling).
                try:
                    super().emit(record)
                except OSError:
                    pass

        fh = NodeFileHandler(_file, mode="a", delay=True)
        fh.setLevel(_file_level)
        _handlers.append(fh)
    if _stderr_level < NONE:
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(_stderr_level)
        _handlers.append(sh)
    for h in _handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    if _file is not None:
        # Configured by the runtime: records stay in its files, never on the user's root logger.
        logger.propagate = False
        logger.setLevel(min(_file_level, _stderr_level))
    return logger


def logger(name: str = "dragon"):
    """The ``logging`` logger ``name`` (under ``dragon``), with the runtime's handlers set up."""
    import logging

    if _file is None:
        _configure_from_env()
    if not _handlers and _file is not None:
        _install_handlers()
    return logging.getLogger(name)


def _configure_from_env() -> bool:
    """Configures a process of a runtime (``DRAGON_RUNTIME`` set) that has not attached to
    it yet; False outside a runtime."""
    parts = os.environ.get("DRAGON_RUNTIME", "").split(":")
    try:
        configure(int(parts[1], 16), int(parts[2]))
    except (IndexError, ValueError):
        return False
    return True


def log(level: int, name: str, msg: str, *args) -> None:
    """Logs ``msg % args`` at ``level`` on logger ``name`` if that level is written anywhere
    (without importing ``logging`` otherwise). Outside a runtime, WARNING and above go to
    Python's ``logging`` as usual (its last-resort handler prints them)."""
    if _file is None and not _configure_from_env():
        if level < DEFAULT_FILE_LEVEL:
            return
    elif not enabled(level):
        return
    logger(name).log(level, msg, *args)


def debug(name: str, msg: str, *args) -> None:
    """``log`` at DEBUG."""
    log(10, name, msg, *args)


def info(name: str, msg: str, *args) -> None:
    """``log`` at INFO."""
    log(20, name, msg, *args)


def warning(name: str, msg: str, *args) -> None:
    """``log`` at WARNING."""
    log(30, name, msg, *args)


def error(name: str, msg: str, *args) -> None:
    """``log`` at ERROR."""
    log(40, name, msg, *args)
