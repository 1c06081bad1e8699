"""Tests for minigpt_jax.model: shapes, parameter count, causality, init, dtypes, decoding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from conftest import frost_ids_and_vocab
from minigpt_jax import cpu_tricks, train
from minigpt_jax.cpu_tricks import Dense, slice_kernels
from minigpt_jax.model import (MLP, Dropout, ModelConfig, build_model, count_params,
                               cross_entropy, cudnn_causal_attention, init_cache, init_params,
                               rope, rows_from)

V = 65  # tiny Shakespeare's vocabulary, the lecture's


def _tiny(name, **kw):
  kw = {"vocab_size": V, "block_size": 8, "n_embed": 32, "n_heads": 2, "n_layer": 2,
        **kw}
  return ModelConfig(name, **kw)


def _setup(cfg, seed=0):
  model = build_model(cfg)
  return model, jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))


def _apply(model, **kw):
  """A compiled `model.apply({"params": p}, idx_BT, **kw)`: eager flax is slow."""
  return jax.jit(lambda p, idx_BT: model.apply({"params": p}, idx_BT, **kw))


def _tokens(key, B, T, vocab=V):
  return jax.random.randint(key, (B, T), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_output_shape(name):
  """Both models share one call signature and return float32 logits_BTV."""
  cfg = _tiny(name)
  model, params = _setup(cfg)
  for T in (1, cfg.block_size):
    idx_BT = _tokens(jax.random.key(1), 3, T)
    logits_BTV = model.apply({"params": params}, idx_BT, deterministic=True)
    assert logits_BTV.shape == (3, T, V)
    assert logits_BTV.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits_BTV)))


def test_lecture_cpu_model_param_count():
  """The lecture prints 0.209729 M parameters for its CPU-sized gpt.py."""
  cfg = ModelConfig("gpt", vocab_size=65, block_size=32, n_embed=64, n_heads=4,
                    n_layer=4)
  model = build_model(cfg)
  params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  assert count_params(params) == 209_729


def test_bigram_param_count():
  _, params = _setup(ModelConfig("bigram", vocab_size=65, block_size=8))
  assert count_params(params) == 65 * 65


def _causality_check(apply_fn, params, cfg):
  idx_BT = _tokens(jax.random.key(2), 2, cfg.block_size)
  base_BTV = np.asarray(apply_fn(params, idx_BT))
  for t in range(cfg.block_size):
    changed_BT = idx_BT.at[:, t].set((idx_BT[:, t] + 1) % V)
    new_BTV = np.asarray(apply_fn(params, changed_BT))
    # The past must be bitwise unaffected by a future token.
    np.testing.assert_array_equal(new_BTV[:, :t], base_BTV[:, :t])
    # ...and every position from t on does see it (sanity: the check can fail).
    for s in range(t, cfg.block_size):
      assert np.abs(new_BTV[:, s] - base_BTV[:, s]).max() > 1e-6, (t, s)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gpt_is_causal(jit):
  """Changing token t never changes logits before t, eagerly or compiled."""
  cfg = _tiny("gpt")
  model, params = _setup(cfg)
  apply_fn = lambda p, idx_BT: model.apply({"params": p}, idx_BT, deterministic=True)
  if jit:
    apply_fn = jax.jit(apply_fn)
  _causality_check(apply_fn, params, cfg)


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_initial_loss_near_ln_vocab(name):
  """Small normal(0.02) init gives near-uniform predictions: loss about ln(65) = 4.17."""
  cfg = _tiny(name)
  model, params = _setup(cfg)
  kx, ky = jax.random.split(jax.random.key(3))
  x_BT, y_BT = _tokens(kx, 16, cfg.block_size), _tokens(ky, 16, cfg.block_size)
  loss = float(cross_entropy(_apply(model, deterministic=True)(params, x_BT), y_BT))
  assert abs(loss - math.log(V)) < 0.1, loss


def test_cross_entropy_matches_manual():
  """Mean of -log softmax at the target, as F.cross_entropy computes it."""
  logits_BTV = jax.random.normal(jax.random.key(4), (2, 3, 5))
  targets_BT = jnp.array([[0, 1, 4], [2, 2, 3]], jnp.int32)
  logp_BTV = np.asarray(jax.nn.log_softmax(logits_BTV, axis=-1))
  expected = -np.mean(np.take_along_axis(logp_BTV, np.asarray(targets_BT)[..., None],
                                         axis=-1))
  np.testing.assert_allclose(float(cross_entropy(logits_BTV, targets_BT)), expected,
                             rtol=1e-6)


def test_dropout_uses_key_only_in_training():
  """Training draws dropout masks from the key; evaluation ignores dropout."""
  cfg = _tiny("gpt", dropout=0.2)
  model, params = _setup(cfg)
  idx_BT = _tokens(jax.random.key(5), 2, cfg.block_size)
  train_fn = jax.jit(lambda k: model.apply({"params": params}, idx_BT,
                                           deterministic=False,
                                           rngs={"dropout": jax.random.key(k)}))
  train = lambda k: train_fn(k)
  a_BTV, a2_BTV, b_BTV = train(0), train(0), train(1)
  np.testing.assert_array_equal(a_BTV, a2_BTV)
  assert np.abs(np.asarray(a_BTV - b_BTV)).max() > 1e-4

  eval_BTV = model.apply({"params": params}, idx_BT, deterministic=True)
  eval_rng_BTV = model.apply({"params": params}, idx_BT, deterministic=True,
                             rngs={"dropout": jax.random.key(9)})
  np.testing.assert_array_equal(eval_BTV, eval_rng_BTV)
  assert np.abs(np.asarray(eval_BTV - a_BTV)).max() > 1e-4
  # With dropout 0 the same weights give the same eval logits.
  model0 = build_model(_tiny("gpt", dropout=0.0))
  np.testing.assert_array_equal(
      model0.apply({"params": params}, idx_BT, deterministic=True), eval_BTV)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_mean(rate):
  """16-bit masks: the dropped fraction is the rate; kept values are scaled up."""
  x_NM = jnp.ones((512, 333))  # not a multiple of 4: the last hash's spare masks go unused
  y_NM = Dropout(rate).apply({}, x_NM, deterministic=False,
                             rngs={"dropout": jax.random.key(0)})
  dropped = float((y_NM == 0).mean())
  assert abs(dropped - rate) < 0.005
  assert abs(float(y_NM.mean()) - 1.0) < 0.01
  np.testing.assert_allclose(np.unique(np.asarray(y_NM)), [0.0, 1 / (1 - rate)], rtol=1e-4)
  # Columns and rows come from different bits: no two share a mask.
  assert not np.array_equal(np.asarray(y_NM[:, 0]), np.asarray(y_NM[:, 1]))
  assert not np.array_equal(np.asarray(y_NM[:, 0]), np.asarray(y_NM[:, 84]))  # same hash
  assert not np.array_equal(np.asarray(y_NM[0]), np.asarray(y_NM[1]))


def test_dropout_mask_of_a_row_does_not_depend_on_the_rows_beside_it():
  """Rows 4..7 of a batch, given alone under rows_from(4), get the batch's masks.

  This is what lets each device of a data-parallel step draw its own rows'
  masks and still match one device bit for bit.
  """
  x_BTC = jax.random.normal(jax.random.key(1), (8, 5, 6))

  def drop(x, first_row):
    with rows_from(first_row):
      return Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})

  whole_BTC = drop(x_BTC, 0)
  np.testing.assert_array_equal(drop(x_BTC[4:], 4), whole_BTC[4:])
  assert not np.array_equal(drop(x_BTC[4:], 0), whole_BTC[4:])


def test_dense_matches_flax_dense_and_its_gradients():
  """Our Dense (kernel gradient formed as (dy^T x)^T) is nn.Dense, outputs and gradients."""
  x_BTC = jax.random.normal(jax.random.key(0), (3, 5, 8))
  ours, theirs = Dense(6, jnp.float32), nn.Dense(6, bias_init=nn.initializers.normal(1.0))
  params = theirs.init(jax.random.key(1), x_BTC)
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(1), x_BTC))
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x_BTC), theirs.apply(params, x_BTC), rtol=1e-6)
  grads = [jax.grad(loss(m), argnums=(0, 1))(params, x_BTC) for m in (ours, theirs)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_init_matches_lecture():
  """normal(0.02) kernels and embeddings, zero biases, LayerNorm scale one."""
  cfg = _tiny("gpt", n_embed=128, n_heads=4)
  _, params = _setup(cfg)
  flat = {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  biases = [k for k in flat if k.endswith("/bias")]
  scales = [k for k in flat if k.endswith("/scale")]
  kernels = [k for k in flat if k.endswith("/kernel") or k.endswith("/embedding")]
  assert biases and scales and kernels
  assert len(biases) + len(scales) + len(kernels) == len(flat)
  for k in biases:
    assert np.all(flat[k] == 0), k
  for k in scales:
    assert np.all(flat[k] == 1), k
  # ln1, ln2 per block plus ln_f, each with scale and bias.
  assert len(scales) == 2 * cfg.n_layer + 1
  for k in kernels:
    assert flat[k].dtype == np.float32
    if flat[k].size >= 10_000:
      assert abs(flat[k].std() - 0.02) < 0.001, (k, flat[k].std())
      assert abs(flat[k].mean()) < 0.001, k
  mlp_fc = flat["block_0/mlp/fc/kernel"]
  assert mlp_fc.shape == (128, 512)
  assert abs(mlp_fc.std() - 0.02) < 0.0005


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_bfloat16_compute(name):
  """bf16 compute keeps float32 params and returns float32 logits close to f32's."""
  cfg16 = _tiny(name, dtype="bfloat16")
  model16, params = _setup(cfg16)
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == jnp.float32
  idx_BT = _tokens(jax.random.key(6), 2, cfg16.block_size)
  logits16_BTV = _apply(model16, deterministic=True)(params, idx_BT)
  assert logits16_BTV.dtype == jnp.float32
  assert logits16_BTV.shape == (2, cfg16.block_size, V)
  assert bool(jnp.all(jnp.isfinite(logits16_BTV)))
  logits32_BTV = _apply(build_model(_tiny(name)), deterministic=True)(params, idx_BT)
  np.testing.assert_allclose(logits16_BTV, logits32_BTV, atol=0.05)
  # Gradients reach float32 params through the bf16 computation.
  loss = lambda p: cross_entropy(model16.apply({"params": p}, idx_BT), idx_BT)
  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree_util.tree_leaves(grads):
    assert g.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(g)))


