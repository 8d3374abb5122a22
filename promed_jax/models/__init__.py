"""promed_jax.models."""
