"""The sandbox's jail: a fork server that runs untrusted Python isolated from the host.

Stdlib only, so it runs outside the virtualenv's packages: `sandbox.py` starts it as
`python -I -S -B _jail.py DIR PARENT off|try|require` (and imports it for the message framing).
It serves one Unix socket (DIR/jail.sock); each connection is one execution, in a forked child, so an
execution costs a few forks instead of an interpreter start-up (about 60 ms here).

Per execution (C0 = the forked child, C1 = its child):
  C0  own session; unshare mount, PID, network, IPC and UTS namespaces (as root; without them: "process" level)
  C1  PID 1 of the new PID namespace: when it exits the kernel kills every process left inside.
      Root is a fresh read-only tmpfs holding read-only binds of /usr and the Python install, /dev/{null,zero,
      urandom,random}, its own /proc, and writable size-capped tmpfs at /tmp and /sandbox (the working
      directory). The network namespace has only a loopback that is down.
  candidate  forked from C1 *before* the tests reach C1's memory; uid/gid unique to this execution, no
      groups, no new privileges, empty environment, rlimits (CPU, address space, processes, file size,
      open files, no core). It runs the program, then answers calls: pickled arguments in, results out as
      plain values only (None/bool/int/float/complex/str/bytes and list/tuple/dict/set/frozenset of them,
      checked by exact type), so an object with a rigged __eq__ cannot leave the process.
  checker  forked from C1 after the tests arrive, under a second uid the candidate cannot signal or trace.
      It runs the trusted test code with the candidate's functions as proxies, so `assert`, builtins and
      the harness are the checker's own; the verdict travels on a pipe only C1 holds.

Stdio programs (competitive-programming style) run once per input in a fresh candidate process; their
output is compared by the host, so expected outputs never enter the sandbox.
"""

from __future__ import annotations

import base64
import builtins
import collections
import ctypes
import fcntl
import json
import os
import pickle
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

UID_BASE = 1_000_000  # candidate uid = UID_BASE + C0's pid (unique while it runs); checker = that + 2**22
MAX_MESSAGE = 64 << 20
MAX_DEPTH = 200  # nesting of a returned value
_libc = ctypes.CDLL(None, use_errno=True)


# ----------------------------------------------------------------------------- framing


def send(sock_or_fd, obj) -> None:
    data = json.dumps(obj).encode()
    frame = struct.pack(">I", len(data)) + data
    if isinstance(sock_or_fd, int):
        view = memoryview(frame)
        while view:
            view = view[os.write(sock_or_fd, view):]
    else:
        sock_or_fd.sendall(frame)


