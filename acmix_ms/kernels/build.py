"""Compile the C++ kernels of this package into shared libraries at first use, cached on disk.

The library name carries a hash of the source, the headers beside it (``parallel.h``: the kernels' thread pool),
the compiler, the flags and the CPU (the code is built for the CPU it runs on, ``-march=native``), so an edited
source, another compiler or another machine sharing the cache gives a new file and stale libraries are never
loaded. Compilation writes to a temporary name
and renames it into place, so processes started together (e.g. by msrun) do not see half-written files.
Cache directory: ``$ACMIX_MS_KERNEL_CACHE`` if set, else ``~/.cache/acmix_ms/kernels``.
Within a process the outcome (library or error) is remembered, so a network with many layers asks the
compiler once, and a failed build is not retried layer after layer.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNEL_SOURCE_DIR = Path(__file__).resolve().parent
# -fno-trapping-math: the kernels never enable floating-point exceptions, and without it GCC keeps branches for
# selects such as erf's clamp and does not vectorise those loops (GELU ran scalar); values are unchanged (no
# reassociation, unlike -ffast-math)
CXX_FLAGS = ("-O3", "-std=c++17", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
# tuned for this CPU (AVX2/AVX-512 where present); dropped if the compiler does not know it
NATIVE_FLAGS = ("-march=native",)


class KernelBuildError(RuntimeError):
    """The C++ compiler is missing or failed."""


# (source name, compiler setting, cache dir) -> library Path or the KernelBuildError it raised
_OUTCOMES = {}


def cache_dir():
    return Path(os.environ.get("ACMIX_MS_KERNEL_CACHE") or Path.home() / ".cache" / "acmix_ms" / "kernels")


def _compiler():
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"C++ compiler {compiler!r} not found (set CXX to choose another)")
    return compiler


def compiled_library(source_name):
    """Path of the shared library built from ``KERNEL_SOURCE_DIR/source_name`` (compiled if not cached).

    Raises ``KernelBuildError`` (the same one again on later calls in this process) if it cannot be built.
    """
    key = (source_name, os.environ.get("CXX"), str(cache_dir()))
    if key not in _OUTCOMES:
        try:
            _OUTCOMES[key] = _build(source_name)
        except KernelBuildError as error:
            _OUTCOMES[key] = error
    outcome = _OUTCOMES[key]
    if isinstance(outcome, KernelBuildError):
        raise outcome
    if not outcome.is_file():  # the cache was cleaned while this process ran
        del _OUTCOMES[key]
        return compiled_library(source_name)
    return outcome


def _cpu_identity():
    """The CPU model and feature flags (what -march=native compiles for); empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        return ""
    return "".join(sorted(set(lines)))


def _build(source_name):
    source = KERNEL_SOURCE_DIR / source_name
    if not source.is_file():
        raise KernelBuildError(f"kernel source {source} does not exist")
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(KERNEL_SOURCE_DIR.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join([compiler, *version, *CXX_FLAGS, *NATIVE_FLAGS]).encode())
    digest.update(_cpu_identity().encode())
    target_dir = cache_dir()
    target = target_dir / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", prefix=f".{source.stem}-", dir=target_dir)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *CXX_FLAGS, *NATIVE_FLAGS, "-o", partial, str(source)],
                                capture_output=True, text=True)
        if result.returncode != 0:  # e.g. a compiler without -march=native: the portable build
            result = subprocess.run([compiler, *CXX_FLAGS, "-o", partial, str(source)], capture_output=True,
                                    text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {source} failed:\n{result.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target
