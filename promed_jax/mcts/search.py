"""B trees searched together with mctx: selection rules by name, per-tree noise, and the node embedding.

`search_trees(...)` runs `mctx.search` over B trees with one of three policies (`POLICY_KIND` in the registry):

- `paper_uct`: the paper's rule (promed.md §3), `Q + c·sqrt(ln N_parent / N)` with Q mctx's mean backed-up
  value of the edge (`Tree.qvalues`: r + γ·V(child)), unvisited children first (lowest slot first), as both
  the root and the interior selection function. It never picks a slot masked in the node's embedding.
- `muzero`: mctx's PUCT selection (`muzero_action_selection`) with Dirichlet noise on the root prior;
- `gumbel_muzero`: mctx's Gumbel MuZero selection (sequential halving with Gumbel noise at the root).

mctx's own `muzero_policy` / `gumbel_muzero_policy` draw their root noise (and the simulation keys that break
PUCT ties) for the whole batch from one key, so a tree's noise depends on its position in the batch. Here
the same selection functions get noise drawn per tree from that tree's own key (`row_key(seed, "mcts",
case id)`), and PUCT's tie-breaking key is folded from the tree's key, the node and its visit count. So a
batch of B trees equals the same B trees searched one at a time, with any policy.

Backup. mctx backs a simulation's leaf value up the path it took: at each edge,
`G ← r(s, a) + γ(s, a)·G`, and every node's value is the mean of the returns that passed through it. We set
γ = `mcts.decay` on question edges and γ = 0 on an answer edge (the episode ends there), so a node's value is
the mean discounted return Σ_k γ^k r_{t+k} of the dialogues below it, with r the question's SIG and the
answer's correctness bonus. The reference code instead adds up a whole episode's rewards and adds them, decayed
by distance, to each node of the path, counting the start node of the episode twice (once as the expanded
node, once as the first node of the backup loop). §3 asks for "Σ SIG along the path, optionally +2, backup
with decay 0.9 per level": a path's reward is the sum of its edges' SIG (+ bonus), and decay makes rewards
further from a node weigh less in that node's value. The discounted return is exactly that, once per node,
and it keeps UCT's Q a mean of returns of one scale at every depth, which the double count does not. The
exported `reward` is the paper's undiscounted path reward Σ SIG + bonus; `return` is what the search backed up.

Node embedding (`NodeState`): fixed-shape arrays per node, a handle into the host-side table of dialogue
states (the dialogue environment) or -1 (the toy), the revealed-fact bitmask, s_t, depth, a terminal flag and
the slots masked at the node. Below a terminal node an environment returns reward 0, discount 0 and the same
state without calling anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np

from promed_jax import registry
from promed_jax.sampling.keys import part_word

POLICY_KIND = "mcts_policy"
# mctx's defaults for its two policies (recorded in every export's `policy`).
DIRICHLET_FRACTION = 0.25
DIRICHLET_ALPHA = 0.3
PB_C_INIT = 1.25
PB_C_BASE = 19652.0
GUMBEL_SCALE = 1.0


@chex.dataclass(frozen=True)
class NodeState:
    """The embedding of B nodes (one per tree).

    Attributes:
      handle: int32[B] index of the node's dialogue state in its tree's host table (-1 in the toy).
      revealed: bool[B, F] facts revealed so far (F = the most facts of a case in the batch; padding False).
      state: float32[B] s_t = Σ_i w_i c_i(t).
      depth: int32[B] doctor turns from the root.
      terminal: bool[B] the dialogue has ended (answer, no marker, question limit, length).
      masked: bool[B, A] slots that must not be chosen at the node (eager duplicates and empty turns).
    """

    handle: chex.Array
    revealed: chex.Array
    state: chex.Array
    depth: chex.Array
    terminal: chex.Array
    masked: chex.Array


@chex.dataclass(frozen=True)
class TreeKeys:
    """Per-tree key data carried in `Tree.extra_data` (uint32[B, 2]), for PUCT's tie-breaking noise."""

    key_data: chex.Array


