"""A pure-JAX toy consultation for testing the search: n facts with known weights, jittable end to end.

Slot a < n asks about fact a (its reward is w_a the first time, 0 after); slot n answers (terminal, discount 0;
the answer is right when every fact of positive weight is revealed, and earns `bonus` then); slots above n ask
about nothing (reward 0). A turn past `max_questions` that does not answer ends the episode unanswered.
Edges below a terminal node change nothing and earn 0. The optimum under decay γ < 1 asks the facts in
decreasing weight order, then answers.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import mctx

from promed_jax.mcts.search import NodeState


@chex.dataclass(frozen=True)
class ToyParams:
    """B toy cases.

    Attributes:
      weights: float32[B, F] fact weights (padding 0).
      bonus: float32[B] reward of a right answer.
    """

    weights: chex.Array
    bonus: chex.Array


def toy_root(params: ToyParams, num_actions: int, revealed: chex.Array | None = None) -> mctx.RootFnOutput:
    """The root of B toy searches (uniform priors, value 0); `revealed` bool[B, F] facts known at the start."""
    batch, n = params.weights.shape
    if num_actions < n + 1:
        raise ValueError(f"the toy needs at least {n + 1} slots for {n} facts, got {num_actions}")
    if revealed is None:
        revealed = jnp.zeros((batch, n), bool)
    state = NodeState(
        handle=jnp.full((batch,), -1, jnp.int32),
        revealed=revealed,
        state=jnp.sum(params.weights * revealed, axis=-1),
        depth=jnp.zeros((batch,), jnp.int32),
        terminal=jnp.zeros((batch,), bool),
        masked=jnp.zeros((batch, num_actions), bool),
    )
    return mctx.RootFnOutput(prior_logits=jnp.zeros((batch, num_actions)), value=jnp.zeros((batch,)), embedding=state)


def toy_recurrent_fn(
    params: ToyParams, rng_key, action: chex.Array, node: NodeState, *, decay: float, max_questions: int
):
    """mctx's recurrent_fn for the toy: one doctor turn per tree."""
    del rng_key
    batch, n = params.weights.shape
    asks = jax.nn.one_hot(action, n, dtype=bool) & (action < n)[:, None]
    revealed = node.revealed | asks
    gain = jnp.sum(params.weights * (revealed & ~node.revealed), axis=-1)
    answers = action == n
    out_of_questions = (node.depth + 1 > max_questions) & ~answers
    correct = jnp.all(revealed | (params.weights <= 0), axis=-1)
    ends = answers | out_of_questions
    reward = jnp.where(answers, params.bonus * correct, jnp.where(out_of_questions, 0.0, gain))
    live = ~node.terminal
    new = NodeState(
        handle=node.handle,
        revealed=jnp.where(live[:, None] & ~ends[:, None], revealed, node.revealed),
        state=jnp.where(live & ~ends, node.state + gain, node.state),
        depth=node.depth + live,
        terminal=node.terminal | ends,
        masked=node.masked,
    )
    out = mctx.RecurrentFnOutput(
        reward=jnp.where(live, reward, 0.0),
        discount=jnp.where(live & ~ends, decay, 0.0),
        prior_logits=jnp.zeros((batch, node.masked.shape[-1])),
        value=jnp.zeros((batch,)),
    )
    return out, new
