"""minigpt_jax: a miniature character-level GPT in JAX/Flax."""