def paper_uct(rng_key, tree: mctx.Tree, node_index, depth=0, *, c_uct: float) -> chex.Array:
    """The paper's UCT on one (unbatched) tree: unvisited slots first, then argmax Q + c·sqrt(ln N_p / N)."""
    del rng_key
    visits = tree.children_visits[node_index]
    parent_visits = tree.node_visits[node_index].astype(jnp.float32)
    q = tree.qvalues(node_index)
    bonus = c_uct * jnp.sqrt(jnp.log(jnp.maximum(parent_visits, 1.0)) / jnp.maximum(visits, 1))
    score = jnp.where(visits == 0, jnp.inf, q + bonus)
    masked = tree.embeddings.masked[node_index] | (tree.root_invalid_actions.astype(bool) & (depth == 0))
    return jnp.argmax(jnp.where(masked, -jnp.inf, score)).astype(jnp.int32)


def _muzero_interior(rng_key, tree: mctx.Tree, node_index, depth):
    """mctx's PUCT with its tie-breaking key folded from the tree's own key, the node and its visits."""
    del rng_key
    key = jax.random.wrap_key_data(tree.extra_data.key_data)
    key = jax.random.fold_in(jax.random.fold_in(key, node_index), tree.node_visits[node_index])
    return mctx.muzero_action_selection(key, tree, node_index, depth, pb_c_init=PB_C_INIT, pb_c_base=PB_C_BASE)


@chex.dataclass(frozen=True)
class Plan:
    """What `mctx.search` is called with for a policy: the root (noise added), selection functions, extra data."""

    root: mctx.RootFnOutput
    root_fn: Callable
    interior_fn: Callable
    extra_data: object


def _root_noise_keys(keys: chex.Array, name: str) -> chex.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, part_word(name)))(keys)


@registry.register(POLICY_KIND, "paper_uct")
def _plan_paper_uct(root, keys, invalid, *, c_uct: float, num_simulations: int) -> Plan:
    del keys, invalid, num_simulations
    fn = functools.partial(paper_uct, c_uct=c_uct)
    return Plan(root=root, root_fn=fn, interior_fn=fn, extra_data=None)


@registry.register(POLICY_KIND, "muzero")
def _plan_muzero(root, keys, invalid, *, c_uct: float, num_simulations: int) -> Plan:
    del c_uct, num_simulations
    num_actions = root.prior_logits.shape[-1]
    noise = jax.vmap(lambda k: jax.random.dirichlet(k, jnp.full(num_actions, DIRICHLET_ALPHA)))(
        _root_noise_keys(keys, "dirichlet")
    )
    probs = (1 - DIRICHLET_FRACTION) * jax.nn.softmax(root.prior_logits) + DIRICHLET_FRACTION * noise
    logits = jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))
    logits = jnp.where(invalid, jnp.finfo(logits.dtype).min, logits - logits.max(-1, keepdims=True))
    interior = _muzero_interior
    return Plan(
        root=root.replace(prior_logits=logits),
        root_fn=functools.partial(interior, depth=0),
        interior_fn=interior,
        extra_data=TreeKeys(key_data=jax.random.key_data(keys)),
    )


@registry.register(POLICY_KIND, "gumbel_muzero")
def _plan_gumbel(root, keys, invalid, *, c_uct: float, num_simulations: int) -> Plan:
    del c_uct
    logits = root.prior_logits
    logits = jnp.where(invalid, jnp.finfo(logits.dtype).min, logits - logits.max(-1, keepdims=True))
    gumbel = GUMBEL_SCALE * jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(
        _root_noise_keys(keys, "gumbel")
    )
    return Plan(
        root=root.replace(prior_logits=logits),
        root_fn=functools.partial(
            mctx.gumbel_muzero_root_action_selection,
            num_simulations=num_simulations,
            max_num_considered_actions=logits.shape[-1],
        ),
        interior_fn=mctx.gumbel_muzero_interior_action_selection,
        extra_data=mctx.GumbelMuZeroExtraData(root_gumbel=gumbel),
    )


