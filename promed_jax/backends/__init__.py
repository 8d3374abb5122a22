"""promed_jax.backends."""
