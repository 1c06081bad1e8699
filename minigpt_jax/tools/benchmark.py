"""Speed of training and sampling, for launch/benchmark.py and its tests.

Everything here measures one thing and returns plain numbers; flags, printing
and the choice of what to run live in the launcher. Timings are steady state:
compilation and a warm-up call come first, and each timed stretch ends with
`jax.block_until_ready`, so asynchronous dispatch cannot hide work.

`machine` names what ran it (CPU model and vector extensions, cores, library
versions), so ratios from different machines can be told apart.

`run_torch` runs the project's PyTorch twin (torch_twin.py) of the same config
in a subprocess on the same corpus, under autocast bfloat16 when ours is
bfloat16 (`torch_command`), so `compare` can put the two side by side, like
for like.

Owns: timing of training and decoding, FLOP counts, the machine's description,
the PyTorch twin's comparison.
May import: loop, tokens, train, sampling, model, parallel, cpu_tricks, data, precision,
support.hugepages, tools.op_time.
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from minigpt_jax import cpu_tricks, data, loop, parallel, precision, sampling, tokens, train
from minigpt_jax.support import hugepages
from minigpt_jax.tools import op_time
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, count_params, init_params

# The three decoders timed, as (result field, method, batch size).
SAMPLERS = (("sample_naive_tok_per_s", "naive", 1),
            ("sample_kv_tok_per_s", "kv", 1),
            ("sample_kv_batch16_tok_per_s", "kv", 16))

# Dense peak TFLOP/s (no structured sparsity) from NVIDIA's data sheets, by
# compute dtype. float32 is what XLA's default matmul precision runs: TF32 on
# tensor cores from Ampere on (A100, L4, H100, H200), plain FP32 before (T4,
# V100). None: the GPU has no fast path for that dtype (bf16 before Ampere).
# Matched against `device_kind` in order; the first pattern found wins.
PEAK_TFLOPS = (
    (r"h200", {"float32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    (r"h100.*pcie", {"float32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    (r"h100", {"float32": 494.7, "bfloat16": 989.4, "float16": 989.4}),  # SXM
    (r"a100", {"float32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    (r"\bl4\b", {"float32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
    (r"\bt4\b", {"float32": 8.1, "bfloat16": None, "float16": 65.0}),
    (r"v100", {"float32": 15.7, "bfloat16": None, "float16": 125.0}),  # SXM2
)


def flops_per_token(cfg: ModelConfig) -> int:
  """Model FLOPs per trained token: forward and backward, the PaLM/nanoGPT estimate.

    flops_per_token = 6 * N + 12 * L * T * C

  N counts the non-embedding parameters (every parameter but the token and
  position tables, which are lookups, not matmuls; the untied lm_head is
  counted, and a tied head's token table, the head's matmul, as nanoGPT
  counts it): each weight does one multiply-add (2 FLOPs) per token forward and
  two backward, hence 6 * N. The second term is attention, which has no
  weights: per layer and token, q.k over T keys and the weighted sum of T
  values are 2 * T * C FLOPs each forward, 3x that with the backward pass. It
  counts the full T x T scores, as PaLM does, though causal masking makes half
  of them unused; biases and LayerNorm parameters are in N, as in nanoGPT.
  A bigram model (a lookup table) has N = 0 and no attention: 0 FLOPs.
  """
  shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
  lookups = ("pos_embed", "table") if cfg.tie_embeddings else ("tok_embed", "pos_embed", "table")
  embeddings = sum(count_params(shapes[name]) for name in lookups if name in shapes)
  n_non_embedding = count_params(shapes) - embeddings
  attention = 12 * cfg.n_layer * cfg.block_size * cfg.n_embed if cfg.name == "gpt" else 0
  return 6 * n_non_embedding + attention


def peak_entry(device_kind: str) -> tuple[str, dict] | None:
  """The PEAK_TFLOPS row (pattern, peaks by dtype) that names this device, or None."""
  kind = device_kind.lower()
  return next(((p, peaks) for p, peaks in PEAK_TFLOPS if re.search(p, kind)), None)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for `dtype`, or None (CPU, unknown GPU or dtype)."""
  entry = peak_entry(device_kind)
  tflops = None if entry is None else entry[1].get(dtype)
  return None if tflops is None else tflops * 1e12


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the first device's peak allocation, else this process' peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "host_rss"  # Linux: KiB


