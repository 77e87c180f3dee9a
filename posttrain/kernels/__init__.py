"""CPU kernels in C++, compiled on first use and loaded through ctypes (no torch headers: a build takes about 2 s).

`load(name)` compiles `<name>.cpp` beside this file (with the headers it includes from here) using the host's C++
compiler (`$CXX`, else g++) for this machine's CPU (-march=native) into a cache directory, once per source, flags
and CPU; concurrent processes (Ray workers) may race to build it, and each writes its own temporary file and renames
it into place. Where no compiler works, or with POSTTRAIN_CPU_KERNELS=0, it returns None and callers run their torch
path, which computes the same function.

Cache: $POSTTRAIN_KERNEL_CACHE, else $TORCH_EXTENSIONS_DIR/posttrain, else ~/.cache/posttrain/kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")  # where the CPU has AVX-512, use all of it (no effect otherwise)
BUILD_TIMEOUT_S = 120
HEAD_DIMS = (32, 64, 128, 256)  # the head sizes the attention kernels are compiled for (others: torch)

# Each kernel's C functions: argument types (p: pointer, i: int64, f: float); every one returns an int status.
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "shared_prefix_attention": {
        "spa_forward": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _F, _P, _P],
        "spa_backward": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _F, _P, _P, _P],
    },
    "decode_attention": {
        "decode_attend": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _P, _I, _F, _P],
    },
}


def enabled() -> bool:
    return os.environ.get("POSTTRAIN_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("POSTTRAIN_KERNEL_CACHE"):
        return Path(os.environ["POSTTRAIN_KERNEL_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "posttrain"
    return Path.home() / ".cache" / "posttrain" / "kernels"


def _cpu_signature() -> str:
    """-march=native code runs only on CPUs with the same features: they key the cache."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of `<name>.cpp` with its functions typed (SIGNATURES), or None (disabled, or it cannot
    be built here: logged once)."""
    if not enabled():
        return None
    source = SOURCES / f"{name}.cpp"
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        log.warning("no C++ compiler (set CXX or install g++): the %s kernel is off, torch computes it", name)
        return None
    headers = [h.read_bytes() for h in sorted(SOURCES.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, " ".join([compiler, *FLAGS]).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
                partial = Path(tmp.name)
            try:
                subprocess.run([compiler, *FLAGS, "-o", str(partial), str(source)], check=True, capture_output=True,
                               text=True, timeout=BUILD_TIMEOUT_S)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("could not build the %s kernel with %s (%s): torch computes it", name, compiler,
                    str(detail).strip()[-500:])
        return None
    for symbol, argtypes in SIGNATURES[name].items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib
