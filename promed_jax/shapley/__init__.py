"""promed_jax.shapley."""