def _read_exact(read, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = read(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("peer closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock_or_fd, limit: int = MAX_MESSAGE, deadline: float | None = None):
    """One framed message; with a deadline (fds only), a peer that stalls mid-message raises TimeoutError."""
    if isinstance(sock_or_fd, int):
        def read(n: int) -> bytes:
            if deadline is not None and not select.select([sock_or_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("peer stalled")
            return os.read(sock_or_fd, n)
    else:
        read = sock_or_fd.recv
    (size,) = struct.unpack(">I", _read_exact(read, 4))
    if size > limit:
        raise ValueError(f"message of {size} bytes exceeds the {limit}-byte limit")
    return json.loads(_read_exact(read, size))


# ----------------------------------------------------------------------------- plain values


_SCALARS = {type(None): "N", bool: "b", int: "i", float: "f", str: "s"}
# Standard-library containers (MBPP returns Counters): their contents cross as plain data and the checker
# rebuilds them from its own, unpatched classes. References taken now, before any candidate code runs.
_DICTS = {collections.Counter: "Counter", collections.OrderedDict: "OrderedDict", collections.defaultdict: "defaultdict"}
_DICT_ITEMS, _DEQUE = dict.items, collections.deque


def encode_value(value, depth: int = 0):
    """A returned value as tagged JSON; anything but plain built-in data (by exact type) is refused."""
    if depth > MAX_DEPTH:
        raise ValueError("returned value is nested too deeply")
    kind = type(value)
    if kind in _SCALARS:
        tag = _SCALARS[kind]
        if tag == "f":
            return ["f", repr(value)]  # repr round-trips, including nan/inf
        return [tag, value] if tag != "N" else ["N"]
    if kind is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if kind is bytes:
        return ["y", base64.b64encode(value).decode()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return [tag, [encode_value(v, depth + 1) for v in value]]
    if kind is dict or kind in _DICTS:
        pairs = [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in _DICT_ITEMS(value)]
        return ["d", pairs] if kind is dict else ["D", _DICTS[kind], pairs]
    if kind is _DEQUE:
        return ["Q", [encode_value(v, depth + 1) for v in list(value)]]
    raise TypeError(f"returned an object of type {kind.__name__}; only plain built-in values can be checked")


def decode_value(node, depth: int = 0):
    """Inverse of encode_value, run by the checker on untrusted input: strict about every tag and type."""
    if depth > MAX_DEPTH or not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise ValueError("malformed value")
    tag, rest = node[0], node[1:]
    if tag == "N" and not rest:
        return None
    if tag in ("b", "i", "s") and len(rest) == 1 and type(rest[0]) is {"b": bool, "i": int, "s": str}[tag]:
        return rest[0]
    if tag == "f" and len(rest) == 1 and type(rest[0]) is str:
        return float(rest[0])
    if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "y" and len(rest) == 1 and type(rest[0]) is str:
        return base64.b64decode(rest[0], validate=True)
    if tag in ("l", "t", "S", "F") and len(rest) == 1 and type(rest[0]) is list:
        items = [decode_value(v, depth + 1) for v in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "Q" and len(rest) == 1 and type(rest[0]) is list:
        return collections.deque(decode_value(v, depth + 1) for v in rest[0])
    if tag in ("d", "D") and type(rest[-1]) is list and len(rest) == (1 if tag == "d" else 2):
        pairs = rest[-1]
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict")
        plain = {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in pairs}
        if tag == "d":
            return plain
        kinds = {"Counter": collections.Counter, "OrderedDict": collections.OrderedDict,
                 "defaultdict": lambda d: collections.defaultdict(None, d)}
        if rest[0] not in kinds:
            raise ValueError(f"malformed value (container {rest[0]!r})")
        return kinds[rest[0]](plain)
    raise ValueError(f"malformed value (tag {tag!r})")


class RemoteRef:
    """A name defined by fixture code inside the candidate process (MBPP's test_setup_code), passed by name."""

    def __init__(self, name: str):
        self.name = name


# ----------------------------------------------------------------------------- the candidate process


def _exc_text(exc: BaseException, limit: int = 500) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


def serve_calls(program: str, fixtures: str, fd_in: int, fd_out: int) -> None:
    """Candidate side of function tests: load the program, then answer calls until the checker hangs up."""
    try:
        namespace = {"__name__": "__candidate__", "__builtins__": builtins}
        exec(compile(program, "candidate.py", "exec"), namespace)
        before = set(namespace)
        if fixtures:  # trusted set-up code that builds arguments from the program's own classes
            exec(compile(fixtures, "fixtures.py", "exec"), namespace)
        hello = {
            "loaded": True,
            "callables": sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("__")),
            "modules": {k: v.__name__ for k, v in namespace.items() if type(v) is type(os)},
            "fixtures": sorted(set(namespace) - before),
        }
    except BaseException as exc:  # SyntaxError, a top-level exit(): the load failed, the tests will say so
        hello = {"loaded": False, "error": _exc_text(exc)}
        namespace = {}
    _flush()
    send(fd_out, hello)
    while True:
        try:
            request = recv(fd_in)
        except EOFError:
            return
        try:
            args, kwargs = pickle.loads(base64.b64decode(request["args"]))
            args = [namespace[a.name] if isinstance(a, RemoteRef) else a for a in args]
            value = namespace[request["fn"]](*args, **kwargs)
            reply = {"id": request["id"], "value": encode_value(value)}
        except BaseException as exc:  # the candidate's own exceptions (incl. SystemExit) are its answer
            reply = {"id": request["id"], "error": [type(exc).__name__, str(exc)[:500]]}
        _flush()
        send(fd_out, reply)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def run_script(program: str) -> int:
    """Stdio side: run the program as __main__ with the sandbox's stdin/stdout; its exit status."""
    code = 0
    try:
        exec(compile(program, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc(limit=5)
        code = 1
    _flush()
    return code


# ----------------------------------------------------------------------------- the checker process


class CandidateFailed(Exception):
    """The candidate process stopped answering (exited, crashed, or overran the test's time)."""


class Candidate:
    """The checker's handle on a function living in the candidate process."""

    def __init__(self, link: "Link", name: str):
        self._link, self._name = link, name

    def __call__(self, *args, **kwargs):
        return self._link.call(self._name, args, kwargs)


class Link:
    def __init__(self, fd_out: int, fd_in: int):
        self.fd_out, self.fd_in = fd_out, fd_in
        self.deadline = float("inf")
        self.next_id, self.dead = 0, None

    def receive(self):
        if self.dead:
            raise CandidateFailed(self.dead)
        try:
            return recv(self.fd_in, deadline=self.deadline)
        except TimeoutError:
            self.dead = "timeout"
            raise CandidateFailed("timeout") from None
        except (EOFError, ValueError, OSError) as exc:
            self.dead = "exited" if isinstance(exc, EOFError) else f"protocol: {exc}"
            raise CandidateFailed(self.dead) from None

    def call(self, name: str, args: tuple, kwargs: dict):
        self.next_id += 1
        payload = base64.b64encode(pickle.dumps((list(args), kwargs))).decode()
        try:
            send(self.fd_out, {"id": self.next_id, "fn": name, "args": payload})
        except OSError:
            self.dead = "exited"
            raise CandidateFailed("exited") from None
        reply = self.receive()
        if not isinstance(reply, dict) or reply.get("id") != self.next_id:
            self.dead = "protocol: reply out of order"
            raise CandidateFailed(self.dead)
        if "error" in reply:
            kind, text = reply["error"]
            exc_type = getattr(builtins, str(kind), None)
            error = None
            if isinstance(exc_type, type) and issubclass(exc_type, Exception):
                try:  # tests may expect e.g. ValueError; the type raised here is the checker's own builtin
                    error = exc_type(str(text)[:500])
                except Exception:  # a builtin needing other arguments (UnicodeDecodeError, ...)
                    pass
            raise error or RuntimeError(f"candidate raised {kind}: {text}"[:500])
        try:
            return decode_value(reply["value"])
        except Exception as exc:
            raise TypeError(f"candidate returned a value that cannot be checked: {exc}") from None


def run_checks(spec: dict, link: Link, result_fd: int) -> None:
    """Run each test in the checker's namespace; write [{name, status, message}] to result_fd."""
    outcomes = []
    link.deadline = time.monotonic() + spec["load_seconds"]
    try:
        hello = link.receive()
    except CandidateFailed as exc:
        hello = {"loaded": False, "error": f"candidate {exc} before the tests ran"}
    if not hello.get("loaded"):
        send(result_fd, {"loaded": False, "error": str(hello.get("error"))[:500], "tests": []})
        return
    namespace = {"__name__": "__checker__", "__builtins__": builtins}
    exec(compile(spec.get("context") or "", "context.py", "exec"), namespace)
    trusted = set(namespace)
    for name, module in hello.get("modules", {}).items():  # the candidate's `import math` used by the asserts
        if name not in trusted and isinstance(module, str) and module in sys.stdlib_module_names:
            namespace[name] = __import__(module, fromlist=["_"])
    for name in hello.get("callables", []):  # trusted context and builtins win over the candidate's names
        if isinstance(name, str) and name not in trusted and not hasattr(builtins, name):
            namespace[name] = Candidate(link, name)
    for name in hello.get("fixtures", []):
        if isinstance(name, str) and name not in trusted:
            namespace[name] = RemoteRef(name)
    entry = spec["entry"]
    namespace[entry] = namespace["candidate"] = Candidate(link, entry)
    for test in spec["tests"]:
        if link.dead:
            outcomes.append({"name": test["name"], "status": "not_run", "message": f"candidate {link.dead}"})
            continue
        link.deadline = time.monotonic() + spec["test_seconds"]
        status, message = "passed", ""
        try:
            exec(compile(test["code"], test["name"], "exec"), namespace)
        except AssertionError as exc:
            status, message = "failed", _exc_text(exc)
        except CandidateFailed as exc:
            status, message = ("timeout" if str(exc) == "timeout" else "crashed"), f"candidate {exc}"
        except MemoryError as exc:
            status, message = "memory", _exc_text(exc)
        except Exception as exc:
            status, message = "error", _exc_text(exc)
        outcomes.append({"name": test["name"], "status": status, "message": message})
    send(result_fd, {"loaded": True, "tests": outcomes})


# ----------------------------------------------------------------------------- isolation


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def unshare_all() -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")


def _bind_readonly(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def build_root(root: str, expose: list[str], uid: int, workdir_mb: int) -> None:
    """Private mounts; a read-only tmpfs root with read-only binds of `expose`; chroot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
    for path in expose:
        target = root + path
        if os.path.lexists(target):
            continue
        if os.path.islink(path) and os.path.dirname(path) == "/":  # merged-/usr links: /bin -> usr/bin
            os.symlink(os.readlink(path), target)
        elif os.path.exists(path):
            _bind_readonly(path, target)
    for dev in ("null", "zero", "urandom", "random"):
        _bind_readonly(f"/dev/{dev}", f"{root}/dev/{dev}")
    for d in ("proc", "tmp", "sandbox"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    _mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    _mount("tmpfs", f"{root}/sandbox", "tmpfs", MS_NOSUID | MS_NODEV, f"size={workdir_mb}m,mode=700,uid={uid},gid={uid}")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/sandbox")


def become(uid: int | None, limits: dict, fds: dict[int, int]) -> None:
    """In a fresh child: move `fds` to their numbers, close the rest, drop to `uid`, apply rlimits."""
    high = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, 512) for target, fd in fds.items()}  # no clobbering
    for target, fd in high.items():
        os.dup2(fd, target)
    os.closerange(max(fds) + 1, 65536)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    mb = 1 << 20
    for res, soft, hard in (
        (resource.RLIMIT_CPU, limits["cpu_seconds"], limits["cpu_seconds"] + 1),
        (resource.RLIMIT_AS, limits["memory_mb"] * mb, limits["memory_mb"] * mb),
        (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb, limits["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))
    os.environ.clear()


def kill_uid(uid: int | None) -> None:
    """SIGKILL every process running as `uid` (kill(-1) from a child holding that uid), background ones too."""
    if uid is None:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def end_everything(isolated: bool, uids: list[int | None]) -> None:
    """Before the verdict leaves: no process of this execution is left (background ones included)."""
    if not isolated:
        for uid in uids:
            kill_uid(uid)
    while True:
        if isolated:  # PID 1: kill(-1) reaches every other process in the namespace; orphans are ours to reap
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            if os.waitpid(-1, 0 if isolated else os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


# ----------------------------------------------------------------------------- one execution


class Capture:
    """Drain pipes into size-capped buffers (the rest is counted and dropped)."""

    def __init__(self, cap: int):
        self.cap, self.fds, self.data, self.total, self.caps = cap, {}, {}, {}, {}

    def add(self, name: str, fd: int, cap: int | None = None) -> None:
        os.set_blocking(fd, False)
        self.fds[fd], self.data[name], self.total[name] = name, bytearray(), 0
        self.caps[name] = self.cap if cap is None else cap

    def open(self, name: str) -> bool:
        return name in self.fds.values()

    def pump(self, timeout: float) -> None:
        if not self.fds:
            return
        ready, _, _ = select.select(list(self.fds), [], [], max(0.0, timeout))
        for fd in ready:
            name = self.fds[fd]
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                del self.fds[fd]
                os.close(fd)
                continue
            buf = self.data[name]
            buf += chunk[: max(0, self.caps[name] - len(buf))]
            self.total[name] += len(chunk)

    def report(self, name: str) -> dict:
        return {"text": self.data[name].decode("utf-8", "replace"), "bytes": self.total[name]}


def _wait(pid: int) -> dict:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return {"running": True}
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def _usage(before: resource.struct_rusage) -> dict:
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": round(now.ru_utime + now.ru_stime - before.ru_utime - before.ru_stime, 4), "max_rss_kb": now.ru_maxrss}


def spawn(uid, limits, stdin_fd: int, out: Capture, tag: str, extra_fds: dict[int, int], body) -> int:
    """Fork a candidate-side process: stdout/stderr into `out` under tag, `body()` returns its exit code."""
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            become(uid, limits, {0: stdin_fd, 1: w_out, 2: w_err, **extra_fds})
            code = body()
        except BaseException:
            pass
        finally:
            _flush()
            os._exit(code)
    os.close(w_out)
    os.close(w_err)
    out.add(f"{tag}stdout", r_out)
    out.add(f"{tag}stderr", r_err)
    return pid


def execute(conn: socket.socket, root: str, isolated: bool, c0_pid: int) -> dict:
    """C1: everything of one execution after the namespaces exist."""
    request = recv(conn)
    limits, uid_base = request["limits"], UID_BASE + c0_pid
    # Another uid needs root; without namespaces it also needs an interpreter it can read (pyenv under /root: no).
    root_user = os.geteuid() == 0 and (isolated or PYTHON_WORLD_READABLE)
    cand_uid = uid_base if root_user else None
    check_uid = uid_base + (1 << 22) if root_user else None
    workdir = None
    if isolated:
        build_root(root, EXPOSE, cand_uid, limits["workdir_mb"])
    else:  # no namespaces: a private directory, still removed afterwards
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        if root_user:
            os.chown(workdir, cand_uid, cand_uid)
        os.chdir(workdir)
    devnull = os.open("/dev/null", os.O_RDONLY)
    out = Capture(limits["output_bytes"])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        if request["mode"] == "function":
            result = _execute_function(conn, request, limits, cand_uid, check_uid, devnull, out)
        else:
            result = _execute_stdio(conn, request, limits, cand_uid, out)
    finally:
        end_everything(isolated, [cand_uid, check_uid])
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["usage"] = _usage(before)
    return result


def _execute_function(conn, request, limits, cand_uid, check_uid, devnull, out: Capture) -> dict:
    to_cand_r, to_cand_w = os.pipe()
    to_chk_r, to_chk_w = os.pipe()
    program, fixtures = request["program"], request.get("fixtures") or ""
    cand = spawn(cand_uid, limits, devnull, out, "", {3: to_cand_r, 4: to_chk_w},
                 lambda: serve_calls(program, fixtures, 3, 4) or 0)
    os.close(to_cand_r)
    os.close(to_chk_w)
    send(conn, {"ready": True})  # only now do the tests travel: the candidate never had them in memory
    spec = recv(conn)
    res_r, res_w = os.pipe()
    checker_limits = dict(limits, cpu_seconds=limits["cpu_seconds"] * 4, processes=limits["processes"])
    checker = spawn(check_uid, checker_limits, devnull, out, "checker_", {3: to_chk_r, 4: to_cand_w, 5: res_w},
                    lambda: run_checks(spec, Link(4, 3), 5) or 0)
    for fd in (to_chk_r, to_cand_w, res_w):
        os.close(fd)
    out.add("verdict", res_r, cap=MAX_MESSAGE)
    budget = spec["load_seconds"] + spec["test_seconds"] * max(1, len(spec["tests"])) + 1.0
    deadline = time.monotonic() + budget
    while out.open("verdict") and time.monotonic() < deadline:
        out.pump(deadline - time.monotonic())
    for _ in range(3):  # what the candidate printed just before the verdict
        out.pump(0)
    raw = bytes(out.data["verdict"])
    checked = None
    if raw:
        try:
            (size,) = struct.unpack(">I", raw[:4])
            checked = json.loads(raw[4 : 4 + size])
        except Exception as exc:
            checked = {"loaded": False, "error": f"unreadable checker report: {exc}", "tests": []}
    cand_state, check_state = _wait(cand), _wait(checker)
    return {
        "checker": checked,
        "checker_process": check_state,
        "candidate": cand_state,
        "stdout": out.report("stdout"),
        "stderr": out.report("stderr"),
        "checker_stderr": out.report("checker_stderr")["text"][-2000:],
    }


def _execute_stdio(conn, request, limits, cand_uid, out: Capture) -> dict:
    send(conn, {"ready": True})
    spec = recv(conn)
    runs = []
    for i, data in enumerate(spec["inputs"]):
        stdin = os.memfd_create("stdin")
        os.write(stdin, data.encode())
        os.lseek(stdin, 0, os.SEEK_SET)
        tag = f"run{i}_"
        start = time.monotonic()
        program = request["program"]
        pid = spawn(cand_uid, limits, stdin, out, tag, {}, lambda: run_script(program))
        os.close(stdin)
        deadline = start + spec["test_seconds"]
        state = {"running": True}
        while time.monotonic() < deadline:
            out.pump(0.02)
            state = _wait(pid)
            if "running" not in state:
                break
        if "running" in state:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            state = {"timeout": True}
        kill_uid(cand_uid)  # nothing of this run survives into the next
        while any(n.startswith(tag) for n in out.fds.values()):
            out.pump(0.01)
        runs.append({"state": state, "stdout": out.report(f"{tag}stdout"), "stderr": out.report(f"{tag}stderr"),
                     "wall_s": round(time.monotonic() - start, 4)})
    return {"runs": runs}


def handle(conn: socket.socket, root: str, namespaces: str) -> int:
    """C0: a session of its own, namespaces ("off", "try" or "require"), then C1 does the work while C0 waits."""
    os.setsid()
    c0_pid = os.getpid()
    send(conn, {"pid": c0_pid})
    isolated, why = False, "namespaces disabled"
    if namespaces != "off":
        try:
            unshare_all()
            isolated, why = True, ""
        except OSError as exc:
            why = str(exc)
            if namespaces == "require":  # refuse before any of the program runs
                send(conn, {"failure": f"namespaces unavailable ({why}) and isolation='namespaces' was asked for"})
                return 1
    child = os.fork()
    if child == 0:
        code = 0
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            result = execute(conn, root, isolated, c0_pid)
            result["isolation"] = {"namespaces": isolated, "why_not": why,
                                   "uid_drop": os.geteuid() == 0 and (isolated or PYTHON_WORLD_READABLE)}
            send(conn, {"result": result})
        except BaseException as exc:
            try:
                send(conn, {"failure": _exc_text(exc, 2000), "trace": traceback.format_exc()[-4000:]})
            except BaseException:
                pass
            code = 1
        os._exit(code)
    conn.close()
    _, status = os.waitpid(child, 0)
    return 0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1


def _exposed() -> list[str]:
    """What the sandbox sees of the host, read-only: system dirs and this interpreter's install."""
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    python = {os.path.realpath(p) for p in [sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]}
    python |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    return system + sorted(python, key=len)


def _world_readable(path: str) -> bool:
    """Whether a user with no rights of its own can reach `path` (every directory on the way searchable)."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts if os.path.isdir(p))


EXPOSE: list[str] = []
PYTHON_WORLD_READABLE = True


def serve(runtime: str, parent: int, namespaces: str) -> None:
    global EXPOSE, PYTHON_WORLD_READABLE
    EXPOSE = _exposed()
    PYTHON_WORLD_READABLE = all(_world_readable(p) for p in sys.path if p and os.path.isdir(p))
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of killed executions come back here to be reaped
    if os.getppid() != parent:  # the host died before we armed the death signal
        return
    root = os.path.join(runtime, "root")
    os.makedirs(root, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(runtime, "jail.sock"))
    listener.listen(256)
    listener.settimeout(1.0)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            conn = None
        if conn is not None:
            conn.settimeout(None)
            pid = os.fork()
            if pid == 0:
                listener.close()
                code = 1
                try:
                    code = handle(conn, root, namespaces)
                finally:
                    os._exit(code)
            conn.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
