"""promed_jax.sampling."""