def _dots(jaxpr):
  """The dot_generals of a jaxpr, its sub-jaxprs' (pjit, custom_vjp, scan) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, ClosedJaxpr):
          yield from _dots(sub.jaxpr)
        elif isinstance(sub, Jaxpr):
          yield from _dots(sub)


@pytest.mark.parametrize("tricks", [False, True])
def test_bfloat16_products_accumulate_in_float32(tricks):
  """A bf16 train step's products, as torch.autocast's: every product, forward and both
  backward (dx and dW of each Linear, attention both ways, the head), is bf16 x bf16
  accumulating in float32, with the tricks on or off; the gradients are float32."""
  cfg = _tiny("gpt", dtype="bfloat16", cpu_tricks=tricks, dropout=0.1)
  model = build_model(cfg)
  params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  idx_BT = jnp.zeros((2, cfg.block_size), jnp.int32)
  loss = lambda p: cross_entropy(model.apply({"params": p}, idx_BT, deterministic=False,
                                             rngs={"dropout": jax.random.key(1)}), idx_BT)
  dots = list(_dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  operands = [tuple(v.aval.dtype for v in eqn.invars) for eqn in dots]
  assert all(eqn.params["preferred_element_type"] == jnp.float32 for eqn in dots)
  linears, attention = 4 * cfg.n_layer + 1, 2 * cfg.n_layer  # the head is a Linear
  assert operands == [(jnp.bfloat16, jnp.bfloat16)] * 3 * (linears + attention), operands
  grads = jax.eval_shape(jax.grad(loss), params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_tricks_on_and_off_agree():
  """The same params give bf16 logits and gradients that agree with the switch on or off,
  to bf16 rounding (both round the cotangents to bf16, in products of other forms)."""
  on, off = (_tiny("gpt", dtype="bfloat16", cpu_tricks=t) for t in (True, False))
  _, params = _setup(off)
  idx_BT = _tokens(jax.random.key(3), 2, off.block_size)
  run = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p: cross_entropy(build_model(cfg).apply({"params": p}, idx_BT), idx_BT)))(params)
  logits = [_apply(build_model(cfg), deterministic=True)(params, idx_BT) for cfg in (on, off)]
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-2 * float(jnp.abs(logits[1]).max()))
  (loss_on, grads_on), (loss_off, grads_off) = run(on), run(off)
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-3)
  for a, b in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off), strict=True):
    np.testing.assert_allclose(a, b, atol=3e-2 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("pieces", [0, 5])
def test_bfloat16_decoder_matches_gpt_forward(pieces):
  """In bf16 prefill plus cached steps give the whole window's logits to bf16 rounding, the
  cache staying bf16, plain Flax (pieces=0) or with the tricks and sliced kernels."""
  cfg = _tiny("gpt", dtype="bfloat16", cpu_tricks=bool(pieces))
  model, params = _setup(cfg)
  params = jax.tree.map(lambda p: 5 * p, params)  # logits far from uniform
  idx_BT = _tokens(jax.random.key(7), 2, cfg.block_size)
  want_BTV = np.asarray(_apply(model, deterministic=True)(params, idx_BT))
  got_BTV = _decode_logits(cfg, slice_kernels(params, True, pieces) if pieces else params,
                           idx_BT, prefill=3)
  np.testing.assert_allclose(got_BTV, want_BTV, atol=2e-2 * np.abs(want_BTV).max())
  _, cache = jax.eval_shape(lambda p: model.apply({"params": p}, idx_BT[:, :1],
                                                  cache=init_cache(cfg, 2), pos=0), params)
  assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_training_lowers_the_loss(tiny_config):
  """30 Adam steps of the tiny frost run in bf16 (one compiled call): finite, falling loss,
  float32 params."""
  tiny_config.model.dtype = "bfloat16"
  ids, vocab_size = frost_ids_and_vocab()
  state = train.create_train_state(tiny_config, vocab_size)
  state, metrics = train.jit_train_steps(state, ids, batch_size=8, block_size=16, num_steps=30)
  losses = np.asarray(metrics["loss"])
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean() - 0.3, losses
  assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def test_gpu_only_paths_are_off_on_cpu():
  """On CPU the tricks are on ("auto"), so the decoder's kernels are cut in 16 (whole on
  a GPU, where each slice is a kernel launch); attention is the explicit softmax (cuDNN's
  only on a GPU)."""
  _, params = _setup(_tiny("gpt"))
  assert cpu_tricks.enabled("auto") and cpu_tricks.enabled("on")
  assert not cpu_tricks.enabled("off")
  assert ModelConfig.from_config({"name": "gpt", "block_size": 8}, V).cpu_tricks
  assert len(slice_kernels(params, True)["block_0"]["mlp"]["fc"]["kernel"]) == 16
  assert slice_kernels(params, True, pieces=1) is params
  assert slice_kernels(params, False) is params
  q_BTHD = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
  assert cudnn_causal_attention(q_BTHD, q_BTHD, q_BTHD) is None


def _decode_logits(cfg, params, idx_BT, prefill: int, cache=None):
  """Logits of every position: prefill the first `prefill` tokens, then one at a time."""
  model = build_model(cfg)
  run = jax.jit(lambda idx, pos, cache: model.apply({"params": params}, idx, cache=cache,
                                                    pos=pos))
  cache = init_cache(cfg, idx_BT.shape[0]) if cache is None else cache
  logits_BPV, cache = run(idx_BT[:, :prefill], 0, cache)
  out = [logits_BPV]
  for t in range(prefill, idx_BT.shape[1]):
    logits_B1V, cache = run(idx_BT[:, t:t + 1], t, cache)
    out.append(logits_B1V)
  return np.concatenate(out, axis=1)


@pytest.mark.parametrize("tricks", [False, True])
def test_decoding_uses_the_params_of_training(tricks):
  """One GPT: called with a cache it makes the same parameter tree, so every checkpoint decodes."""
  cfg = _tiny("gpt", cpu_tricks=tricks)
  idx_BT = jnp.zeros((1, cfg.block_size), jnp.int32)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  gpt = jax.eval_shape(lambda k: init_params(build_model(cfg), k), jax.random.key(0))
  dec = jax.eval_shape(lambda k: build_model(cfg).init(k, idx_BT, cache=init_cache(cfg, 1),
                                                       pos=0), jax.random.key(0))["params"]
  assert shapes(dec) == shapes(gpt)
  plain = jax.eval_shape(lambda k: init_params(build_model(_tiny("gpt")), k), jax.random.key(0))
  assert shapes(gpt) == shapes(plain)  # the tricks change no parameter


def test_cpu_tricks_change_no_result():
  """The same params give the same logits and gradients with the switch on or off."""
  on, off = _tiny("gpt", cpu_tricks=True), _tiny("gpt")
  _, params = _setup(off)
  idx_BT = _tokens(jax.random.key(3), 2, off.block_size)
  loss = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p: cross_entropy(build_model(cfg).apply({"params": p}, idx_BT), idx_BT)))
  (loss_on, grads_on), (loss_off, grads_off) = loss(on)(params), loss(off)(params)
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_forward_mode_ad_through_the_loss_with_the_switch_off():
  """jax.jvp of the training loss (dropout on) and a Hessian-vector product work."""
  cfg = _tiny("gpt", dropout=0.1)
  model, params = _setup(cfg)
  idx_BT = _tokens(jax.random.key(4), 2, cfg.block_size)
  rngs = {"dropout": jax.random.key(5)}
  loss = lambda p: cross_entropy(model.apply({"params": p}, idx_BT, deterministic=False,
                                             rngs=rngs), idx_BT)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(6), x.shape), params)
  _, directional = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))(params, v)
  dot = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(jax.grad(loss)(params)),
                                           jax.tree.leaves(v)))
  np.testing.assert_allclose(directional, dot, rtol=1e-4)
  # Hessian-vector product forward-over-reverse, checked against reverse-over-forward.
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
  rof = jax.jit(jax.grad(lambda p, v: jax.jvp(loss, (p,), (v,))[1]))(params, v)
  for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(rof), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(hvp))


@pytest.mark.parametrize("B, n_heads, prefill, pieces", [
    (2, 2, 3, 0), (1, 2, 1, 0), (1, 1, 8, 0), (2, 2, 3, 16), (1, 2, 1, 5)])
def test_decoder_matches_gpt_forward(B, n_heads, prefill, pieces):
  """Prefill plus cached steps give GPT's logits at every position, up to rounding,
  plain Flax with whole kernels (pieces=0), or with the CPU tricks and the kernels cut by
  slice_kernels (5 does not divide them)."""
  cfg = _tiny("gpt", n_heads=n_heads, cpu_tricks=bool(pieces))
  model, params = _setup(cfg)
  idx_BT = _tokens(jax.random.key(7), B, cfg.block_size)
  want_BTV = _apply(model, deterministic=True)(params, idx_BT)
  decode_params = slice_kernels(params, True, pieces) if pieces else params
  got_BTV = _decode_logits(cfg, decode_params, idx_BT, prefill)
  np.testing.assert_allclose(got_BTV, want_BTV, atol=2e-5, rtol=1e-5)


def test_decoder_ignores_stale_cache_slots():
  """Slots at and past a token's position (old windows' leftovers) are never read."""
  cfg = _tiny("gpt")
  _, params = _setup(cfg)
  idx_BT = _tokens(jax.random.key(8), 2, cfg.block_size)
  clean_BTV = _decode_logits(cfg, params, idx_BT, prefill=2)
  keys = iter(jax.random.split(jax.random.key(9), 2 * cfg.n_layer))
  stale = tuple((jax.random.normal(next(keys), k.shape), jax.random.normal(next(keys), v.shape))
                for k, v in init_cache(cfg, 2))
  np.testing.assert_array_equal(_decode_logits(cfg, params, idx_BT, 2, stale), clean_BTV)


# -- Recipe options: activation, bias, tied head, rotary positions.

_OPTIONS = [dict(activation=a, bias=b, qkv_bias=b, tie_embeddings=t, position=p)
            for a in ("relu", "gelu") for b in (True, False) for t in (False, True)
            for p in ("learned", "rope")]


def _param_names(cfg):
  shapes = jax.eval_shape(lambda k: init_params(build_model(cfg), k), jax.random.key(0))
  return {"/".join(k.key for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}


def _random_params_of(shapes, rng):
  """normal(0.5) everywhere: far from init, so each context gives its own tokens."""
  return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32), shapes)


def _random_params(cfg, rng):
  """A GPT's params without compiling its init."""
  return _random_params_of(
      jax.eval_shape(lambda k: init_params(build_model(cfg), k), jax.random.key(0)), rng)


