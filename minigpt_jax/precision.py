"""`config.model.dtype = "auto"`: the compute dtype this machine runs fastest without harm.

bfloat16 has float32's range, so it needs no loss scaling; it pays where the
hardware multiplies it natively: TPUs, NVIDIA GPUs of compute capability 8.0
and up (Ampere's tensor cores), and CPUs with AMX or AVX512-BF16 units, if
XLA uses them there, which only a measurement tells. Elsewhere bfloat16
products are emulated and slower, so "auto" keeps float32. It never picks
float16, which needs loss scaling (ask for it with --config.model.dtype).

Owns: `choose` (a dtype setting to a dtype and the reason), `resolve`.
May import: JAX and the standard library.
"""

import functools
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 products
MIN_SPEEDUP = 1.25  # bfloat16 products must beat float32 by this much to be chosen on a CPU
FLOAT16_HINT = "--config.model.dtype=float16 for loss-scaled float16"


class Choice(NamedTuple):
  dtype: str
  reason: str


@functools.cache
def choose(setting: str) -> Choice:
  """The dtype of a `config.model.dtype` value and why; "auto" looks at the first device.

  Cached: the CPU probe runs at most once per process.
  """
  if setting != "auto":
    return Choice(setting, "asked for")
  device = jax.devices()[0]
  return pick(device.platform, getattr(device, "compute_capability", None), cpu_flags(),
              bf16_speedup)


def resolve(setting: str) -> str:
  """ModelConfig's `read` for dtype: the model always sees a concrete dtype."""
  return choose(setting).dtype


def pick(platform: str, capability: str | None, flags: set[str],
         speedup: Callable[[], float]) -> Choice:
  """The rules of "auto", pure but for `speedup()`, called only where they need a measurement."""
  if platform == "tpu":
    return Choice("bfloat16", "TPUs multiply in bfloat16")
  if platform != "cpu":
    if _version(capability) >= (8, 0):
      return Choice("bfloat16", f"GPU compute capability {capability} has bfloat16 tensor cores")
    return Choice("float32", f"GPU compute capability {capability or 'unknown'} has no fast "
                  f"bfloat16; {FLOAT16_HINT}")
  units = [flag for flag in BF16_UNITS if flag in flags]
  if not units:
    return Choice("float32", "this CPU has no AMX or AVX512-BF16")
  ratio = speedup()
  if ratio >= MIN_SPEEDUP:
    return Choice("bfloat16", f"CPU has {', '.join(units)}; bf16 products {ratio:.2f}x faster")
  return Choice("float32", f"CPU has {', '.join(units)} but bf16 products are only {ratio:.2f}x "
                f"as fast as float32 (under {MIN_SPEEDUP}x)")


def _version(capability: str | None) -> tuple[int, ...]:
  """(8, 6) from "8.6"; () where absent or not a number (a ROCm "gfx90a")."""
  try:
    return tuple(int(part) for part in capability.split("."))
  except (AttributeError, ValueError):
    return ()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
  """The first CPU's flags from /proc/cpuinfo; none where it cannot be read (not Linux)."""
  try:
    lines = cpuinfo.read_text().splitlines()
  except OSError:
    return set()
  for line in lines:
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      return set(value.split())
  return set()


def bf16_speedup(shape=(4096, 256, 1024), repeats: int = 3) -> float:
  """float32 time over bfloat16 time of one [M, K] x [K, N] product accumulated in float32.

  A transformer-sized product, as the model's dense layers take it; each
  dtype compiles and warms up once, then the best of `repeats` counts.
  """
  M, K, N = shape
  product = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  best = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    a_MK, b_KN = jnp.ones((M, K), dtype), jnp.ones((K, N), dtype)
    product(a_MK, b_KN).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      product(a_MK, b_KN).block_until_ready()
      times.append(time.perf_counter() - start)
    best[dtype] = min(times)
  return best[jnp.float32] / best[jnp.bfloat16]
