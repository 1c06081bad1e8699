"""Training and sampling speed of a config, as one JSON line on stdout.

  python launch/benchmark.py --config=configs/frost_cpu.py [--steps=100] [--sample_tokens=500]
  python launch/benchmark.py --config=configs/frost_cpu.py --compare-torch --repeats=3
  python launch/benchmark.py --config=configs/frost_t4.py --steps=10 --op_time
  python launch/benchmark.py --suite=gpu

Fields: config, backend, device_kind, params, compile_s (lower + compile of the
train step), steps_per_s and tokens_per_s (steady state, in calls of
config.train.steps_per_dispatch steps), flops_per_token (6N + 12LTC, see
minigpt_jax/tools/benchmark.py), achieved_flops, mfu (null on CPU or an unknown
GPU), sample_naive_tok_per_s, sample_kv_tok_per_s, sample_kv_batch16_tok_per_s
(from a 1-token prompt, compile excluded), op_ms_per_step (null unless
--op_time: one more compiled call of the train step runs under jax.profiler, and
this is its ops' time in ms a step by model part, products, optimizer,
dropout, casts, copies, layernorm, softmax and other, summed over threads:
minigpt_jax/tools/op_time.py), peak_memory_bytes and
peak_memory_source ("device" or "host_rss"), dtype (the compute dtype, "auto"
resolved by minigpt_jax/precision.py) and dtype_reason, and extras (devices,
vocab_size, batch_size, block_size, steps, steps_per_dispatch, sample_tokens,
repeats, huge_pages: whether malloc had transparent huge pages, see
minigpt_jax/support/hugepages.py, and compile_cache: whether compile_s was a load
from the persistent compilation cache's folder, off here unless
--compile_cache=true), and the machine: cpu_model, cpu_extensions (its
vector and matrix units: avx2, avx512*, amx*, ...; empty where the OS does not
say), cpu_cores (those this process may use), jax_version, jaxlib_version and
torch_version (null without torch).

--compare-torch then runs the project's PyTorch twin of the same config
(minigpt_jax/tools/torch_twin.py: the same model, batch shape and peak
learning rate; GPT configs on characters) on the same corpus, steps and
sample length, and adds to the same line torch_command (the twin's command
line, to rerun it alone), torch_mode ("float32", or "autocast bfloat16": the
twin's --bf16 when our dtype is bfloat16, so the pair is like for like; it has
no float16 mode, so float16 is refused), torch_impl, torch_threads,
torch_params, torch_steps_per_s, torch_tokens_per_s, torch_naive_sample_tok_per_s and the
ratios train_speedup, sample_kv_speedup_vs_torch_naive and
sample_naive_speedup_vs_torch_naive. --repeats=N measures ours then torch N
times: speeds and ratios are medians, each ratio's values in <ratio>_runs.
A readable summary goes to stderr.

--suite=gpu (no --config) times frost_t4 and shakespeare_char in float32 and
bfloat16, at fsdp 1 and, with 2 or more GPUs, fsdp 2: one JSON line per row
(minigpt_jax/tools/gpu_suite.py names the fields), --steps timed steps each
(500 unless given). It needs a GPU.
"""

import json
import shlex
import sys
from pathlib import Path

import _preamble  # first: the installed package, or one error line

_preamble.start(__name__)  # before JAX loads: the process may restart

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import parallel, precision  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402
from minigpt_jax.tools import benchmark, gpu_suite  # noqa: E402
from minigpt_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed training steps (after a warm-up call).")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 500, "New tokens per timed sample.")
_COMPARE = flags.DEFINE_bool("compare-torch", False,
                             "Also time the PyTorch twin of the config and report the ratios.")
_OP_TIME = flags.DEFINE_bool("op_time", False, "Also trace one compiled call of the train step "
                             "and add op_ms_per_step: its ops' time by model part.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Measurements (ours, then torch) to take medians of.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the CPU into N devices, data-parallel, as train.py does.")
_SUITE = flags.DEFINE_enum("suite", None, ["gpu"], "Instead of --config: the GPU configs' "
                           "training speed, one JSON line per config, dtype and fsdp.")
flags.register_multi_flags_validator(
    ["config", "suite"], lambda given: given["config"] is not None or given["suite"] is not None,
    "pass --config=configs/NAME.py, or --suite=gpu on a GPU machine")


def _rounded(value):
  """Floats to 5 significant digits, far finer than the run-to-run noise."""
  if isinstance(value, float):
    return float(f"{value:.5g}")
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  return value


def _gpu_suite():
  if flags.FLAGS["config"].present or _COMPARE.value:
    raise UserError("--suite=gpu runs its own configs (frost_t4, shakespeare_char) and no "
                    "torch; drop --config and --compare-torch")
  steps = _STEPS.value if flags.FLAGS["steps"].present else gpu_suite.STEPS
  for row in gpu_suite.run(steps):
    print(json.dumps(_rounded(row)), flush=True)
    print(gpu_suite.summary(row), file=sys.stderr)


def main():
  if _CPU_DEVICES.value is not None:
    parallel.set_cpu_devices(_CPU_DEVICES.value)
  for name, value in (("steps", _STEPS.value), ("sample_tokens", _SAMPLE_TOKENS.value),
                      ("repeats", _REPEATS.value)):
    if value < 1:
      raise UserError(f"--{name} is {value}; use a positive integer")
  if _SUITE.value == "gpu":
    return _gpu_suite()
  config = _CONFIG.value
  name = Path(flags.FLAGS["config"].config_filename.split(":", 1)[0]).stem
  if _COMPARE.value:
    benchmark.check_torch()
    twin, torch_mode = benchmark.torch_command(
        config, benchmark.corpus_path(config), _STEPS.value, _SAMPLE_TOKENS.value,
        precision.resolve(config.model.dtype))  # like for like: bfloat16 runs torch's --bf16

  runs, pairs = [], []
  for _ in range(_REPEATS.value):
    ours = benchmark.measure(config, _STEPS.value, _SAMPLE_TOKENS.value, _OP_TIME.value)
    runs.append(ours)
    if _COMPARE.value:
      pairs.append((ours, benchmark.run_torch(twin)))
  result = {"config": name, **benchmark.median_of(runs), "repeats": _REPEATS.value}
  if _COMPARE.value:
    result.update(torch_command=shlex.join(["python", *twin[1:]]), torch_mode=torch_mode)
    result.update(benchmark.compare(pairs))
  print(json.dumps(_rounded(result)))
  print(benchmark.summary_line(result), file=sys.stderr)


if __name__ == "__main__":
  cli.run(main, compile_cache_default=False)
