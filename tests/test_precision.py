"""minigpt_jax.precision: every rule of dtype "auto", without the hardware it names."""

import pytest

from minigpt_jax import config as config_lib, precision
from minigpt_jax.model import ModelConfig


def _never():
  raise AssertionError("measured where the flags alone decide")


@pytest.mark.parametrize("platform, capability, flags, expected, words", [
    ("gpu", "9.0", set(), "bfloat16", ["capability 9.0", "tensor cores"]),
    ("gpu", "8.0", set(), "bfloat16", ["capability 8.0"]),
    ("gpu", "7.5", set(), "float32", ["capability 7.5", "--config.model.dtype=float16"]),
    ("gpu", None, set(), "float32", ["capability unknown"]),
    ("gpu", "gfx90a", set(), "float32", ["gfx90a"]),
    ("tpu", None, set(), "bfloat16", ["TPU"]),
    ("cpu", None, {"avx2", "fma"}, "float32", ["no AMX or AVX512-BF16"]),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_auto_follows_the_device_without_measuring(platform, capability, flags, expected, words):
  choice = precision.pick(platform, capability, flags, _never)
  assert choice.dtype == expected
  for word in words:
    assert word in choice.reason, (word, choice.reason)


@pytest.mark.parametrize("ratio, expected", [(2.1, "bfloat16"), (1.25, "bfloat16"),
                                             (1.1, "float32"), (0.4, "float32")])
def test_auto_on_a_cpu_with_bf16_units_measures_first(ratio, expected):
  choice = precision.pick("cpu", None, {"avx2", "amx_tile", "amx_bf16"}, lambda: ratio)
  assert choice.dtype == expected and "amx_bf16" in choice.reason
  assert f"{ratio:.2f}x" in choice.reason
  assert precision.pick("cpu", None, {"avx512_bf16"}, lambda: ratio).dtype == expected


def test_cpu_flags_come_from_proc_cpuinfo_or_are_none(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\n"
                     "processor\t: 1\nflags\t\t: fpu\n")
  assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
  assert precision.cpu_flags(tmp_path / "absent") == set()  # not Linux


@pytest.mark.parametrize("ratio", [1.6, 0.7])
def test_training_and_decoding_are_chosen_apart(ratio):
  """Each kind is measured on its own: bf16 may train faster and decode slower."""
  flags = {"avx512_bf16"}
  train = precision.pick("cpu", None, flags, lambda: ratio, "train")
  decode = precision.pick("cpu", None, flags, lambda: 1 / ratio, "decode")
  assert {train.dtype, decode.dtype} == {"bfloat16", "float32"}
  assert "train-step" in train.reason and "decode-step" in decode.reason


def test_measurements_are_cached_on_disk_per_kind(tmp_path):
  calls = []
  measure = lambda kind: calls.append(kind) or {"train": 1.5, "decode": 0.8}[kind]
  path = tmp_path / "cache" / "precision.json"
  for _ in range(2):
    assert precision.cached_speedup("train", path, measure) == 1.5
    assert precision.cached_speedup("decode", path, measure) == 0.8
  assert calls == ["train", "decode"]  # the second start-up reads the file
  assert precision.cache_file({"MINIGPT_CACHE_DIR": str(tmp_path)}) == tmp_path / "precision.json"


@pytest.mark.parametrize("kind", ["train", "decode"])
def test_the_probe_times_both_dtypes(kind):
  assert precision.bf16_speedup(kind, width=32, rows=64, repeats=1) > 0


def test_explicit_dtypes_pass_through_and_the_model_sees_a_concrete_one():
  for dtype in ("float32", "bfloat16", "float16"):
    assert precision.choose(dtype) == (dtype, "asked for")
    assert precision.choose_decode(dtype) == (dtype, "asked for")
  config = config_lib.get_config()
  assert config.model.dtype == "auto"
  assert ModelConfig.from_config(config.model, 65).dtype == precision.resolve("auto")
  assert precision.resolve("auto") in ("float32", "bfloat16")  # never float16
  config.model.dtype = "float16"  # allowed anywhere, if slow on a CPU
  config_lib.validate(config)
  assert ModelConfig.from_config(config.model, 65).dtype == "float16"