def measure_train(config: ml_collections.ConfigDict, steps: int, trace: bool = False) -> dict:
  """Compile time and steady-state speed of `train.jit_train_steps` under `config`.

  The step function is lowered and compiled ahead of time (`compile_s`), run
  once as a warm-up, then timed over ceil(steps / K) calls of K =
  config.train.steps_per_dispatch steps each. Also returns the trained
  `state` (for sampling) and the vocabulary size; with `trace`, one more call
  runs under the profiler, and `op_ms_per_step` is its ops' time by model
  part (`op_time.by_part`), else None.
  """
  mesh = loop.make_mesh(config)
  corpus = tokens.load_corpus(config)
  state = train.create_train_state(config, corpus.tokenizer.vocab_size, mesh)
  train_N = parallel.put_replicated(corpus.train_ids, mesh)
  B, T, K = config.train.batch_size, config.model.block_size, config.train.steps_per_dispatch

  start = time.perf_counter()
  run_steps = train.jit_train_steps.lower(state, train_N, batch_size=B, block_size=T,
                                          num_steps=K, mesh=mesh).compile()
  compile_s = time.perf_counter() - start
  state, metrics = run_steps(state, train_N)  # warm-up
  jax.block_until_ready(metrics)

  calls = math.ceil(steps / K)
  start = time.perf_counter()
  wait = cpu_tricks.wait_each_call(mesh)
  for _ in range(calls):
    state, metrics = run_steps(state, train_N)
    if wait:
      jax.block_until_ready(metrics)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  op_ms = None
  if trace:
    state, events = op_time.trace_calls(lambda s: run_steps(s, train_N), state, calls=1)
    op_ms = op_time.by_part(events, run_steps.as_text(), steps=K)
  return {"state": state, "vocab_size": corpus.tokenizer.vocab_size, "compile_s": compile_s,
          "steps": calls * K, "steps_per_s": calls * K / seconds,
          "tokens_per_s": calls * K * B * T / seconds, "op_ms_per_step": op_ms}


def measure_sampling(model_cfg: ModelConfig, params, num_tokens: int, seed: int = 0) -> dict:
  """Tokens/s of each of SAMPLERS, from a 1-token prompt (token 0) as the twin's decode.

  Each decoder is called once to compile and warm up, then timed over one
  call; a batch's tokens/s counts every row.
  """
  params = jax.device_put(params, jax.local_devices()[0])
  key = jax.random.PRNGKey(seed)
  speeds = {}
  for field, method, batch in SAMPLERS:
    generate = sampling.make_generate(model_cfg, method=method)
    prompt_B1 = jnp.zeros((batch, 1), jnp.int32)
    jax.block_until_ready(generate(params, prompt_B1, key, num_tokens))
    start = time.perf_counter()
    jax.block_until_ready(generate(params, prompt_B1, key, num_tokens))
    speeds[field] = batch * num_tokens / (time.perf_counter() - start)
  return speeds


# CPU flags that decide how fast XLA's and PyTorch's CPU kernels can be: x86
# vector and matrix units (AVX, AVX2, FMA, AVX-512, AMX), Arm's NEON and SVE.
_VECTOR_FLAG = re.compile(r"^(avx\w*|fma|amx\w*|asimd\w*|sve\w*)$")


def cpu_info(cpuinfo: str) -> tuple[str | None, list[str]]:
  """(model name, sorted vector extensions) from the text of /proc/cpuinfo."""
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())  # the first CPU's
  model = fields.get("model name") or fields.get("Model") or fields.get("cpu model")
  flags = (fields.get("flags") or fields.get("Features") or "").split()
  return model or None, sorted(f for f in set(flags) if _VECTOR_FLAG.match(f))


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict:
  """What ran a benchmark: CPU model, its vector extensions, cores, library versions.

  Off Linux (no /proc/cpuinfo) the model is `platform.processor()` or None
  and the extensions an empty list. torch_version is None without torch;
  The twin runs on this Python, so it is the torch of `--compare-torch`.
  """
  try:
    model, extensions = cpu_info(cpuinfo_path.read_text())
  except OSError:
    model, extensions = platform.processor() or None, []
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu_model": model, "cpu_extensions": extensions, "cpu_cores": cores,
          "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
          "torch_version": _version("torch")}