def test_default_param_tree_is_the_lecture_s():
  """The options' defaults keep every checkpoint's names: nothing added, nothing gone."""
  block = [f"block_0/{name}" for name in (
      "ln1/scale", "ln1/bias", "attn/qkv/kernel", "attn/proj/kernel", "attn/proj/bias",
      "ln2/scale", "ln2/bias", "mlp/fc/kernel", "mlp/fc/bias", "mlp/proj/kernel", "mlp/proj/bias")]
  assert _param_names(_tiny("gpt", n_layer=1)) == {
      "tok_embed/embedding", "pos_embed/embedding", *block, "ln_f/scale", "ln_f/bias",
      "lm_head/kernel", "lm_head/bias"}


def test_options_drop_their_params():
  """bias=False leaves no bias; qkv_bias adds one; tied: no lm_head; rope: no pos_embed."""
  default = _param_names(_tiny("gpt"))
  no_bias = _param_names(_tiny("gpt", bias=False))
  assert no_bias == {n for n in default if not n.endswith("/bias")}
  assert _param_names(_tiny("gpt", qkv_bias=True)) == default | {
      f"block_{i}/attn/qkv/bias" for i in range(2)}
  assert _param_names(_tiny("gpt", tie_embeddings=True)) == {
      n for n in default if not n.startswith("lm_head/")}
  assert _param_names(_tiny("gpt", position="rope")) == default - {"pos_embed/embedding"}
  nanogpt = dict(activation="gelu", bias=False, tie_embeddings=True, position="rope")
  assert not any(n.endswith("/bias") or n.startswith(("lm_head", "pos_embed"))
                 for n in _param_names(_tiny("gpt", **nanogpt)))


