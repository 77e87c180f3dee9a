"""Run untrusted Python in an isolated, resource-limited process (the host side of `_jail.py`).

A `Sandbox` owns one jail fork server. Each execution forks from it (no interpreter start-up per sample) into
its own mount, PID, network, IPC and UTS namespaces, a read-only throwaway root, an unprivileged uid of its
own, an empty environment and rlimits; the wall-clock limit is enforced from here by killing the
execution's process group, and the PID namespace takes every leftover process with it.

Where namespaces are not allowed (not root, or a container that forbids unshare), `isolation="auto"` still
runs with a session of its own, rlimits, an empty environment, a private directory removed afterwards and,
as root, its own uid, but the program can then reach the network and read the host's files: a warning
says so once. `isolation="namespaces"` refuses to run without them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.verifiers import _jail

log = logging.getLogger(__name__)

Isolation = Literal["auto", "namespaces", "process"]


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it)."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10  # per process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    processes: int = 32  # processes and threads of the sandbox's uid (RLIMIT_NPROC)
    file_size_mb: int = 16  # largest file written (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    workdir_mb: int = 64  # the writable working directory (tmpfs)
    output_bytes: int = 64 << 10  # stdout/stderr kept per stream; the rest is counted and dropped
    load_seconds: float = 5.0  # wall time to load the program before the tests
    test_seconds: float = 5.0  # wall time per test (one check, one assert, one stdin input)

    def wall_seconds(self, n_tests: int) -> float:
        """The outside limit for a whole execution: the inside budgets plus start-up slack."""
        return self.load_seconds + self.test_seconds * max(1, n_tests) + 5.0


_warned_no_namespaces = False


class Sandbox:
    """A jail fork server; `run_function` / `run_stdio` are thread-safe and may run concurrently."""

    def __init__(self, isolation: Isolation = "auto", python: str = sys.executable):
        self.isolation, self.python = isolation, python
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._runtime: str | None = None

    # -------------------------------------------------------------- server lifecycle

    def _ensure_server(self) -> str:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._runtime
            if self._proc is not None:
                log.warning("sandbox: jail server exited (%s); restarting it", self._proc.returncode)
                self._stop()
            self._runtime = tempfile.mkdtemp(prefix="posttrain-sandbox-")
            jail = Path(_jail.__file__).resolve()
            allow = {"process": "off", "auto": "try", "namespaces": "require"}[self.isolation]
            log_path = os.path.join(self._runtime, "jail.log")  # a file, not a pipe nobody drains
            with open(log_path, "wb") as log_file:
                self._proc = subprocess.Popen(
                    [self.python, "-I", "-S", "-B", str(jail), self._runtime, str(os.getpid()), allow],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, env={}, start_new_session=True,
                )
            line = self._proc.stdout.readline()
            if line.strip() != b"ready":
                self._proc.wait(timeout=5)
                err = Path(log_path).read_text(errors="replace")[-2000:]
                self._stop()
                raise SandboxError(f"sandbox: the jail server did not start: {err or line!r}")
            return self._runtime

    def _stop(self) -> None:
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
        if self._runtime:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- executions

    def run_function(self, program: str, entry: str, tests: list[dict[str, str]], *, context: str = "",
                     fixtures: str = "", limits: Limits = Limits()) -> dict[str, Any]:
        """Load `program` in the sandbox and run each test {name, code} in the checker with `entry` as `candidate`.

        `context` is trusted code run in the checker first (HumanEval's prompt, whose helpers the tests call);
        `fixtures` is trusted code run in the candidate after the program (MBPP's test_setup_code, which builds
        arguments from the program's own classes).
        """
        request = {"mode": "function", "program": program, "fixtures": fixtures}
        tests_part = {"entry": entry, "tests": tests, "context": context,
                      "load_seconds": limits.load_seconds, "test_seconds": limits.test_seconds}
        return self._execute(request, tests_part, limits, len(tests))

    def run_stdio(self, program: str, inputs: list[str], *, limits: Limits = Limits()) -> dict[str, Any]:
        """Run `program` as a script once per input (fresh process each); stdout/stderr and exit state per run."""
        request = {"mode": "stdio", "program": program}
        part = {"inputs": inputs, "test_seconds": limits.test_seconds}
        return self._execute(request, part, limits, len(inputs))

    def _execute(self, request: dict, second: dict, limits: Limits, n_tests: int) -> dict[str, Any]:
        start = time.monotonic()
        deadline = start + limits.wall_seconds(n_tests)
        request = dict(request, limits=asdict(limits))
        for attempt in range(2):  # a jail server that died between executions is restarted once
            runtime = self._ensure_server()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = None
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(os.path.join(runtime, "jail.sock"))
                pid = _jail.recv(sock)["pid"]
                _jail.send(sock, request)
                for part in (None, second):
                    if part is not None:
                        _jail.send(sock, part)
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    reply = _jail.recv(sock)
                    if "failure" in reply:
                        raise SandboxError(f"sandbox: {reply['failure']}\n{reply.get('trace', '')}")
                result = reply["result"]
                break
            except socket.timeout:
                result = {"wall_timeout": True}  # killed below; the PID namespace takes the rest
                break
            except (ConnectionError, FileNotFoundError, EOFError, ValueError) as exc:
                if pid is None and attempt == 0:
                    continue
                result = {"sandbox_died": f"{type(exc).__name__}: {exc}"}
                break
            finally:
                sock.close()
                if pid is not None:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        result["wall_s"] = round(time.monotonic() - start, 4)
        self._check_isolation(result)
        return result

    def _check_isolation(self, result: dict[str, Any]) -> None:
        global _warned_no_namespaces
        iso = result.get("isolation")
        if not iso or iso["namespaces"]:
            return
        if self.isolation == "auto" and not _warned_no_namespaces:
            _warned_no_namespaces = True
            log.warning("sandbox: namespaces unavailable (%s): candidate programs run with rlimits, an empty "
                        "environment and a private directory, but CAN reach the network and read host files%s",
                        iso["why_not"], "" if iso["uid_drop"] else ", and run as this process's user (no other "
                        "uid: not root, or the Python install is not readable by other users)")