def measure(config: ml_collections.ConfigDict, steps: int, sample_tokens: int,
            trace: bool = False) -> dict:
  """One full measurement of ours: training, sampling, FLOPs and memory (`trace`:
  measure_train's op times too)."""
  trained = measure_train(config, steps, trace)
  state = trained.pop("state")
  model_cfg = state.model_cfg
  decode = precision.choose_decode(config.model.dtype)
  speeds = measure_sampling(dataclasses.replace(model_cfg, dtype=decode.dtype), state.params,
                            sample_tokens, seed=config.seed)
  device = jax.local_devices()[0]
  devices = len(jax.tree.leaves(state.params)[0].sharding.device_set)  # the run's mesh
  dtype = model_cfg.dtype
  fpt = flops_per_token(model_cfg)
  achieved = fpt * trained["tokens_per_s"]
  peak = peak_flops(device.device_kind, dtype)
  memory, memory_source = peak_memory()
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "devices": devices,
      "params": count_params(state.params),
      "vocab_size": trained["vocab_size"],
      "dtype": dtype,
      "dtype_reason": precision.choose(config.model.dtype).reason,
      "decode_dtype": decode.dtype,
      "decode_dtype_reason": decode.reason,
      "batch_size": config.train.batch_size,
      "block_size": config.model.block_size,
      "steps": trained["steps"],
      "steps_per_dispatch": config.train.steps_per_dispatch,
      "sample_tokens": sample_tokens,
      "compile_s": trained["compile_s"],
      "steps_per_s": trained["steps_per_s"],
      "tokens_per_s": trained["tokens_per_s"],
      "flops_per_token": fpt,
      "achieved_flops": achieved,
      # tokens_per_s counts every device's tokens, so the peak is every device's too
      "mfu": None if peak is None else achieved / (peak * devices),
      **speeds,
      "op_ms_per_step": trained["op_ms_per_step"],
      "peak_memory_bytes": memory,
      "peak_memory_source": memory_source,
      **machine(),
      "huge_pages": hugepages.enabled(),
      # compile_s is a cache load where this is true (launch/benchmark.py: off by default)
      "compile_cache": bool(jax.config.jax_enable_compilation_cache
                            and jax.config.jax_compilation_cache_dir),
  }


# Fields of `measure` that vary run to run; `median_of` takes their medians.
SPEED_FIELDS = ("steps_per_s", "tokens_per_s", "achieved_flops", "mfu",
                *(field for field, _, _ in SAMPLERS))


def median_of(runs: list[dict], fields=SPEED_FIELDS) -> dict:
  """The first run, with each of `fields` replaced by its median over `runs`.

  Other fields (compile_s, peak memory) are the first run's: later runs in
  the same process reuse its compiled programs.
  """
  merged = dict(runs[0])
  for field in fields:
    values = [r[field] for r in runs]
    merged[field] = None if None in values else statistics.median(values)
  return merged


# -- The PyTorch twin (torch_twin.py), run beside ours.

def twin_flags(config: ml_collections.ConfigDict) -> list[str]:
  """torch_twin.py's flags for the model and batch of `config`: the same network, batch
  shape and peak learning rate; a UserError for a config the twin cannot mirror."""
  model_config, data_config = config.model, config.data
  if model_config.name != "gpt":
    raise UserError(f"--compare-torch: the PyTorch twin is a GPT, and this config's model is "
                    f"{model_config.name!r}; use a GPT config or drop --compare-torch")
  if data_config.tokens or data_config.tokenizer != "char":
    raise UserError("--compare-torch: the PyTorch twin reads characters from a text file, and "
                    "this config trains on a token folder or BPE tokens; use a character "
                    "config or drop --compare-torch")
  flags = [f"--{name}={model_config[name]}" for name in
           ("block_size", "n_embed", "n_heads", "n_layer", "dropout", "activation", "position")]
  flags += [f"--{'' if model_config[name] else 'no-'}{name}"
            for name in ("bias", "qkv_bias", "tie_embeddings")]
  return flags + [f"--batch_size={config.train.batch_size}",
                  f"--learning_rate={config.train.learning_rate}"]


def check_torch() -> None:
  """A one-line error, before any work, if the twin cannot run."""
  # Not imported here: it would only add to this process' peak memory.
  if importlib.util.find_spec("torch") is None:
    raise UserError("--compare-torch needs PyTorch, which is not installed here; "
                    "pip install -r tests/requirements.txt")


