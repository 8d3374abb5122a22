"""promed_jax.mcts."""
