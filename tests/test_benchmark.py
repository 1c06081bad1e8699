"""launch/benchmark.py and minigpt_jax/tools/benchmark.py: the JSON line, FLOPs, errors, torch."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from minigpt_jax.errors import UserError
from minigpt_jax.support import hugepages
from minigpt_jax.tools import benchmark, op_time
from minigpt_jax.model import ModelConfig
from configs import shakespeare_cpu_speedrun as speedrun

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--config.model.n_layer=1", "--config.model.n_embed=32", "--config.model.block_size=16",
          "--config.train.batch_size=4", "--steps=3", "--sample_tokens=8"]
TINY = ["--config=configs/frost_cpu.py", *SHRINK]
FIELDS = {"config", "backend", "device_kind", "devices", "params", "vocab_size", "dtype",
          "dtype_reason", "decode_dtype", "decode_dtype_reason",
          "batch_size", "block_size", "steps", "steps_per_dispatch", "sample_tokens",
          "compile_s", "steps_per_s", "tokens_per_s", "flops_per_token", "achieved_flops", "mfu",
          "sample_naive_tok_per_s", "sample_kv_tok_per_s", "sample_kv_batch16_tok_per_s",
          "op_ms_per_step", "peak_memory_bytes", "peak_memory_source", "huge_pages",
          "compile_cache", "repeats",
          "cpu_model", "cpu_extensions", "cpu_cores", "jax_version", "jaxlib_version",
          "torch_version"}
RATIOS = ("train_speedup", "sample_kv_speedup_vs_torch_naive",
          "sample_naive_speedup_vs_torch_naive")
TORCH_FIELDS = {"torch_command", "torch_mode", "torch_impl", "torch_threads", "torch_params",
                "torch_steps_per_s", "torch_tokens_per_s", "torch_naive_sample_tok_per_s",
                *RATIOS, *(f"{r}_runs" for r in RATIOS)}


def _auto_reason(kind: str) -> str:
  """The form of a CPU's "auto" reason (precision.pick), measured or not."""
  measured = rf"bf16 {kind}-step products (\d+\.\d\dx faster|are only \d+\.\d\dx as fast.*)"
  return rf"this CPU has no AMX or AVX512-BF16|CPU has [\w, ]+(; | but ){measured}"


def _cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _json_line(result) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


def test_cli_prints_one_json_line_with_the_documented_fields():
  out = _json_line(_cli(*TINY, "--config.train.steps_per_dispatch=2", "--config.model.dtype=auto",
                        "--op_time"))
  assert set(out) == FIELDS
  for kind, field in (("train", "dtype"), ("decode", "decode_dtype")):  # the form, not a rerun
    assert re.fullmatch(_auto_reason(kind), out[f"{field}_reason"]), out[f"{field}_reason"]
    assert out[field] == ("bfloat16" if out[f"{field}_reason"].endswith("faster") else "float32")
  assert out["config"] == "frost_cpu" and out["backend"] == "cpu"
  assert out["steps"] == 4  # 3 steps asked, run in calls of 2
  assert out["steps_per_dispatch"] == 2 and out["repeats"] == 1
  for field in ("params", "flops_per_token", "peak_memory_bytes"):
    assert isinstance(out[field], int) and out[field] > 0, field
  for field in ("compile_s", "steps_per_s", "tokens_per_s", "achieved_flops",
                "sample_naive_tok_per_s", "sample_kv_tok_per_s", "sample_kv_batch16_tok_per_s"):
    assert isinstance(out[field], float) and out[field] > 0, field
  assert out["tokens_per_s"] == pytest.approx(out["steps_per_s"] * 4 * 16, rel=1e-3)
  assert out["achieved_flops"] == pytest.approx(out["flops_per_token"] * out["tokens_per_s"],
                                                rel=1e-3)
  assert out["mfu"] is None  # no known peak on CPU
  assert out["peak_memory_source"] == "host_rss"
  assert out["huge_pages"] is hugepages.available()  # the launcher restarted itself with them
  assert out["compile_cache"] is False  # compile_s is a compilation, not a cache load
  assert out["cpu_cores"] >= 1 and isinstance(out["cpu_extensions"], list)
  assert isinstance(out["jaxlib_version"], str)
  # --op_time: the traced call's ops by model part; on XLA:CPU the products are found
  assert list(out["op_ms_per_step"]) == list(op_time.PARTS)
  assert out["op_ms_per_step"]["products"] > 0
  assert all(ms >= 0 for ms in out["op_ms_per_step"].values())


