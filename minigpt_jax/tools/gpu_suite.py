"""`launch/benchmark.py --suite=gpu`: training speed of the GPU configs, one row each.

Rows (`plan`): frost_t4 and shakespeare_char, each in float32 and bfloat16,
at fsdp 1 and, with 2 or more GPUs, fsdp 2. A row's mesh takes the largest
power of two of the GPUs (data x fsdp), so the configs' batch of 64 splits
evenly. Each row is `benchmark.measure_train` under the config as it trains
(dropout included): compilation, a warm-up call, then `steps` timed steps.

A row's MFU is the model FLOPs done per second (`benchmark.flops_per_token`)
over the dense peak of every device of its mesh (`peak`, from
`benchmark.PEAK_TFLOPS`: float32 against TF32's peak where the GPU has
tensor cores for it, FP32's before). `est_5000_steps_s` is compilation plus
5000 steps at the timed speed: the configs' training without its
evaluations and checkpoints.

`plan`, `peak`, `row` and `summary` are pure and `measure_row` runs on any
backend, so the tests check them on CPU; `run` refuses a machine without a GPU.

Owns: the suite's rows, their fields and order, the peak's source.
May import: tools.benchmark, errors, model, the configs package.
"""

import importlib
import re
from collections.abc import Iterator

import jax
import ml_collections

from minigpt_jax.errors import UserError
from minigpt_jax.model import count_params
from minigpt_jax.tools import benchmark

CONFIGS = ("frost_t4", "shakespeare_char")
DTYPES = ("float32", "bfloat16")
STEPS = 500  # timed steps per row, after compilation and a warm-up call
ESTIMATED_STEPS = 5000  # both configs' config.train.steps
_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def mesh_devices(num_gpus: int) -> int:
  """The largest power of two <= num_gpus: every row's mesh, so a batch of 64 splits."""
  return 1 << (max(num_gpus, 1).bit_length() - 1)


def plan(num_gpus: int) -> list[tuple[str, str, int]]:
  """(config, dtype, fsdp) of each row, in order: fsdp 2 only with 2 or more GPUs."""
  fsdps = (1, 2) if mesh_devices(num_gpus) >= 2 else (1,)
  return [(name, dtype, fsdp) for name in CONFIGS for fsdp in fsdps for dtype in DTYPES]


def suite_config(name: str, dtype: str, fsdp: int, devices: int) -> ml_collections.ConfigDict:
  """configs/NAME.py computing in `dtype` on a (devices / fsdp) x fsdp mesh."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.dtype = dtype
  if "parallel" in config:  # the data x fsdp mesh (before it: data parallel on all devices)
    config.parallel.update(data=devices // fsdp, fsdp=fsdp)
  return config


def peak(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(dense peak FLOP/s of one device, what that peak is), or (None, None) where unknown.

  The source names the table's entry and the units the peak is for: TF32
  for float32 on GPUs that also have bf16 units (Ampere on: the default
  matmul precision runs float32 there), FP32 before (T4, V100).
  """
  entry = benchmark.peak_entry(device_kind)
  flops = benchmark.peak_flops(device_kind, dtype)
  if flops is None:
    return None, None
  pattern, peaks = entry
  units = _PRECISION.get(dtype) or ("tf32" if peaks["bfloat16"] else "fp32")
  name = " ".join(re.sub(r"\\b|\.\*", " ", pattern).split())
  return flops, f"{name} {units} dense (NVIDIA data sheet)"


def row(name: str, dtype: str, fsdp: int, timing: dict, *, params: int, flops_per_token: int,
        device_kind: str, devices: int, config: ml_collections.ConfigDict,
        versions: dict) -> dict:
  """One JSON row from `benchmark.measure_train`'s timing of `config` on `devices` devices."""
  peak_one, source = peak(device_kind, dtype)
  achieved = flops_per_token * timing["tokens_per_s"]
  peak_all = None if peak_one is None else peak_one * devices
  return {
      "config": name, "dtype": dtype, "fsdp": fsdp, "data": devices // fsdp,
      "devices": devices, "device_kind": device_kind, "params": params,
      "batch_size": config.train.batch_size, "block_size": config.model.block_size,
      "steps_per_dispatch": config.train.steps_per_dispatch, "steps": timing["steps"],
      "steps_per_s": timing["steps_per_s"], "tokens_per_s": timing["tokens_per_s"],
      "flops_per_token": flops_per_token, "achieved_flops": achieved,
      "peak_flops": peak_all, "peak_source": source,
      "mfu": None if peak_all is None else achieved / peak_all,
      "compile_s": timing["compile_s"],
      "est_5000_steps_s": timing["compile_s"] + ESTIMATED_STEPS / timing["steps_per_s"],
      "jax_version": versions["jax_version"], "jaxlib_version": versions["jaxlib_version"],
  }


def measure_row(name: str, dtype: str, fsdp: int, config: ml_collections.ConfigDict,
                steps: int) -> dict:
  """Times `steps` training steps of `config` (any backend) and returns its row."""
  timing = benchmark.measure_train(config, steps)
  state = timing.pop("state")
  leaf = jax.tree.leaves(state.params)[0]
  return row(name, dtype, fsdp, timing, params=count_params(state.params),
             flops_per_token=benchmark.flops_per_token(state.model_cfg),
             device_kind=next(iter(leaf.sharding.device_set)).device_kind,
             devices=len(leaf.sharding.device_set), config=config,
             versions=benchmark.machine())


def run(steps: int = STEPS) -> Iterator[dict]:
  """Each row of `plan`, measured in turn on this machine's GPUs."""
  if jax.default_backend() != "gpu":
    raise UserError(f"--suite=gpu needs a GPU but JAX's backend is {jax.default_backend()!r}; "
                    'install the CUDA build (pip install "jax[cuda12]") on a GPU machine')
  devices = mesh_devices(jax.device_count())
  for name, dtype, fsdp in plan(devices):
    yield measure_row(name, dtype, fsdp, suite_config(name, dtype, fsdp, devices), steps)


def summary(result: dict) -> str:
  """One readable line per row, for stderr."""
  mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
  return (f"{result['config']} {result['dtype']} fsdp {result['fsdp']} on "
          f"{result['devices']} x {result['device_kind']}: {result['steps_per_s']:.1f} steps/s, "
          f"MFU {mfu}, compile {result['compile_s']:.1f} s, 5000 steps in about "
          f"{result['est_5000_steps_s']:.0f} s")
