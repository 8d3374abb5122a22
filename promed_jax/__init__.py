"""promed_jax: ProMed (Shapley Information Gain guided proactive medical LLMs) in JAX."""

__version__ = "0.1.0"
