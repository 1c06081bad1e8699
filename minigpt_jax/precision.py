"""`config.model.dtype = "auto"`: the compute dtypes this machine trains and decodes fastest in.

bfloat16 has float32's range, so it needs no loss scaling; it pays where the
hardware multiplies it natively: TPUs, NVIDIA GPUs of compute capability 8.0
and up (Ampere's tensor cores), and CPUs with AMX or AVX512-BF16 units, if
XLA uses them there, which only a measurement tells. Elsewhere bfloat16
products are emulated and slower, so "auto" keeps float32. It never picks
float16, which needs loss scaling (ask for it with --config.model.dtype).

Training and decoding are chosen apart: a train step's large products may
pay in bfloat16 where a decode step's batch-1 products do not. On a CPU with
bfloat16 units each is measured (`bf16_speedup`: a transformer layer's
products as the train step forms them, forward and backward, and as the
decoder does, one token at a time), once per CPU model and JAX version: the
ratios are cached on disk (`cache_file`), so start-up stays fast.

Owns: `choose` (training) and `choose_decode`: a dtype setting to a dtype and
the reason; `resolve`. May import: JAX, `products`, `support.files` and the standard library.
"""

import functools
import json
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from minigpt_jax import products
from minigpt_jax.errors import UserError
from minigpt_jax.support import files

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 products
MIN_SPEEDUP = 1.25  # bfloat16 products must beat float32 by this much to be chosen on a CPU
FLOAT16_HINT = "--config.model.dtype=float16 for loss-scaled float16"


class Choice(NamedTuple):
  dtype: str
  reason: str


@functools.cache
def choose(setting: str) -> Choice:
  """The training dtype of a `config.model.dtype` value and why; "auto" looks at the first
  device. Cached: a CPU measures at most once per process (and per machine: `cache_file`)."""
  return _choose(setting, "train")


@functools.cache
def choose_decode(setting: str) -> Choice:
  """As `choose`, for decoding (sample.py, evaluate.py, the end-of-run sample)."""
  return _choose(setting, "decode")


def _choose(setting: str, kind: str) -> Choice:
  if setting != "auto":
    return Choice(setting, "asked for")
  device = jax.devices()[0]
  return pick(device.platform, getattr(device, "compute_capability", None), cpu_flags(),
              lambda: cached_speedup(kind), kind)


def resolve(setting: str) -> str:
  """ModelConfig's `read` for dtype: the model always sees a concrete dtype."""
  return choose(setting).dtype


def pick(platform: str, capability: str | None, flags: set[str],
         speedup: Callable[[], float], kind: str = "train") -> Choice:
  """The rules of "auto", pure but for `speedup()` (bfloat16's speed over float32's at `kind`,
  "train" or "decode"), called only where they need a measurement."""
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
  ratio, what = speedup(), {"train": "train-step", "decode": "decode-step"}[kind]
  if ratio >= MIN_SPEEDUP:
    return Choice("bfloat16", f"CPU has {', '.join(units)}; bf16 {what} products {ratio:.2f}x "
                  "faster")
  return Choice("float32", f"CPU has {', '.join(units)} but bf16 {what} products are only "
                f"{ratio:.2f}x as fast as float32 (under {MIN_SPEEDUP}x)")


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


def cache_file(environ=os.environ) -> Path:
  """Where measured ratios are kept: beside the compile cache (support/compile_cache.py)."""
  if environ.get("MINIGPT_CACHE_DIR"):
    return Path(environ["MINIGPT_CACHE_DIR"]).expanduser() / "precision.json"
  base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "minigpt_jax" / "precision.json"


def cached_speedup(kind: str, path: Path | None = None, measure=None) -> float:
  """`bf16_speedup(kind)`, measured once per CPU model, flags and JAX version."""
  path = path or cache_file()
  units = ",".join(sorted(set(BF16_UNITS) & cpu_flags()))
  key = f"{kind} {_cpu_model()} ({units}) jax {jax.__version__}"
  try:
    known = json.loads(path.read_text())
  except (OSError, ValueError):
    known = {}
  if key not in known:
    known[key] = (measure or bf16_speedup)(kind)
    try:  # atomic: processes starting together never read half a file
      path.parent.mkdir(parents=True, exist_ok=True)
      files.write_text(path, json.dumps(known, indent=1))
    except (OSError, UserError):
      pass  # a read-only home: measured again next time
  return known[key]


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
  try:
    lines = cpuinfo.read_text().splitlines()
  except OSError:
    return "unknown"
  return next((line.partition(":")[2].strip() for line in lines
               if line.startswith("model name")), "unknown")


def bf16_speedup(kind: str = "train", width: int = 256, rows: int = 4096,
                 repeats: int = 3) -> float:
  """float32 time over bfloat16 time of a transformer MLP's products, as `kind` runs them.

  "train": [rows, width] through width -> 4 width -> width, forward and both
  backward products (`products.einsum`, the tricks' forms). "decode": the
  same layers' forward for 8 batch-1 tokens in a row. Each dtype compiles and
  warms up once, then the best of `repeats` counts.
  """
  rows = rows if kind == "train" else 1

  def mlp(x, w1, w2, dtype):
    h = jax.nn.relu(products.einsum("mk,kn->mn", x, w1, dtype, True))
    return products.einsum("mk,kn->mn", h, w2, dtype, True)

  def run(x, w1, w2, dtype):
    if kind == "train":
      return jax.grad(lambda ws: mlp(x, *ws, dtype).sum())((w1, w2))
    return jax.lax.fori_loop(0, 8, lambda _, x: mlp(x, w1, w2, dtype), x)

  best = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    step = jax.jit(functools.partial(run, dtype=dtype))
    args = (jnp.ones((rows, width)), jnp.full((width, 4 * width), 0.01),
            jnp.full((4 * width, width), 0.01))
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times.append(time.perf_counter() - start)
    best[dtype] = min(times)
  return best[jnp.float32] / best[jnp.bfloat16]