def test_every_option_decodes_with_the_cache_as_without():
  """All 16 combinations: KV decoding past block_size samples the naive tokens.

  sampling.py's "chunked" schedule by hand: prefill the window at pos 0, feed one
  token a step, and when the window is full re-prefill its last keep - 1 tokens
  at pos 0 (padded: slots past them are overwritten before they are read); the
  naive decode runs the whole window without a cache each step. Both draw step
  i's token with the same Gumbel noise (greedy decoding mostly repeats one token
  with random weights, which would prove little). The gelu half
  runs with the CPU tricks and kernels cut by slice_kernels. The 16 models share
  one compiled program per call shape, three in all (one each: 3x longer).
  """
  W, keep, B, P, N = 8, 4, 2, 3, 20  # N > W: the window restarts
  cfgs = [_tiny("gpt", vocab_size=10, block_size=W, n_embed=16, n_layer=1,
                cpu_tricks=o["activation"] == "gelu", **o) for o in _OPTIONS]
  models = [build_model(cfg) for cfg in cfgs]
  rng = np.random.default_rng(0)
  params = [_random_params(cfg, rng) for cfg in cfgs]
  sliced = [slice_kernels(p, cfg.cpu_tricks, pieces=3) for p, cfg in zip(params, cfgs)]
  whole = jax.jit(lambda ps, idxs: [m.apply({"params": p}, idx_BT)
                                    for m, p, idx_BT in zip(models, ps, idxs)])
  cached = jax.jit(lambda ps, idxs, pos, caches: [
      m.apply({"params": p}, idx_BT, cache=c, pos=pos)
      for m, p, idx_BT, c in zip(models, ps, idxs, caches)])
  padded = lambda tokens_BT: np.pad(tokens_BT, ((0, 0), (0, W - tokens_BT.shape[1])))
  gumbel_NBV = rng.gumbel(size=(N, B, 10))
  draw = lambda i, logits_BV: np.argmax(logits_BV + gumbel_NBV[i], axis=-1)[:, None].astype(
      np.int32)
  prompt_BP = rng.integers(0, 10, (B, P)).astype(np.int32)

  naive, start = [prompt_BP] * len(cfgs), 0  # the whole token sequence of each model
  for i in range(N):
    n = naive[0].shape[1]
    start = n - keep if n - start > W else start
    logits = whole(params, [padded(s_BS[:, start:]) for s_BS in naive])
    naive = [np.concatenate([s_BS, draw(i, l_BWV[:, n - start - 1])], axis=1)
             for s_BS, l_BWV in zip(naive, logits)]

  kv = [prompt_BP] * len(cfgs)
  out = cached(sliced, [padded(prompt_BP)] * len(cfgs), 0, [init_cache(c, B) for c in cfgs])
  last, length = [l_BWV[:, P - 1] for l_BWV, _ in out], P
  caches = [c for _, c in out]
  for i in range(N):
    kv = [np.concatenate([s_BS, draw(i, l_BV)], axis=1) for s_BS, l_BV in zip(kv, last)]
    if length == W:  # the window restarts as its last keep - 1 tokens, then the new one
      caches = [c for _, c in cached(sliced, [padded(s_BS[:, -keep:-1]) for s_BS in kv], 0,
                                     caches)]
      length = keep - 1
    out = cached(sliced, [s_BS[:, -1:] for s_BS in kv], length, caches)
    last, caches, length = [l_B1V[:, 0] for l_B1V, _ in out], [c for _, c in out], length + 1
  for cfg, a_BS, b_BS in zip(cfgs, kv, naive):
    np.testing.assert_array_equal(a_BS, b_BS, err_msg=str(cfg))
  assert len({s_BS.tobytes() for s_BS in kv}) == len(cfgs)  # each option changes the text


