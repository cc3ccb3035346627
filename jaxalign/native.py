"""Native CPU kernels for XLA:CPU: C++ sources shipped with the package, compiled on first use with
the machine's C++ compiler and called through `jax.ffi`.

`build(source, flags)` compiles one source for this machine (`-march=native`) into a per-user cache
(`$JAXALIGN_CACHE_DIR` or `~/.cache/jaxalign`), keyed by the source, the compiler and its flags,
jaxlib's version and the CPU's feature flags, atomically (parallel builds are safe).
`JAXALIGN_NATIVE=0` turns every native kernel off (`enabled()`); each kernel module then uses
XLA's own lowering, as it does where no compiler is found or the build fails.

Kernels: `jaxalign.quant.nf4_cpu` (NF4 dequantization), `jaxalign.models.attention_cpu`
(fused attention).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import jax

BASE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


def enabled() -> bool:
    """False when `JAXALIGN_NATIVE` is 0/false/no/off."""
    return os.environ.get("JAXALIGN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("JAXALIGN_CACHE_DIR") or Path.home() / ".cache" / "jaxalign")


def library_path(source: Path, flags, compiler: str) -> Path:
    """Where `source` built by `compiler` with `flags` for this machine is cached."""
    key = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), " ".join(flags).encode(),
                 jax.__version__.encode(), getattr(jax.lib, "__version__", "").encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        key.update(part + b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path, flags, compiler: str | None = None, *, out: Path | None = None) -> Path:
    """Compiles `source` with `flags` into a shared library and returns its path (cached). Raises
    RuntimeError with the compiler's message when it fails or there is no compiler."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    out = out or library_path(source, flags, compiler)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load(register: Callable[[], None], *, what: str, fallback: str) -> bool:
    """Runs `register()` (build and register a kernel) unless native kernels are off. Returns
    whether it succeeded; on failure warns once: '<what> is unavailable, <fallback> (<error>)'."""
    if not enabled():
        return False
    try:
        register()
        return True
    except Exception as e:  # noqa: BLE001 - any failure falls back to XLA's lowering
        warnings.warn(f"jaxalign: {what} is unavailable, {fallback} ({e})", RuntimeWarning,
                      stacklevel=3)
        return False
