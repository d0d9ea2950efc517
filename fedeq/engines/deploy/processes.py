"""Start and stop the deployment's processes by pid.

Flower's SuperLink and SuperNodes spawn helpers of their own (``flower-superexec``, then one
``flwr-serverapp`` / ``flwr-clientapp`` process per task), some in a new session. :class:`ProcessRegistry`
therefore stops a process *tree*: it snapshots the descendants of the pid it started (with psutil), sends
SIGTERM to the root and the descendants, waits, and sends SIGKILL to whatever is left. Nothing is looked up
by name. :func:`signals_raise` turns SIGINT/SIGTERM/SIGHUP into an exception so ``finally`` blocks (and the
registry's context manager) run on Ctrl-C, on ``kill`` and on failure alike.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

__all__ = [
    "Interrupted",
    "ManagedProcess",
    "ProcessRegistry",
    "descendants",
    "kill_tree",
    "pid_alive",
    "signals_raise",
]


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when the launcher receives SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`.

    SIGINT is handled even where it was ignored (a launcher started in the background by a script).
    """
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first); empty when ``pid`` is gone."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [child.pid for child in children if child.pid != pid]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid`` and every descendant of it at once; return the pids signalled."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        _signal(member, sig)
    return tree


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        psutil.Process(pid).send_signal(sig)


@dataclass
class ManagedProcess:
    """A process started by the registry: its name, argv, log file and ``Popen`` handle."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class ProcessRegistry:
    """Processes started for one deployment; stops them (and their descendants) by pid.

    Use it as a context manager: leaving the block stops everything, in reverse start order.
    The pids are also written to ``<log_dir>/pids.json`` while processes run.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> ProcessRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def get(self, name: str) -> ManagedProcess:
        """The running or finished process called ``name``."""
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        capture: bool = True,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, output to ``<log_dir>/<name>.log`` (``capture=False``: this
        terminal)."""
        if any(p.name == name and p.alive() for p in self.processes):
            raise ValueError(f"a process called {name!r} is already running")
        log_path = self.log_dir / f"{name}.log"
        log: IO[bytes] | None = None
        if capture:
            log = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
            self._logs.append(log)
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if capture else None,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
        proc = ManagedProcess(name=name, argv=list(argv), log_path=log_path, popen=popen)
        self.processes.append(proc)
        self._write_pids()
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name`` and all its descendants at once (simulates a crash)."""
        proc = self.get(name)
        kill_tree(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    def stop(self, proc: ManagedProcess, timeout: float = 10.0) -> None:
        """SIGTERM the process tree of ``proc``, then SIGKILL what is left after ``timeout`` seconds."""
        self._stop_group([proc], timeout)

    @staticmethod
    def _stop_group(procs: Sequence[ManagedProcess], timeout: float) -> None:
        """Stop the trees of ``procs`` together: SIGTERM all, wait, SIGKILL the leftovers (all by pid)."""
        trees = {p.pid: descendants(p.pid) for p in procs}
        for p in procs:
            if p.alive():
                _signal(p.pid, signal.SIGTERM)
            for pid in trees[p.pid]:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            for p in procs:
                if p.alive():  # helpers started meanwhile
                    trees[p.pid] = list(dict.fromkeys(trees[p.pid] + descendants(p.pid)))
            left = [pid for p in procs for pid in trees[p.pid] if pid_alive(pid)]
            if (not left and not any(p.alive() for p in procs)) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for p in procs:
            if p.alive():
                _signal(p.pid, signal.SIGKILL)
        for pid in left:
            _signal(pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every process started here, all trees at once, and close the log files.

        SIGINT, SIGTERM and SIGHUP are held back meanwhile, so a second Ctrl-C cannot cut the cleanup short.
        """
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        can_hold = hasattr(signal, "pthread_sigmask") and _in_main_thread()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if can_hold else None
        try:
            self._stop_all(timeout)
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _stop_all(self, timeout: float) -> None:
        try:
            self._stop_group(list(reversed(self.processes)), timeout)
        except Exception as err:  # noqa: BLE001 - fall back to one by one
            print(f"fedeq deploy: stopping together failed ({err}); stopping one by one", file=sys.stderr)
            for proc in reversed(self.processes):
                with contextlib.suppress(Exception):
                    self.stop(proc, timeout=timeout)
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()
        self._write_pids()

    def running(self) -> list[ManagedProcess]:
        """Processes that are still alive."""
        return [p for p in self.processes if p.alive()]

    def _write_pids(self) -> None:
        data = [
            {"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path)}
            for p in self.processes
            if p.alive()
        ]
        with contextlib.suppress(OSError):
            (self.log_dir / "pids.json").write_text(json.dumps(data, indent=2))
