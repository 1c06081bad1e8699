"""The GPU tier: tests marked `gpu` run where JAX's backend is a GPU and skip elsewhere, with the
reason; `python -m pytest -q -m gpu tests` selects them (docs/scale.md). On a GPU: one train
step in float32 and bfloat16, cuDNN's attention against the explicit softmax, the KV decode
against the naive one. The rest checks launch/benchmark.py --suite=gpu's rows
(minigpt_jax/tools/gpu_suite.py) on any backend.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import frost_ids_and_vocab, tiny
from minigpt_jax import model as model_lib, train
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_cache, init_params
from minigpt_jax.tools import benchmark, gpu_suite
from test_sampling import N, _cfg, _generate, _prompt

BACKEND = jax.default_backend()
needs_gpu = pytest.mark.skipif(BACKEND != "gpu",
                               reason=f"needs a GPU: JAX's backend here is {BACKEND!r}")
# The custom calls jax.nn.dot_product_attention(implementation="cudnn") lowers to.
CUDNN, CUDNN_BACKWARD = "__cudnn$fmha", "__cudnn$fmhaSoftmaxBackward"


def _bf16_gpt():
  """A tiny bf16 GPT whose head size (16) cuDNN's fused attention takes."""
  cfg = ModelConfig("gpt", vocab_size=65, block_size=16, n_embed=32, n_heads=2, n_layer=2,
                    dtype="bfloat16")
  params = jax.jit(init_params, static_argnums=0)(build_model(cfg), jax.random.key(0))
  idx_BT = jax.random.randint(jax.random.key(1), (4, cfg.block_size), 0, cfg.vocab_size)
  return cfg, jax.tree.map(lambda p: 5 * p, params), idx_BT  # x5: attention far from uniform


def _logits(cfg, params, idx_BT):
  """The whole window's logits and the program's StableHLO text (traced afresh each call)."""
  model = build_model(cfg)
  lowered = jax.jit(lambda p, idx: model.apply({"params": p}, idx)).lower(params, idx_BT)
  return np.asarray(lowered.compile()(params, idx_BT)), lowered.as_text()


def _bf16_distance(logits_BTV, cfg, params, idx_BT):
  """How far bf16 logits are from the float32 model's (full float32 products): the tolerance
  of another bf16 computation of them."""
  with jax.default_matmul_precision("float32"):
    exact_BTV, _ = _logits(dataclasses.replace(cfg, dtype="float32"), params, idx_BT)
  distance = float(np.abs(logits_BTV - exact_BTV).max())
  assert 0 < distance < 0.1 * np.abs(exact_BTV).max(), distance  # bf16 rounding, no more
  return distance