# The twin's mode, and its flags, for each of our dtypes: like for like.
TORCH_MODES = {"float32": ("float32", []), "bfloat16": ("autocast bfloat16", ["--bf16"])}


def torch_command(config: ml_collections.ConfigDict, text_path: Path, steps: int,
                  sample_tokens: int, dtype: str) -> tuple[list[str], str]:
  """(command, mode): the twin of `config` on `text_path`, in the mode of our `dtype`."""
  if dtype not in TORCH_MODES:
    raise UserError(f"--compare-torch: the PyTorch twin has no {dtype} mode to compare with "
                    "ours; pass --config.model.dtype=float32 or bfloat16, or drop --compare-torch")
  mode, mode_flags = TORCH_MODES[dtype]
  return [sys.executable, "-m", "minigpt_jax.tools.torch_twin", *twin_flags(config),
          f"--text={text_path}", f"--steps={steps}", f"--sample_tokens={sample_tokens}",
          *mode_flags], mode


def run_torch(command: list[str]) -> dict:
  """The JSON line of a `torch_command`, run with this Python."""
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise UserError(f"the PyTorch twin failed (exit {result.returncode}): {last}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def corpus_path(config: ml_collections.ConfigDict) -> Path:
  """The text file our config trains on, for the twin's --text."""
  return Path(config.data.path) if config.data.path else data.resolve_corpus(config.data.corpus)


# Our speed over torch's, each as (ratio field, our field, the twin's field).
RATIOS = (("train_speedup", "steps_per_s", "steps_per_s"),
          ("sample_kv_speedup_vs_torch_naive", "sample_kv_tok_per_s", "naive_sample_tok_per_s"),
          ("sample_naive_speedup_vs_torch_naive", "sample_naive_tok_per_s",
           "naive_sample_tok_per_s"))
TORCH_FIELDS = ("steps_per_s", "tokens_per_s", "naive_sample_tok_per_s")


def compare(pairs: list[tuple[dict, dict]]) -> dict:
  """Torch's figures and our ratios over (ours, torch) pairs measured side by side.

  Each ratio is taken within a pair (same moment, same load), then the median
  over pairs is reported, with every pair's value in `<ratio>_runs`; torch's
  speeds are medians too, and its other fields those of the first run.
  """
  first = pairs[0][1]
  out = {"torch_impl": first["impl"], "torch_threads": first["threads"],
         "torch_params": first["params"],
         **{f"torch_{f}": statistics.median(t[f] for _, t in pairs) for f in TORCH_FIELDS}}
  for ratio, ours_field, torch_field in RATIOS:
    runs = [ours[ours_field] / torch[torch_field] for ours, torch in pairs]
    out[ratio] = statistics.median(runs)
    out[f"{ratio}_runs"] = runs
  return out


def summary_line(result: dict) -> str:
  """A one-line human-readable digest of `result` (launch/benchmark.py's JSON)."""
  line = (f"{result['config']} in {result['dtype']} on {result['backend']} "
          f"({result['device_kind']}): "
          f"{result['steps_per_s']:.1f} steps/s ({result['tokens_per_s']:,.0f} tok/s), "
          f"compile {result['compile_s']:.1f} s; sampling tok/s: "
          f"naive {result['sample_naive_tok_per_s']:,.0f}, "
          f"kv {result['sample_kv_tok_per_s']:,.0f}, "
          f"kv x16 {result['sample_kv_batch16_tok_per_s']:,.0f}")
  if result.get("mfu") is not None:
    line += f"; MFU {100 * result['mfu']:.1f}%"
  if result.get("op_ms_per_step"):
    line += "; op ms a step: " + ", ".join(f"{part} {ms:.0f}"
                                           for part, ms in result["op_ms_per_step"].items())
  if "train_speedup" in result:
    n = len(result["train_speedup_runs"])
    line += (f" | vs {result['torch_impl']} ({result['torch_mode']}"
             f"{f', median of {n}' if n > 1 else ''}): train {result['train_speedup']:.2f}x, "
             f"kv/naive {result['sample_kv_speedup_vs_torch_naive']:.2f}x, "
             f"naive/naive {result['sample_naive_speedup_vs_torch_naive']:.2f}x")
  return line
