"""CPU kernels compiled on first use: the packed int2/int4/int8 matmul of ``cpu_packed_matmul.cc`` through XLA's FFI.

:func:`packed_matmul` multiplies a few rows of activations by a :class:`~llmopt_jax.compress.packed.PackedTensor`
without dequantizing it into a float temporary (XLA:CPU's own path; see the ``.cc`` file for why). It is what
``packed_dot_general`` runs on the CPU for decode-sized products (at most :data:`MAX_ROWS` rows); larger ones
(prefill, training) keep XLA's dequantize-then-dot, which uses its tuned matrix-matrix product.

The source is compiled once per machine with the system C++ compiler (``-O3 -march=native``) into
``$LLMOPT_JAX_KERNEL_CACHE`` (default ``~/.cache/llmopt_jax/kernels``), keyed by a hash of the source, the flags,
the compiler and jaxlib, and written atomically. Without a compiler (one warning says why) or AVX-512 (the
kernel's instruction set), or with ``LLMOPT_JAX_CPU_KERNELS=0``, :func:`available` is False and callers keep the
XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_packed_matmul.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_ROWS = 16  # rows of activations up to which the kernel beats XLA's dequantize + dot (decode, not prefill)
SUPPORTED_BITS = (2, 4, 8)
COMPILE_TIMEOUT_S = 300


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("LLMOPT_JAX_KERNEL_CACHE",
                                                  os.path.join("~", ".cache", "llmopt_jax", "kernels"))))


def build(source: Path = SOURCE) -> Path:
    """Compiles ``source`` into a shared library (once: later calls find it in the cache) and returns its path.
    Raises ``RuntimeError`` with the compiler's message when that fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    except OSError as e:
        raise RuntimeError(f"the C++ compiler {cxx!r} cannot be run: {e}") from e
    parts = [source.read_text(), " ".join(FLAGS), cxx, *version, importlib.metadata.version("jaxlib"),
             platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run([cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(source), "-o", tmp],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"compiling {source.name} took over {COMPILE_TIMEOUT_S} s") from e
        if done.returncode:
            raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache from loading it
        os.replace(tmp, target)  # atomic: processes compiling at once each install a whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), so a cache shared between machines differs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _target_name() -> str | None:
    """Registers the kernel with XLA (once per process) and returns its target name, or None when unavailable."""
    if os.environ.get("LLMOPT_JAX_CPU_KERNELS", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    try:
        path = build()
        library = ctypes.cdll.LoadLibrary(str(path))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"llmopt_jax CPU kernels unavailable, packed matmuls use XLA's dequantize + dot: {e}",
                      RuntimeWarning, stacklevel=3)
        return None
    if not library.LlmoptKernelIsa():  # written for AVX-512; elsewhere XLA's path is the better one
        return None
    name = f"llmopt_packed_matmul_{path.stem.rsplit('-', 1)[-1]}"  # a new source gets a new name (cached executables)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(library.LlmoptPackedMatmul), platform="cpu")
    return name


def available() -> bool:
    """True when the CPU kernel is compiled and registered (builds it on the first call)."""
    return _target_name() is not None


def active() -> bool:
    """True when jitted code here runs on the CPU and the kernel is :func:`available`."""
    return jax.default_backend() == "cpu" and available()


def supports(x_shape: tuple[int, ...], packed) -> bool:
    """Whether :func:`packed_matmul` takes activations of ``x_shape`` (contracting the trailing ``packed.n_in``
    dims) against ``packed``: a one-layer int2/int4/int8 :class:`PackedTensor` and at most :data:`MAX_ROWS` rows."""
    from llmopt_jax.compress.packed import PackedTensor

    if not isinstance(packed, PackedTensor) or packed.bits not in SUPPORTED_BITS or packed.data.ndim != 2:
        return False
    n_in = packed.n_in
    rows = math.prod(x_shape[: len(x_shape) - n_in])
    groups = packed.scale.shape[0]
    k, n = math.prod(packed.shape[:n_in]), math.prod(packed.shape[n_in:])
    shapes_agree = tuple(x_shape[len(x_shape) - n_in:]) == tuple(packed.shape[:n_in]) and \
        packed.data.shape == (k * packed.bits // 8, n)
    return shapes_agree and rows <= MAX_ROWS and k % groups == 0 and (k // groups) % (8 // packed.bits) == 0


def packed_matmul(x: jax.Array, packed) -> jax.Array:
    """``x`` float ``[..., *in_shape]`` times the packed kernel ``[*in_shape, *out_shape]`` -> float32
    ``[..., *out_shape]``, on the CPU kernel (check :func:`supports` and :func:`available` first). Differentiable
    (forward and reverse mode): derivatives go through the dequantized kernel, as on XLA's path."""
    return _packed_matmul(x, packed)


def _reference(x, packed):
    """The same product on XLA's path (``packed_dot_general`` without the kernel)."""
    from llmopt_jax.compress.packed import packed_dot_general

    dims = ((tuple(range(x.ndim - packed.n_in, x.ndim)), tuple(range(packed.n_in))), ((), ()))
    return packed_dot_general(x.astype(jnp.float32), packed, dims, preferred_element_type=jnp.float32,
                              cpu_kernel=False)


@jax.custom_jvp
def _packed_matmul(x, packed):
    name = _target_name()
    if name is None:
        raise RuntimeError("the CPU packed-matmul kernel is unavailable (LLMOPT_JAX_CPU_KERNELS=0, no C++ compiler, "
                           "or no AVX-512 on this CPU)")
    k = math.prod(packed.shape[: packed.n_in])
    n = math.prod(packed.shape[packed.n_in:])
    lead = x.shape[: x.ndim - packed.n_in]
    rows = math.prod(lead)
    empty_u8, empty_f16 = jnp.zeros((0,), jnp.uint8), jnp.zeros((0,), jnp.float16)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((rows, n), jnp.float32), vmap_method="sequential")
    y = call(x.reshape(rows, k).astype(jnp.float32), packed.data, packed.scale.astype(jnp.float16),
             empty_u8 if packed.zero is None else packed.zero.astype(jnp.uint8),
             empty_f16 if packed.offset is None else packed.offset.astype(jnp.float16),
             bits=np.int64(packed.bits), lo=np.int64(packed.lo))
    return y.reshape(lead + packed.shape[packed.n_in:])


@_packed_matmul.defjvp
def _jvp(primals, tangents):
    # The tangent through XLA's (linear, transposable) path: forward mode works and reverse mode transposes it.
    return _packed_matmul(*primals), jax.jvp(_reference, primals, tangents)[1]
