"""promed_jax.consult."""
