"""Speed tricks for XLA:CPU, all behind one switch: `config.model.cpu_tricks`.

"auto" (the default) turns them on where JAX runs on the CPU, "on" and "off"
force them. None changes a result beyond float rounding. With the switch off
the model is plain Flax (`nn.Dense`) and every function here takes the plain
JAX path. Each trick's figures are in docs/speed.md, with their commands.

Owns: `Dense` (the kernel-gradient VJP), `slice_kernels` (batch-1 decode),
`mean_over_devices` (the all-gather gradient mean), `add_positions` (the
position embeddings' gradient by adds), and `wait_each_call`,
which follows the backend alone, as it avoids a deadlock. May import: JAX and
Flax and `products`, so the model, sampling, parallel and the loop can all use it.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from minigpt_jax import products

SETTINGS = ("auto", "on", "off")
INIT = nn.initializers.normal(stddev=0.02)  # the lecture's (and GPT-2's) weight init


def enabled(setting: str) -> bool:
  """Whether the tricks apply for a `config.model.cpu_tricks` value."""
  return setting == "on" or (setting == "auto" and jax.default_backend() == "cpu")


# -- 1. The kernel gradient as (dy^T x)^T: faster on CPU, see docs/speed.md.

def _product(a, b):
  """a @ b accumulated and returned in float32: with bfloat16 inputs, the form in which
  XLA reaches AMX units and tensor cores."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MK, w_KN, dtype):
  """x @ w, both in `dtype` (x comes cast, the float32 kernel is cast here), in float32."""
  return _product(x_MK, w_KN.astype(dtype))


def _matmul_fwd(x_MK, w_KN, dtype):
  w_KN = w_KN.astype(dtype)  # kept in `dtype`: half the memory in bfloat16
  return _product(x_MK, w_KN), (x_MK, w_KN)


def _matmul_bwd(dtype, residuals, dy_MN):
  """dy arrives in float32, the product's dtype: both backward products take it in `dtype`,
  so they too are `dtype` products accumulating in float32. dW comes back float32."""
  x_MK, w_KN = residuals
  dy_MN = dy_MN.astype(dtype)
  dw_NK = lax.dot_general(dy_MN, x_MK, (((0,), (0,)), ((), ())),  # dy^T x
                          preferred_element_type=jnp.float32)
  return _product(dy_MN, w_KN.T).astype(x_MK.dtype), dw_NK.T


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
  """nn.Dense's parameters and math, with two CPU tricks (see docs/speed.md).

  Training: the kernel gradient is formed as (dy^T x)^T, where nn.Dense's
  x^T dy makes XLA:CPU copy dy into a transposed layout first. Decoding: the
  kernel may come as a tuple of column slices (`slice_kernels`), many small
  products XLA:CPU spreads over its cores. A custom VJP defines no
  forward-mode derivative: turn the switch off for `jax.jvp`. As `dense`'s
  plain layer: x and the kernel multiply in `dtype`, accumulating in float32,
  and the float32 bias is added to the float32 result, which is returned.
  """
  features: int
  dtype: Any
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    if self.is_initializing():
      kernel = self.param("kernel", INIT, (x.shape[-1], self.features))
    else:  # as given: whole [in, out], or a tuple of [in, out_i] slices
      kernel = self.get_variable("params", "kernel")
    x_MK = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # 2-D: no per-slice reshapes
    if isinstance(kernel, tuple):
      y = jnp.concatenate([_product(x_MK, k.astype(self.dtype)) for k in kernel], axis=-1)
    elif jnp.dtype(self.dtype) == jnp.float32:
      y = _matmul(x_MK, kernel, jnp.dtype(self.dtype))
    else:  # both backward products in `dtype` too, in the forms XLA:CPU keeps
      y = products.einsum("mk,kn->mn", x_MK, kernel, self.dtype, tricks=True)
    y = y.reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


def _dot_general_in(dtype, x, w, dimension_numbers, precision=None):
  """nn.Dense's product with both operands cast to `dtype`, accumulated in float32; below
  float32 its backward products too (`products`)."""
  if jnp.dtype(dtype) != jnp.float32:
    return products.dot_general(x, w, dimension_numbers, dtype)
  return lax.dot_general(x.astype(dtype), w.astype(dtype), dimension_numbers,
                         precision=precision, preferred_element_type=jnp.float32)


