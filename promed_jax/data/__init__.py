"""promed_jax.data."""