@pytest.mark.gpu
@needs_gpu
def test_one_train_step_in_float32_and_bfloat16(tiny_config):
  """One update of the tiny frost run in each dtype: a finite loss near ln(V), float32 params
  on the GPU that moved, bf16's loss and gradient norm float32's to bf16 rounding. Without
  dropout, bf16's step trains through cuDNN's attention (forward and backward); float32's
  cannot."""
  ids, vocab_size = frost_ids_and_vocab()
  tiny_config.model.dropout = 0.0  # cuDNN's kernel has no dropout on the attention weights
  metrics = {}
  for dtype in ("float32", "bfloat16"):
    tiny_config.model.dtype = dtype
    state = train.create_train_state(tiny_config, vocab_size)
    before = jax.device_get(state.params)
    step = train.jit_train_steps.lower(state, ids, batch_size=8, block_size=16, num_steps=1)
    assert (CUDNN_BACKWARD in step.as_text()) == (dtype == "bfloat16"), dtype
    state, metrics[dtype] = step.compile()(state, ids)
    loss = float(metrics[dtype]["loss"][0])
    assert math.isfinite(loss) and abs(loss - math.log(vocab_size)) < 0.5, (dtype, loss)
    assert int(state.step) == 1
    leaves = jax.tree.leaves(state.params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
    assert {d.platform for leaf in leaves for d in leaf.devices()} == {"gpu"}
    assert any(not np.array_equal(new, old)
               for new, old in zip(jax.device_get(leaves), jax.tree.leaves(before), strict=True))
  for field, rtol in (("loss", 1e-2), ("grad_norm", 5e-2)):
    np.testing.assert_allclose(metrics["bfloat16"][field], metrics["float32"][field],
                               rtol=rtol, err_msg=field)


@pytest.mark.gpu
@needs_gpu
def test_cudnn_attention_matches_the_explicit_softmax(monkeypatch):
  """model.py's cuDNN path (bf16, no dropout) gives the explicit masked softmax's logits, no
  further from them than bf16 is from float32; the programs show which path each ran."""
  cfg, params, idx_BT = _bf16_gpt()
  cudnn_BTV, cudnn_hlo = _logits(cfg, params, idx_BT)
  assert CUDNN in cudnn_hlo, "cuDNN's fused attention did not run: the check would prove nothing"
  monkeypatch.setattr(model_lib, "cudnn_causal_attention", lambda q, k, v: None)
  explicit_BTV, explicit_hlo = _logits(cfg, params, idx_BT)
  assert CUDNN not in explicit_hlo
  tolerance = _bf16_distance(explicit_BTV, cfg, params, idx_BT)
  np.testing.assert_allclose(cudnn_BTV, explicit_BTV, rtol=0, atol=tolerance)


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_kv_decode_matches_the_cudnn_forward():
  """In bf16 the whole window runs cuDNN's attention and the decoder (a prefill of 5 tokens,
  then one at a time) the explicit softmax over its cache: the same logits to bf16 rounding."""
  cfg, params, idx_BT = _bf16_gpt()
  want_BTV, hlo = _logits(cfg, params, idx_BT)
  assert CUDNN in hlo
  model = build_model(cfg)
  run = jax.jit(lambda p, idx, pos, cache: model.apply({"params": p}, idx, cache=cache, pos=pos))
  logits_BPV, cache = run(params, idx_BT[:, :5], 0, init_cache(cfg, idx_BT.shape[0]))
  got = [logits_BPV]
  for t in range(5, cfg.block_size):
    logits_B1V, cache = run(params, idx_BT[:, t:t + 1], t, cache)
    got.append(logits_B1V)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want_BTV, rtol=0,
                             atol=_bf16_distance(want_BTV, cfg, params, idx_BT))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("P, temperature, top_k", [
    (3, 1.0, 1),  # greedy, within and past block_size
    (11, 1.0, 1),  # a prompt longer than block_size
    (5, 1.3, 4),
    (8, 0.7, 0),
])
def test_kv_decode_matches_naive_on_the_gpu(P, temperature, top_k):
  """test_sampling's decoders on the GPU: 40 new tokens (5 blocks, several refills) from the
  KV cache are the naive decode's with the same "chunked" window. In full float32 products
  (no TF32) the two differ by summation order alone, as on CPU."""
  cfg, key = _cfg(), jax.random.key(8)
  prompt_BP = _prompt(P, seed=P)
  with jax.default_matmul_precision("float32"):
    kv_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k)
    naive_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k, method="naive",
                         window="chunked")
  np.testing.assert_array_equal(kv_BN, naive_BN)


# -- 2 or more GPUs: fsdp equality and mesh changes on real devices live beside the CPU ones,
# tests/test_fsdp.py::test_fsdp_on_gpus_matches_one_gpu_and_moves_between_meshes.


# -- launch/benchmark.py --suite=gpu, on any backend.

ROW_FIELDS = {"config", "dtype", "fsdp", "data", "devices", "device_kind", "params",
              "batch_size", "block_size", "steps_per_dispatch", "steps", "steps_per_s",
              "tokens_per_s", "flops_per_token", "achieved_flops", "peak_flops", "peak_source",
              "mfu", "compile_s", "est_5000_steps_s", "jax_version", "jaxlib_version"}
H100 = "NVIDIA H100 80GB HBM3"


def test_suite_plan_and_configs():
  assert gpu_suite.plan(1) == [("frost_t4", "float32", 1), ("frost_t4", "bfloat16", 1),
                               ("shakespeare_char", "float32", 1),
                               ("shakespeare_char", "bfloat16", 1)]
  two = gpu_suite.plan(2)
  assert len(two) == 8
  assert two[:4] == [("frost_t4", dtype, fsdp) for fsdp in (1, 2)
                     for dtype in ("float32", "bfloat16")]
  assert [gpu_suite.mesh_devices(n) for n in (1, 2, 3, 4, 7, 8)] == [1, 2, 2, 4, 4, 8]
  config = gpu_suite.suite_config("shakespeare_char", "bfloat16", 2, 4)
  assert config.model.dtype == "bfloat16" and config.model.n_layer == 6
  assert (config.parallel.data, config.parallel.fsdp) == (2, 2)