def dense(features: int, name: str, dtype, use_bias: bool = True, tricks: bool = False):
  """The model's linear layer: `Dense` with the tricks on, else plain `nn.Dense`.

  Either multiplies in `dtype`, accumulates in float32 and adds the bias in
  float32: it returns float32, for the caller to round. nn.Dense computes in
  float32 around a product that casts its operands (its own bf16 `dtype`
  would round the bias); its parameters are nn.Dense's as ever.
  """
  if tricks:
    return Dense(features, dtype, use_bias, name=name)
  return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, kernel_init=INIT, name=name,
                  dot_general=functools.partial(_dot_general_in, dtype))


# -- 2. Kernel slices for batch-1 decoding: faster on CPU, see docs/speed.md.

def slice_kernels(params, tricks: bool, pieces: int = 16):
  """GPT params with each block's kernels cut into `pieces` column slices (tricks on).

  A batch-1 matrix-vector product runs on one core; XLA:CPU hands work to
  another thread only when many operations are ready at once. Slicing copies
  the weights once: do it outside the decode loop. With the tricks off (or
  pieces=1) the params come back as they are.
  """
  if not tricks or pieces == 1:
    return params

  def cut(path, x):
    if path[0].key.startswith("block_") and path[-1].key == "kernel":
      return tuple(jnp.array_split(x, pieces, axis=1))
    return x

  return jax.tree_util.tree_map_with_path(cut, params)


# -- 3. The gradient mean as one all-gather: faster on CPU, see docs/speed.md.

def mean_over_devices(tree, axis_name: str, tricks: bool):
  """The mean of `tree` over `axis_name`, inside shard_map; bit-identical on every device.

  With the tricks on: one all-gather of the flattened tree and a sum in
  device order (XLA:CPU's all-reduce is slow). Otherwise lax.pmean.
  """
  if not tricks:
    return lax.pmean(tree, axis_name)
  flat, unravel = ravel_pytree(tree)
  gathered_NP = lax.all_gather(flat, axis_name)
  total = gathered_NP[0]
  for row in gathered_NP[1:]:  # adds, not .sum(0): XLA:CPU reduces slowly over a short axis
    total = total + row
  return unravel(total / gathered_NP.shape[0])


# -- 4. The position embeddings' gradient summed by adds: faster on CPU, see docs/speed.md.

def add_positions(x_BTC, positions_TC, tricks: bool):
  """x + positions, broadcast over the batch rows.

  The gradient of the positions is the sum of x's over the rows. XLA:CPU
  reduces a short leading axis into a wide result slowly ([64, 128, 256] to
  [128, 256]: 18 ms, against 0.3 ms for the same sum as adds of halves), so
  with the tricks on the backward sums that way.
  """
  if not tricks:
    return x_BTC + positions_TC
  return _add_positions(x_BTC, positions_TC)


@jax.custom_vjp
def _add_positions(x_BTC, positions_TC):
  return x_BTC + positions_TC


def _add_positions_fwd(x_BTC, positions_TC):
  return x_BTC + positions_TC, None


def _add_positions_bwd(_, g_BTC):
  g_NTC = g_BTC
  while g_NTC.shape[0] > 1:  # pairwise: rows [0, half) plus rows [half, 2 half), an odd one kept
    half = g_NTC.shape[0] // 2
    summed = g_NTC[:half] + g_NTC[half:2 * half]
    g_NTC = jnp.concatenate([summed, g_NTC[2 * half:]]) if g_NTC.shape[0] % 2 else summed
  return g_BTC, g_NTC[0]


_add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


# -- 5. One compiled call at a time on several CPU devices: a deadlock, not a speed-up.

def wait_each_call(mesh) -> bool:
  """Whether a loop must finish each compiled call before queuing the next.

  With several CPU devices in one process, queued calls can deadlock XLA's
  all-reduce rendezvous ("Expected 2 threads to join the rendezvous"), so
  this follows the backend, not the switch; each call is large, so waiting
  costs little.
  """
  return (mesh is not None and mesh.devices.size > 1
          and mesh.devices.flat[0].platform == "cpu")