_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx_vnni amx_tile amx_bf16 aes

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx_vnni amx_tile amx_bf16 aes
"""


def test_cpu_info_names_the_model_and_its_vector_extensions():
  assert benchmark.cpu_info(_CPUINFO) == (
      "Intel(R) Xeon(R) Platinum 8480+",
      ["amx_bf16", "amx_tile", "avx", "avx2", "avx512bw", "avx512f", "avx_vnni", "fma"])
  assert benchmark.cpu_info("Features\t: fp asimd sve crc32\n") == (None, ["asimd", "sve"])
  assert benchmark.cpu_info("") == (None, [])


def test_machine_without_proc_cpuinfo_leaves_the_cpu_unnamed(tmp_path):
  info = benchmark.machine(tmp_path / "no_cpuinfo")
  assert info["cpu_extensions"] == [] and info["cpu_cores"] >= 1
  assert info["jaxlib_version"] and info["jax_version"]


def test_flops_per_token_matches_a_hand_count():
  # frost_cpu's model with 65 characters: C=64, L=4, T=32, V=65.
  # Per block: ln1, ln2 4C + qkv 3C^2 + proj C^2+C + fc 4C^2+4C + proj 4C^2+C = 12C^2+10C.
  # N = 4 * 49_792 + ln_f 128 + lm_head 64*65+65 = 203_521 (embeddings excluded).
  # 6N = 1_221_126; attention 12 * L * T * C = 98_304.
  cfg = ModelConfig(name="gpt", vocab_size=65, block_size=32, n_embed=64, n_heads=4, n_layer=4)
  assert benchmark.flops_per_token(cfg) == 1_221_126 + 98_304
  # Tied: the token table is the head's kernel (counted), and the head has no bias.
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert benchmark.flops_per_token(tied) == 1_221_126 - 6 * 65 + 98_304
  assert benchmark.flops_per_token(ModelConfig(name="bigram", vocab_size=65, block_size=8)) == 0


def test_peak_flops_by_device_kind_and_dtype():
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
  assert benchmark.peak_flops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756e12)
  assert benchmark.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == pytest.approx(156e12)
  assert benchmark.peak_flops("Tesla T4", "float32") == pytest.approx(8.1e12)
  assert benchmark.peak_flops("Tesla T4", "bfloat16") is None  # no bf16 units
  assert benchmark.peak_flops("NVIDIA L40S", "float32") is None  # not the L4
  assert benchmark.peak_flops("cpu", "float32") is None


def test_compare_takes_ratios_within_each_pair_then_medians():
  ours = [{"steps_per_s": s, "sample_kv_tok_per_s": 100.0, "sample_naive_tok_per_s": 50.0}
          for s in (10.0, 30.0, 20.0)]
  torch = [{"impl": "torch-eager", "threads": 2, "params": 7, "steps_per_s": t,
            "tokens_per_s": 1.0, "naive_sample_tok_per_s": 25.0} for t in (5.0, 10.0, 20.0)]
  out = benchmark.compare(list(zip(ours, torch)))
  assert out["train_speedup_runs"] == [2.0, 3.0, 1.0] and out["train_speedup"] == 2.0
  assert out["sample_kv_speedup_vs_torch_naive"] == 4.0
  assert out["sample_naive_speedup_vs_torch_naive"] == 2.0
  assert out["torch_steps_per_s"] == 10.0
  assert benchmark.median_of([{"a": 1, "mfu": None}, {"a": 2, "mfu": None}],
                             fields=("mfu",)) == {"a": 1, "mfu": None}


def test_the_twin_mirrors_the_config_in_our_dtype_or_not_at_all():
  """Like for like: the twin of the same model and batch, autocast bfloat16 for ours."""
  config = speedrun.get_config()
  command, mode = benchmark.torch_command(config, Path("s.txt"), 3, 8, "float32")
  assert mode == "float32" and "--bf16" not in command
  assert command[:3] == [sys.executable, "-m", "minigpt_jax.tools.torch_twin"]
  m = config.model
  assert set(command[3:]) == {
      f"--block_size={m.block_size}", f"--n_embed={m.n_embed}", f"--n_heads={m.n_heads}",
      f"--n_layer={m.n_layer}", f"--dropout={m.dropout}", "--activation=gelu",
      "--position=rope", "--bias", "--no-qkv_bias", "--tie_embeddings",
      f"--batch_size={config.train.batch_size}",
      f"--learning_rate={config.train.learning_rate}",
      "--text=s.txt", "--steps=3", "--sample_tokens=8"}
  command, mode = benchmark.torch_command(config, Path("s.txt"), 3, 8, "bfloat16")
  assert mode == "autocast bfloat16" and command[-1] == "--bf16"
  with pytest.raises(UserError, match="no float16 mode"):
    benchmark.torch_command(config, Path("s.txt"), 3, 8, "float16")
  config.data.tokenizer = "bpe"
  with pytest.raises(UserError, match="reads characters"):
    benchmark.torch_command(config, Path("s.txt"), 3, 8, "float32")


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/bigram.py", *SHRINK, "--compare-torch"],
     "the PyTorch twin is a GPT, and this config's model is 'bigram'"),
    ([*TINY, "--steps=0"], "--steps is 0"),
    ([*TINY, "--no_such_flag=1"], "no_such_flag"),
    ([*TINY, "--config.model.no_such_field=1"], "no such config field"),
    (["--config=configs/no_such_config.py"], "configs/no_such_config.py does not exist"),
])
def test_bad_flags_give_one_error_line(args, expected):
  result = _cli(*args)
  assert_one_line_error(result, expected)
  assert result.stdout == ""


def test_compare_torch_adds_torch_figures_and_median_ratios():
  pytest.importorskip("torch")
  out = _json_line(_cli(*TINY, "--compare-torch", "--repeats=2"))
  assert set(out) == FIELDS | TORCH_FIELDS
  assert out["torch_params"] == out["params"] and out["repeats"] == 2  # the same model
  assert out["torch_command"].startswith("python -m minigpt_jax.tools.torch_twin ")
  assert out["dtype"] == "float32" and out["torch_mode"] == "float32"
  for ratio in RATIOS:
    assert out[ratio] > 0 and len(out[f"{ratio}_runs"]) == 2
  assert out["train_speedup"] == pytest.approx(
      sum(out["train_speedup_runs"]) / 2, rel=1e-3)  # the median of two
