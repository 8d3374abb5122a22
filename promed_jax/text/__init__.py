"""promed_jax.text."""
