"""Hostile candidate programs for the code sandbox, each with a check that the host was not affected.

Every attack defines `solve(x)` whose test (`assert candidate(3) == 9`) it does not legitimately pass, so
the only way to "pass" is to escape or fool the checker. `python tests/sandbox_attacks.py` prints the
containment table (attack -> outcome) used in the issue's closing note.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SECRET = "posttrain-host-secret-7f3a"
TEST = [{"name": "square", "code": "assert candidate(3) == 9"}]
GOOD = "def solve(x):\n    return x * x\n"


@dataclass
class Host:
    """What the host sets up before an attack: files it owns, a listening socket, a secret in its environment."""

    dir: Path
    keep: Path  # a host file the attack tries to delete or overwrite
    listener: socket.socket  # on loopback: no connection may arrive

    @classmethod
    def make(cls, dir: Path) -> Host:
        os.environ["POSTTRAIN_SECRET"] = SECRET
        keep = dir / "keep.txt"
        keep.write_text("original")
        keep.chmod(0o666)
        dir.chmod(0o777)  # even a world-writable host directory must stay untouched
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.2)
        return cls(dir, keep, listener)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def no_connection(self) -> bool:
        try:
            self.listener.accept()[0].close()
            return False
        except (socket.timeout, BlockingIOError):
            return True


@dataclass
class Attack:
    name: str
    program: str  # formatted with {dir}, {keep}, {port}, {secret}, {jail}
    host_ok: Callable[[Host, "object"], bool] = lambda host, result: True
    expect: str = ""  # the status we expect the single test to end with ("" = any failure)


def sandbox_procs(uid_floor: int = 1_000_000) -> list[int]:
    """Host-side view: pids of processes running under a sandbox uid."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as fh:
                    uid = next(int(line.split()[1]) for line in fh if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if uid >= uid_floor:
                pids.append(int(entry))
    return pids


def _body(code: str) -> str:
    return textwrap.dedent(code).strip("\n") + "\n"


ATTACKS = [
    Attack("write outside the working directory", _body("""
        for path in ["{dir}/pwned.txt", "/etc/pwned", "/usr/pwned", "/tmp/../pwned"]:
            try:
                open(path, "w").write("x")
            except OSError as e:
                print(path, type(e).__name__)
        def solve(x):
            return 0
        """), lambda h, r: not (h.dir / "pwned.txt").exists() and not Path("/etc/pwned").exists()),
    Attack("delete and overwrite host files", _body("""
        import os, shutil
        for op in (lambda: os.remove("{keep}"), lambda: open("{keep}", "w").write("gone"),
                   lambda: shutil.rmtree("{dir}"), lambda: os.remove("/usr/bin/env")):
            try:
                op()
            except OSError as e:
                print(type(e).__name__)
        def solve(x):
            return 0
        """), lambda h, r: h.keep.read_text() == "original" and Path("/usr/bin/env").exists()),
    Attack("read environment variables", _body("""
        import os
        print(dict(os.environ))
        def solve(x):
            return os.environ.get("POSTTRAIN_SECRET", "none")
        """), lambda h, r: SECRET not in r.stdout),
    Attack("read /proc/*/environ", _body("""
        import os
        seen = []
        for pid in os.listdir("/proc"):
            try:
                seen.append(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError:
                pass
        print(b"".join(seen))
        def solve(x):
            return len(seen)
        """), lambda h, r: SECRET not in r.stdout),
    Attack("connect to the host on loopback", _body("""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            print("CONNECTED")
        except OSError as e:
            print("refused", e.errno)
        def solve(x):
            return 0
        """), lambda h, r: h.no_connection() and "CONNECTED" not in r.stdout),
    Attack("connect to an outside address", _body("""
        import socket
        for addr in [("1.1.1.1", 53), ("8.8.8.8", 443)]:
            try:
                socket.create_connection(addr, timeout=1)
                print("CONNECTED")
            except OSError as e:
                print("unreachable", e.errno)
        def solve(x):
            return 0
        """), lambda h, r: "CONNECTED" not in r.stdout),
    Attack("fork bomb", _body("""
        import os
        def solve(x):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """), lambda h, r: not sandbox_procs()),
    Attack("memory bomb", _body("""
        def solve(x):
            hog = []
            while True:
                hog.append(bytearray(64 << 20))
        """), lambda h, r: r.memory_exceeded, expect="memory"),
    Attack("infinite loop ignoring SIGALRM/SIGTERM, catching exceptions", _body("""
        import signal
        for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        def solve(x):
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass
        """), lambda h, r: r.timeout and not sandbox_procs(), expect="timeout"),
    Attack("os._exit(0) before the tests", _body("""
        import os
        def solve(x):
            return x * x
        os._exit(0)
        """)),
    Attack("SystemExit(0) before the tests", _body("""
        def solve(x):
            return x * x
        raise SystemExit(0)
        """)),
    Attack("quit() / exit() before the tests", _body("""
        import sys
        def solve(x):
            return x * x
        try:
            quit()
        except NameError:  # no site module in the sandbox: quit() does not exist; sys.exit does
            sys.exit(0)
        """)),
    Attack("print a fake success line", _body("""
        import sys, json
        print("ALL TESTS PASSED\\npassed 1/1")
        print(json.dumps({{"loaded": True, "tests": [{{"name": "square", "status": "passed", "message": ""}}]}}))
        sys.stderr.write("OK\\n")
        def solve(x):
            return 0
        """)),
    Attack("monkeypatch the test harness", _body("""
        import sys
        jail = sys.modules.get("__main__")
        for name in ("run_checks", "send", "decode_value", "Link"):
            if hasattr(jail, name):
                setattr(jail, name, lambda *a, **k: None)
        def solve(x):
            return 0
        """)),
    Attack("redefine assert / AssertionError", _body("""
        import builtins
        class Never(Exception):
            pass
        builtins.AssertionError = Never
        builtins.__dict__["assert"] = None
        def solve(x):
            return 0
        """)),
    Attack("always-equal return object", _body("""
        class Eq:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            def __hash__(self): return 0
        def solve(x):
            return Eq()
        """), expect="error"),
    Attack("int subclass with a rigged __eq__", _body("""
        class Nine(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def solve(x):
            return Nine(0)
        """), expect="error"),
    Attack("shadow the checker's helper names", _body("""
        def solve(x):
            return 0
        def poly(*a):
            return 0
        def isinstance(*a):
            return True
        """)),
    Attack("importlib.reload(os)", _body("""
        import importlib, os
        os.system = lambda *a: 0
        importlib.reload(os)
        def solve(x):
            return os.getpid()
        """)),
    Attack("ctypes calls into libc", _body("""
        import ctypes, json, struct
        libc = ctypes.CDLL(None)
        print("setuid", libc.setuid(0), "kill", libc.kill(1, 9), "unshare", libc.unshare(0x40000000))
        fake = json.dumps({{"loaded": True, "tests": [{{"name": "square", "status": "passed", "message": ""}}]}}).encode()
        for fd in (3, 4, 5, 6):  # forge a verdict on every descriptor it has
            libc.write(fd, struct.pack(">I", len(fake)) + fake, 4 + len(fake))
        def solve(x):
            return 0
        """)),
    Attack("stall the checker mid-message", _body("""
        import os, struct, time
        def solve(x):
            os.write(4, struct.pack(">I", 1 << 20) + b"[")  # a reply header, then nothing
            time.sleep(60)
        """), expect="timeout"),
    Attack("kill the parent, PID 1 and everything", _body("""
        import os, signal
        for target in (os.getppid(), 1, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError as e:
                print(target, type(e).__name__)
        def solve(x):
            return 0
        """)),
    Attack("background process outliving the sample", _body("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(3)
                open("{dir}/late.txt", "w").write("still alive")
            os._exit(0)
        def solve(x):
            return 0
        """), lambda h, r: (time.sleep(0.5) or True) and not sandbox_procs() and not (h.dir / "late.txt").exists()),
    Attack("rewrite the checker's source", _body("""
        for path in ["{jail}", "/usr/lib/python3/dist-packages/pwn.py"]:
            try:
                open(path, "a").write("\\nraise SystemExit")
                print("WROTE", path)
            except OSError as e:
                print(type(e).__name__)
        def solve(x):
            return 0
        """), lambda h, r: "WROTE" not in r.stdout and "raise SystemExit" not in Path(JAIL).read_text()),
    Attack("read the test data from disk", _body("""
        import os
        for path in ["{dir}", "/work", "/root", os.path.expanduser("~")]:
            try:
                print(path, os.listdir(path)[:3])
            except OSError as e:
                print(path, type(e).__name__)
        def solve(x):
            return 0
        """), lambda h, r: "keep.txt" not in r.stdout),
    Attack("fill the disk", _body("""
        def solve(x):
            with open("big.bin", "wb") as fh:
                while True:
                    fh.write(b"x" * (1 << 20))
        """)),
    Attack("flood stdout", _body("""
        import sys
        def solve(x):
            for _ in range(200):
                sys.stdout.write("y" * (1 << 20))
            return 0
        """), lambda h, r: len(r.stdout) <= 64 << 10),
    Attack("huge return value", _body("""
        def solve(x):
            return "z" * (300 << 20)
        """)),
    Attack("crash the interpreter", _body("""
        import ctypes
        def solve(x):
            ctypes.string_at(0)
        """), expect="crashed"),
    Attack("thread bomb", _body("""
        import threading, time
        def solve(x):
            while True:
                threading.Thread(target=time.sleep, args=(30,)).start()
        """), lambda h, r: not sandbox_procs()),
]

JAIL = str(Path(__file__).resolve().parents[1] / "posttrain" / "verifiers" / "_jail.py")


def program(attack: Attack, host: Host) -> str:
    return attack.program.format(dir=host.dir, keep=host.keep, port=host.port, secret=SECRET, jail=JAIL)


def main() -> None:
    import tempfile

    from posttrain.verifiers.code import CodeTests, check
    from posttrain.verifiers.sandbox import Limits, Sandbox

    limits = Limits(cpu_seconds=2, memory_mb=512, test_seconds=2.0, load_seconds=2.0)
    tests = CodeTests(entry="solve", tests=TEST)
    rows = []
    with tempfile.TemporaryDirectory() as d, Sandbox() as sandbox:
        host = Host.make(Path(d))
        for attack in ATTACKS:
            r = check(sandbox, program(attack, host), tests, limits)
            after = check(sandbox, GOOD, tests, limits)
            contained = not r.passed and attack.host_ok(host, r) and after.passed
            rows.append((attack.name, r.summary(), r.wall_s, "yes" if contained else "NO"))
    print("| attack | outcome | wall s | contained, next candidate passes |\n|---|---|---|---|")
    for name, outcome, wall, ok in rows:
        print(f"| {name} | {outcome} | {wall:.2f} | {ok} |")
    sys.exit(0 if all(r[3] == "yes" for r in rows) else 1)


if __name__ == "__main__":
    main()
