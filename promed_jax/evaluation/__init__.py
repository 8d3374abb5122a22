"""promed_jax.evaluation."""
