"""promed_jax.training."""