def test_suite_peak_names_its_source_and_agrees_with_benchmark():
  source = " dense (NVIDIA data sheet)"
  cases = {(H100, "bfloat16"): (989.4e12, "h100 bf16"),
           (H100, "float32"): (494.7e12, "h100 tf32"),
           ("NVIDIA H100 PCIe", "float32"): (378e12, "h100 pcie tf32"),
           ("NVIDIA H200", "float32"): (494.7e12, "h200 tf32"),
           ("NVIDIA L4", "bfloat16"): (121e12, "l4 bf16"),
           ("Tesla T4", "float16"): (65e12, "t4 fp16"), ("Tesla T4", "float32"): (8.1e12, "t4 fp32")}
  for (kind, dtype), (flops, name) in cases.items():
    got_flops, got_source = gpu_suite.peak(kind, dtype)
    assert got_flops == pytest.approx(flops) and got_source == name + source, (kind, dtype)
    assert got_flops == benchmark.peak_flops(kind, dtype)
  assert gpu_suite.peak("Tesla T4", "bfloat16") == (None, None)  # no bf16 units
  assert gpu_suite.peak("cpu", "float32") == (None, None)


def test_suite_row_mfu_over_every_device_and_the_5000_step_estimate():
  config = gpu_suite.suite_config("frost_t4", "bfloat16", 2, 4)
  timing = {"compile_s": 12.0, "steps": 500, "steps_per_s": 250.0,
            "tokens_per_s": 250.0 * 64 * 128}
  kw = dict(params=3_200_000, flops_per_token=20_000_000, devices=4, config=config,
            versions={"jax_version": "0.10.2", "jaxlib_version": "0.10.2"})
  out = gpu_suite.row("frost_t4", "bfloat16", 2, timing, device_kind=H100, **kw)
  assert set(out) == ROW_FIELDS
  assert (out["data"], out["batch_size"], out["block_size"]) == (2, 64, 128)
  assert out["est_5000_steps_s"] == pytest.approx(12.0 + 5000 / 250.0)
  assert out["achieved_flops"] == pytest.approx(2e7 * 2_048_000)
  assert out["peak_flops"] == pytest.approx(4 * 989.4e12)
  assert out["mfu"] == pytest.approx(2e7 * 2_048_000 / (4 * 989.4e12))
  assert gpu_suite.summary(out) == ("frost_t4 bfloat16 fsdp 2 on 4 x NVIDIA H100 80GB HBM3: "
                                    "250.0 steps/s, MFU 1.0%, compile 12.0 s, 5000 steps in "
                                    "about 32 s")
  cpu = gpu_suite.row("frost_t4", "bfloat16", 2, timing, device_kind="cpu", **kw)
  assert cpu["mfu"] is None and cpu["peak_flops"] is None and cpu["peak_source"] is None
  assert "MFU n/a" in gpu_suite.summary(cpu)


def test_suite_row_measured_on_this_backend():
  """A real (tiny) row on whatever JAX has here: the fields the launcher prints."""
  config = tiny(gpu_suite.suite_config("frost_t4", "float32", 1, 1))
  out = gpu_suite.measure_row("frost_t4", "float32", 1, config, steps=10)
  assert set(out) == ROW_FIELDS
  assert (out["devices"], out["data"], out["steps"]) == (1, 1, 10)
  assert out["device_kind"] == jax.devices()[0].device_kind
  assert out["params"] > 0 and out["flops_per_token"] > 0
  assert out["est_5000_steps_s"] > out["compile_s"] > 0
  assert out["tokens_per_s"] == pytest.approx(out["steps_per_s"] * 8 * 16)
  if BACKEND == "cpu":
    assert out["mfu"] is None and out["peak_source"] is None


@pytest.mark.skipif(BACKEND == "gpu", reason="checks the refusal where there is no GPU")
def test_suite_without_a_gpu_is_a_user_error():
  with pytest.raises(UserError, match=rf"--suite=gpu needs a GPU but JAX's backend is "
                                      rf"'{BACKEND}'; install the CUDA build"):
    next(gpu_suite.run())