def policy_settings(name: str, c_uct: float) -> dict:
    """The settings of a policy, as exported with every dialogue."""
    if name == "paper_uct":
        return {"name": name, "c_uct": c_uct}
    if name == "muzero":
        return {
            "name": name,
            "dirichlet_fraction": DIRICHLET_FRACTION,
            "dirichlet_alpha": DIRICHLET_ALPHA,
            "pb_c_init": PB_C_INIT,
            "pb_c_base": PB_C_BASE,
        }
    return {"name": name, "gumbel_scale": GUMBEL_SCALE}


def search_trees(
    root: mctx.RootFnOutput,
    recurrent_fn: Callable,
    keys: chex.Array,
    *,
    policy: str,
    num_simulations: int,
    c_uct: float,
    invalid_actions: chex.Array | None = None,
    params=None,
) -> mctx.Tree:
    """Searches B trees from `root` ([B] leaves) with `recurrent_fn`; `keys` [B] typed keys, one per tree.

    The tree equals the same tree searched alone with its key: nothing depends on the batch position.
    `recurrent_fn` must be traceable (the dialogue environment reaches its host code through `io_callback`).
    """
    batch, num_actions = root.prior_logits.shape
    chex.assert_shape(keys, (batch,))
    if invalid_actions is None:
        invalid_actions = jnp.zeros((batch, num_actions), bool)
    chex.assert_shape(invalid_actions, (batch, num_actions))
    plan = registry.get(POLICY_KIND, policy)(root, keys, invalid_actions, c_uct=c_uct, num_simulations=num_simulations)
    return mctx.search(
        params=params,
        # mctx splits this into the simulation keys; no selection function here reads them (see _muzero_interior).
        rng_key=jax.random.key(0),
        root=plan.root,
        recurrent_fn=recurrent_fn,
        root_action_selection_fn=plan.root_fn,
        interior_action_selection_fn=plan.interior_fn,
        num_simulations=num_simulations,
        invalid_actions=invalid_actions.astype(jnp.float32),
        extra_data=plan.extra_data,
    )


def best_child_path(tree: mctx.Tree, b: int) -> list[int]:
    """Slots from the root of tree b following the most visited child (ties: the lower slot), down to a leaf."""
    visits = np.asarray(tree.children_visits[b])
    index = np.asarray(tree.children_index[b])
    path, node = [], 0
    while True:
        if visits[node].max() == 0:
            return path
        slot = int(np.argmax(visits[node]))
        path.append(slot)
        node = int(index[node, slot])


def policies() -> Sequence[str]:
    return registry.names(POLICY_KIND)


def finished_paths(tree: mctx.Tree, b: int) -> list[tuple[list[int], float, float]]:
    """(slot path, path reward Σ r, discounted return) of every node of tree b where an episode ended (the
    first terminal node on its path; the nodes below it are no dialogue), in node order."""
    terminal = np.asarray(tree.embeddings.terminal[b])
    parents = np.asarray(tree.parents[b])
    actions = np.asarray(tree.action_from_parent[b])
    rewards = np.asarray(tree.children_rewards[b])
    discounts = np.asarray(tree.children_discounts[b])
    visited = np.asarray(tree.node_visits[b]) > 0
    out = []
    for node in range(1, terminal.shape[0]):
        if not (visited[node] and terminal[node]) or terminal[parents[node]]:
            continue
        path, edges = [], []
        child = node
        while child != 0:
            parent = int(parents[child])
            path.append(int(actions[child]))
            edges.append((parent, int(actions[child])))
            child = parent
        path.reverse()
        edges.reverse()
        total, ret, scale = 0.0, 0.0, 1.0
        for parent, slot in edges:
            total += float(rewards[parent, slot])
            ret += scale * float(rewards[parent, slot])
            scale *= float(discounts[parent, slot])
        out.append((path, total, ret))
    return out