def test_gelu_is_the_exact_erf_gelu():
  """activation="gelu" is torch's nn.GELU() (erf), not the tanh approximation."""
  cfg = _tiny("gpt", activation="gelu")
  rng = np.random.default_rng(0)
  x_BTC = rng.normal(size=(2, 3, cfg.n_embed)).astype(np.float32)
  mlp = MLP(cfg)
  params = _random_params_of(jax.eval_shape(lambda: mlp.init(jax.random.key(0), x_BTC, True)),
                             rng)["params"]
  got_BTC = jax.jit(lambda p, x: mlp.apply({"params": p}, x, True))(params, x_BTC)
  h_BTF = x_BTC @ params["fc"]["kernel"] + params["fc"]["bias"]
  erf_gelu_BTF = 0.5 * h_BTF * (1 + np.vectorize(math.erf)(h_BTF / math.sqrt(2)))
  np.testing.assert_allclose(got_BTC, erf_gelu_BTF @ params["proj"]["kernel"]
                             + params["proj"]["bias"], atol=1e-5, rtol=1e-5)
  tanh_gelu_BTF = 0.5 * h_BTF * (1 + np.tanh(math.sqrt(2 / math.pi)
                                             * (h_BTF + 0.044715 * h_BTF**3)))
  assert np.abs(tanh_gelu_BTF - erf_gelu_BTF).max() > 1e-4  # the check tells the two apart


