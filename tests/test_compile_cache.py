"""minigpt_jax/support/compile_cache.py: where the cache lives (launch/ tests show it hitting)."""

from pathlib import Path

from minigpt_jax.support import compile_cache


def test_the_folder_is_jax_s_variable_then_ours_then_the_user_cache():
  home = Path.home()
  assert compile_cache.default_dir({}) == home / ".cache" / "minigpt_jax" / "xla"
  assert compile_cache.default_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/minigpt_jax/xla")
  assert compile_cache.default_dir({"MINIGPT_CACHE_DIR": "/m", "XDG_CACHE_HOME": "/c"}) == \
      Path("/m")
  assert compile_cache.default_dir({"MINIGPT_CACHE_DIR": "/m",
                                    "JAX_COMPILATION_CACHE_DIR": "/j"}) == Path("/j")
  assert compile_cache.default_dir({"MINIGPT_CACHE_DIR": "~/x"}) == home / "x"