def test_rope_turns_pairs_i_and_i_plus_half_by_position():
  """Rotate-half: position 0 is the identity, feature pairs (i, i + D/2) turn by
  pos * 10000^(-2i/D), and q.k depends on the positions' difference only."""
  q_BTHD, k_BTHD = np.random.default_rng(0).normal(size=(2, 1, 5, 2, 8)).astype(np.float32)
  turn = jax.jit(rope)
  np.testing.assert_array_equal(turn(q_BTHD, np.zeros(5, np.int32)), q_BTHD)
  angle = 3 * 10000.0 ** (-2 / 8)  # position 3, pair i = 1: features 1 and 5
  turned_D = np.asarray(turn(q_BTHD, np.full(5, 3, np.int32)))[0, 0, 0]
  x1, x2 = q_BTHD[0, 0, 0, 1], q_BTHD[0, 0, 0, 5]
  np.testing.assert_allclose(turned_D[[1, 5]], [x1 * math.cos(angle) - x2 * math.sin(angle),
                                                x2 * math.cos(angle) + x1 * math.sin(angle)],
                             rtol=1e-5)
  scores = lambda shift: np.einsum("bqhd,bkhd->bhqk",
                                   turn(q_BTHD, np.arange(5, dtype=np.int32) + shift),
                                   turn(k_BTHD, np.arange(5, dtype=np.int32) + shift))
  np.testing.assert_allclose(scores(0), scores(11), atol=1e-4)
