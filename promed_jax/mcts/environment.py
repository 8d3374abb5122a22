"""The dialogue environment: B consultations searched together, one batched doctor and patient call per simulation.

A node is a dialogue state; its embedding (`search.NodeState`) holds a handle into its tree's host table of
`HostNode`s. A node stores only its own doctor turn and patient reply and points at its parent, so the host
state grows by one turn per node, not by a whole dialogue. `DialogueEnv.step` is the environment step, host
code: for the B trees' selected (node, slot) pairs it

1. samples the B doctor turns in one `doctor.chat` call (`lazy` expansion: the slot's turn is sampled the
   first time it is chosen), or takes the slot's candidate sampled when the node was created (`eager`: K
   candidates per node, prior = their length-normalised log-probability, duplicates and empty turns masked);
2. sends every question among them to the patient in one `patient.reply` call;
3. scores SIG from the cached fact weights: exact (the patient says which facts it revealed) or the paper's
   understanding + judge (`shapley.sig.paper_coverage`, one batched call of each);
4. with `leaf_value='rollout'`, finishes every new live dialogue with the doctor (batched across trees, turn
   by turn) and takes its discounted return as the node's value; the finished rollout is a dialogue too.

Edge rewards: a question earns its SIG; an answer ends the episode (discount 0) and earns `correct_bonus` if
right; any other end (no marker, question limit, length) earns 0 and ends it. Below a terminal node nothing is
called: the edge earns 0, with discount 0, and the state is the terminal one.

How host code runs inside mctx's loop. mctx traces the body of its `fori_loop`, so host code cannot run there
directly. Run with a Python `loop_fn`, mctx's per-simulation tree operations (vmapped while loops for
selection and backup) ran eagerly at ~3.7 s per simulation on this CPU (B = 8, 4 slots, under load), against
~0.06 s for the environment step itself with a scripted doctor. So the search is compiled whole (`search`,
once per shape and settings) and its recurrent_fn reaches the host step through `jax.experimental.io_callback`
(ordered, so steps run once each and in order); 12 simulations then take ~0.1 s besides the compile.

Every sampled turn's key is `row_key(seed, "mcts", case id, simulation, slot)` (rollouts: "mcts-rollout",
case, simulation, turn; eager candidates: "mcts-eager", case, node's simulation, candidate), never a batch
position, so the trees of a batch equal the same trees searched alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import mctx
import numpy as np
from jax.experimental import io_callback

from promed_jax.backends.base import ChatBackend, Message
from promed_jax.consult import protocol
from promed_jax.consult.patients import Patient, PatientRequest
from promed_jax.data.cases import Case
from promed_jax.errors import ConfigError
from promed_jax.mcts.search import NodeState, search_trees
from promed_jax.sampling.keys import row_keys
from promed_jax.shapley.sig import paper_coverage

EXPANSIONS = ("lazy", "eager")
LEAF_VALUES = ("zero", "rollout")
NODE_FIELDS = ("handle", "revealed", "state", "depth", "terminal", "masked")  # `NodeState`, in this order
ROLLOUT_SLOT = -1  # HostNode.slot of a rollout turn (not a tree edge)
NODE_BYTES = 256  # bookkeeping per host node beyond its texts (measured order of a dataclass and its arrays)

# (conversations, replies) -> float[N] mean log-probability of each reply: the eager prior.
Scorer = Callable[[Sequence[Sequence[Message]], Sequence[str]], np.ndarray]


@dataclasses.dataclass
class HostNode:
    """One dialogue state on the host (mutable while its candidates are filled in; private to the search).

    Attributes:
      parent: handle of the parent state (-1 for the root).
      slot: the edge's slot from the parent; ROLLOUT_SLOT for a rollout turn; -1 for the root.
      doctor: the doctor turn that led here ('' at the root).
      reply: the patient's reply to it (None when the turn was no question).
      question: the question asked ('' when none).
      facts: facts the reply revealed (None when the patient cannot know).
      sig: the turn's SIG; reward: the edge reward (SIG, or the answer's bonus).
      end: '' while live, else why the dialogue ended (`protocol.END_*`).
      letters, correct: the final answer.
      depth: doctor turns from the root; n_questions: questions asked so far.
      revealed: bool[n] facts covered so far (cumulative); state: s_t.
      candidates: eager only: the K candidate turns of this node ('' where masked); masked: bool[K];
        prior: float32[K] their mean log-probabilities (0 without a scorer).
      value: the leaf value given to mctx (a rollout's discounted return, or 0).
    """

    parent: int
    slot: int
    doctor: str
    reply: str | None
    question: str
    facts: tuple[int, ...] | None
    sig: float
    reward: float
    end: str
    letters: tuple[str, ...]
    correct: bool
    depth: int
    n_questions: int
    revealed: np.ndarray
    state: float
    candidates: tuple[str, ...] = ()
    masked: tuple[bool, ...] = ()
    prior: np.ndarray | None = None
    value: float = 0.0

    def nbytes(self) -> int:
        texts = (self.doctor, self.reply or "", self.question, *self.candidates)
        return NODE_BYTES + sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + self.revealed.nbytes


@dataclasses.dataclass
class Calls:
    """LLM calls one tree's search cost: doctor turns sampled and patient replies."""

    doctor_turns: int = 0
    patient_replies: int = 0


class DialogueEnv:
    """B cases' dialogue trees: the host tables, the root and mctx's `recurrent_fn` (see the module docstring)."""

    def __init__(
        self,
        cases: Sequence[Case],
        weights: Sequence[np.ndarray],
        doctor: ChatBackend,
        patient: Patient,
        *,
        num_actions: int,
        seed: int,
        expansion: str = "lazy",
        leaf_value: str = "zero",
        decay: float = 0.9,
        correct_bonus: float = 2.0,
        temperature: float = 0.7,
        max_new_tokens: int = 256,
        max_questions: int = 10,
        scorer: Scorer | None = None,
        sig_mode: str = "exact",
        judge: ChatBackend | None = None,
        max_dialogue_tokens: int = 0,
        count_tokens: Callable[[Sequence[Message]], int] | None = None,
        max_state_bytes: int = 0,
    ):
        if expansion not in EXPANSIONS or leaf_value not in LEAF_VALUES:
            raise ValueError(f"expansion {expansion!r} / leaf_value {leaf_value!r}: want {EXPANSIONS} / {LEAF_VALUES}")
        if sig_mode == "paper" and judge is None:
            raise ValueError("sig_mode='paper' needs a judge backend")
        self.cases = list(cases)
        self.weights = [np.asarray(w, np.float64) for w in weights]
        for case, w in zip(self.cases, self.weights, strict=True):
            if w.shape != (case.n_facts,):
                raise ValueError(f"{case.id}: {w.shape[0]} weights for {case.n_facts} facts")
        self.doctor, self.patient, self.judge = doctor, patient, judge
        self.num_actions, self.seed = num_actions, seed
        self.expansion, self.leaf_value, self.sig_mode = expansion, leaf_value, sig_mode
        self.decay, self.correct_bonus = decay, correct_bonus
        self.temperature, self.max_new_tokens, self.max_questions = temperature, max_new_tokens, max_questions
        self.scorer = scorer
        self.max_dialogue_tokens, self.count_tokens = max_dialogue_tokens, count_tokens
        self.max_state_bytes = max_state_bytes
        self.n_facts = max(c.n_facts for c in self.cases)
        self.tables: list[list[HostNode]] = [[] for _ in self.cases]
        self.calls = [Calls() for _ in self.cases]
        self.rollout_ends: list[list[int]] = [[] for _ in self.cases]
        self.first_messages = [protocol.doctor_first_message(c, max_questions=max_questions) for c in self.cases]
        self.simulation = 0
        self.state_bytes = 0
        self.error: Exception | None = None  # raised in the host step; re-raised once the search returns

    # --- the host tables ---------------------------------------------------------------------------------

    def _add(self, b: int, node: HostNode) -> int:
        self.tables[b].append(node)
        self.state_bytes += node.nbytes()
        return len(self.tables[b]) - 1

    def path(self, b: int, handle: int) -> list[HostNode]:
        """The states from the root's first child to `handle`, in order."""
        nodes = []
        while handle > 0:
            node = self.tables[b][handle]
            nodes.append(node)
            handle = node.parent
        return nodes[::-1]

    def messages(self, b: int, handle: int) -> list[Message]:
        """The dialogue of a state, as `consult.rollout.Dialogue.messages`."""
        out: list[Message] = [{"role": "user", "content": self.first_messages[b]}]
        for node in self.path(b, handle):
            out.append({"role": "assistant", "content": node.doctor})
            if node.reply is not None:
                out.append({"role": "user", "content": node.reply})
        return out

    def finished(self, b: int) -> list[int]:
        """Handles of tree b's finished dialogues: ended tree nodes, then rollout ends, in creation order."""
        return [h for h, node in enumerate(self.tables[b]) if node.end]

    def _history(self, b: int, handle: int) -> tuple[tuple[str, str], ...]:
        return tuple((n.question, n.reply) for n in self.path(b, handle) if n.reply is not None)

    # --- the root ----------------------------------------------------------------------------------------

    def root(self) -> mctx.RootFnOutput:
        """The B roots (handle 0 in every table); eager expansion samples the roots' candidates here."""
        for b, case in enumerate(self.cases):
            revealed = np.zeros(case.n_facts, bool)
            revealed[list(case.known)] = True
            self._add(
                b,
                HostNode(
                    -1,
                    -1,
                    "",
                    None,
                    "",
                    None,
                    0.0,
                    0.0,
                    "",
                    (),
                    False,
                    0,
                    0,
                    revealed,
                    float(self.weights[b] @ revealed),
                ),
            )
        priors = self._prepare(list(range(len(self.cases))), [0] * len(self.cases), simulation=0)
        fields = self._embedding_arrays([(b, 0) for b in range(len(self.cases))])
        return mctx.RootFnOutput(
            prior_logits=jnp.asarray(priors),
            value=jnp.zeros(len(self.cases)),
            embedding=NodeState(**dict(zip(NODE_FIELDS, map(jnp.asarray, fields), strict=True))),
        )

    def _embedding_arrays(self, rows: Sequence[tuple[int, int]], dead: Sequence[bool] = ()) -> tuple[np.ndarray, ...]:
        """The `NodeState` fields (handle, revealed, state, depth, terminal, masked) of states (tree, handle);
        `dead` marks rows whose edge was masked (a terminal state with the parent's handle)."""
        batch = len(rows)
        revealed = np.zeros((batch, self.n_facts), bool)
        masked = np.zeros((batch, self.num_actions), bool)
        handle, state, depth, terminal = (np.zeros(batch, t) for t in (np.int32, np.float32, np.int32, bool))
        for i, (b, h) in enumerate(rows):
            node = self.tables[b][h]
            revealed[i, : node.revealed.shape[0]] = node.revealed
            if node.masked:
                masked[i] = node.masked
            handle[i], state[i], depth[i] = h, node.state, node.depth
            terminal[i] = bool(node.end) or (bool(dead) and dead[i])
        return handle, revealed, state, depth, terminal, masked

    # --- one simulation ----------------------------------------------------------------------------------

    def step(self, action: np.ndarray, parents: np.ndarray, stopped: np.ndarray):
        """One simulation for the B trees (host code): the selected slots `action` int[B] at the states `parents`
        int[B] (handles), `stopped` bool[B] where that state is terminal. Returns numpy arrays: reward, discount,
        value float32[B], prior logits float32[B, A] and the new states' embedding fields (`NodeState`)."""
        simulation = self.simulation
        self.simulation += 1
        batch = len(self.cases)
        dead = [False] * batch
        turns: dict[int, str] = {}
        to_sample = []
        for b in range(batch):
            if stopped[b]:
                continue
            parent = self.tables[b][parents[b]]
            if self.expansion == "eager":
                if parent.masked[action[b]]:
                    dead[b] = True
                else:
                    turns[b] = parent.candidates[action[b]]
            else:
                to_sample.append(b)
        if to_sample:
            keys = row_keys(self.seed, [("mcts", self.cases[b].id, simulation, int(action[b])) for b in to_sample])
            texts = self._sample([self.messages(b, int(parents[b])) for b in to_sample], keys)
            for b, text in zip(to_sample, texts, strict=True):
                self.calls[b].doctor_turns += 1
                turns[b] = text
        order = sorted(turns)
        created = self._advance([(b, int(parents[b]), turns[b], int(action[b])) for b in order])
        handles = dict(zip(order, created, strict=True))
        live = [b for b in order if not self.tables[b][handles[b]].end]
        self._prepare(live, [handles[b] for b in live], simulation=simulation + 1)
        if self.leaf_value == "rollout":
            self._rollout(live, [handles[b] for b in live], simulation)
        if self.max_state_bytes and self.state_bytes > self.max_state_bytes:
            raise ConfigError(
                f"config mcts.max_state_bytes={self.max_state_bytes}: the search state of {batch} trees reached "
                f"{self.state_bytes} bytes at simulation {simulation}; lower mcts.batch_trees or raise the budget"
            )
        reward = np.zeros(batch, np.float32)
        discount = np.zeros(batch, np.float32)
        value = np.zeros(batch, np.float32)
        priors = np.zeros((batch, self.num_actions), np.float32)
        for b in order:
            node = self.tables[b][handles[b]]
            reward[b] = node.reward
            if not node.end:
                discount[b], value[b] = self.decay, node.value
                priors[b] = self._priors(node)
        rows = [(b, handles.get(b, int(parents[b]))) for b in range(batch)]
        return reward, discount, value, priors, self._embedding_arrays(rows, dead)

    def _sample(self, conversations: list[list[Message]], keys) -> list[str]:
        cache = getattr(self.doctor, "prefix_cache", None)
        if cache is not None and self.max_state_bytes:
            # The KV prefix cache and the host tables share the budget; the cache gives way.
            cache.max_bytes = max(1, self.max_state_bytes - self.state_bytes)
            cache.shrink()
        return self.doctor.chat(conversations, max_tokens=self.max_new_tokens, temperature=self.temperature, keys=keys)

    def _priors(self, node: HostNode) -> np.ndarray:
        if not node.masked:
            return np.zeros(self.num_actions, np.float32)
        return np.where(node.masked, np.finfo(np.float32).min, node.prior).astype(np.float32)

    def _prepare(self, trees: list[int], handles: list[int], *, simulation: int) -> np.ndarray:
        """Eager expansion: samples and scores K candidates for each new live node (one doctor call); returns the
        priors float32[len(trees), K] (zeros for lazy expansion)."""
        priors = np.zeros((len(trees), self.num_actions), np.float32)
        if self.expansion != "eager" or not trees:
            return priors
        k = self.num_actions
        conversations = [self.messages(b, h) for b, h in zip(trees, handles, strict=True) for _ in range(k)]
        keys = row_keys(self.seed, [("mcts-eager", self.cases[b].id, simulation, j) for b in trees for j in range(k)])
        texts = self._sample(conversations, keys)
        scores = np.zeros(len(texts)) if self.scorer is None else np.asarray(self.scorer(conversations, texts))
        for i, (b, h) in enumerate(zip(trees, handles, strict=True)):
            self.calls[b].doctor_turns += k
            mine, seen, masked = texts[i * k : (i + 1) * k], set(), []
            for text in mine:
                masked.append(not text.strip() or text.strip() in seen)
                seen.add(text.strip())
            node = self.tables[b][h]
            node.candidates = tuple("" if m else t for t, m in zip(mine, masked, strict=True))
            node.masked = tuple(masked)
            node.prior = scores[i * k : (i + 1) * k].astype(np.float32)
            self.state_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in node.candidates)
            priors[i] = np.where(masked, np.finfo(np.float32).min, node.prior)
        return priors

    def _advance(self, items: list[tuple[int, int, str, int]]) -> list[int]:
        """Applies doctor turns (tree, parent handle, text, slot) to their states: parse, one patient call for the
        questions, SIG; returns the new states' handles, in order."""
        parsed = []
        asking = []
        for i, (b, parent, text, _) in enumerate(items):
            case, node = self.cases[b], self.tables[b][parent]
            turn = protocol.parse_doctor_turn(
                text, case.options, questions_allowed=self.max_questions > 0, multi_answer=case.multi_answer
            )
            if turn.kind == protocol.ANSWER:
                parsed.append((protocol.END_ANSWER if turn.letters else protocol.END_NO_LETTER, turn.letters, ""))
            elif turn.kind == protocol.INVALID:
                parsed.append((turn.reason, (), ""))
            elif node.n_questions >= self.max_questions:
                parsed.append((protocol.END_QUESTION_LIMIT, (), ""))
            else:
                parsed.append(("", (), turn.question))
                asking.append(i)
        requests = [
            PatientRequest(
                case=self.cases[items[i][0]], question=parsed[i][2], history=self._history(items[i][0], items[i][1])
            )
            for i in asking
        ]
        replies = dict(zip(asking, self.patient.reply(requests), strict=True)) if requests else {}
        coverage = self._coverage(items, parsed, replies)
        handles = []
        for i, (b, parent, text, slot) in enumerate(items):
            case, node = self.cases[b], self.tables[b][parent]
            end, letters, question = parsed[i]
            reply = replies.get(i)
            revealed = coverage[i] | node.revealed
            sig = float(self.weights[b] @ (revealed & ~node.revealed))
            correct = end == protocol.END_ANSWER and protocol.is_correct(letters, case.answer)
            reward = sig if reply is not None else (self.correct_bonus if correct else 0.0)
            if reply is not None:
                self.calls[b].patient_replies += 1
            new = HostNode(
                parent,
                slot,
                text,
                None if reply is None else reply.text,
                question,
                None if reply is None else reply.facts,
                sig,
                reward,
                end,
                letters,
                correct,
                node.depth + 1,
                node.n_questions + (reply is not None),
                revealed,
                node.state + sig,
            )
            handle = self._add(b, new)
            if not end and self._too_long(b, handle):
                new.end = protocol.END_LENGTH
            handles.append(handle)
        return handles

    def _too_long(self, b: int, handle: int) -> bool:
        """The next doctor turn could overflow `max_dialogue_tokens` (as `consult` decides END_LENGTH)."""
        if not self.max_dialogue_tokens or self.count_tokens is None:
            return False
        return self.count_tokens(self.messages(b, handle)) + self.max_new_tokens > self.max_dialogue_tokens

    def _coverage(self, items, parsed, replies) -> list[np.ndarray]:
        """bool[n] per item: the facts the turn's reply covers (before OR-ing with the parent's)."""
        out = [np.zeros(self.cases[b].n_facts, bool) for b, *_ in items]
        if self.sig_mode == "exact":
            for i, reply in replies.items():
                if reply.facts is None:
                    raise ValueError(
                        "sig_mode='exact' needs a patient that reports the facts it revealed "
                        "(fact_select); use shapley.sig_mode='paper' with an LLM patient"
                    )
                out[i][list(reply.facts)] = True
            return out
        asked = sorted(replies)
        dialogues = []
        for i in asked:
            b, parent = items[i][0], items[i][1]
            turns = (*self._history(b, parent), (parsed[i][2], replies[i].text))
            dialogues.append((self.cases[b], turns))
        for i, cov in zip(asked, paper_coverage(self.judge, dialogues) if dialogues else [], strict=True):
            out[i] = cov.coverage[-1]
        return out

    def _rollout(self, trees: list[int], handles: list[int], simulation: int) -> None:
        """Finishes each new live state with the doctor, batched across trees; sets its value to the rollout's
        discounted return."""
        live = list(zip(trees, handles, strict=True))
        current = dict(live)
        turn = 0
        while True:
            running = [b for b, _ in live if not self.tables[b][current[b]].end]
            if not running:
                break
            keys = row_keys(self.seed, [("mcts-rollout", self.cases[b].id, simulation, turn) for b in running])
            texts = self._sample([self.messages(b, current[b]) for b in running], keys)
            for b in running:
                self.calls[b].doctor_turns += 1
            created = self._advance([(b, current[b], t, ROLLOUT_SLOT) for b, t in zip(running, texts, strict=True)])
            current.update(zip(running, created, strict=True))
            turn += 1
        for b, start in live:
            ret, scale = 0.0, 1.0
            for node in self.path(b, current[b])[self.tables[b][start].depth :]:
                ret += scale * node.reward
                scale *= self.decay
            self.tables[b][start].value = ret


# --- the search over the environment --------------------------------------------------------------------------

# The environments being searched, by the token their jitted search passes to the host step. The compiled
# search is cached by shapes and settings, not by environment, so every batch of a run reuses it.
_ACTIVE: dict[int, DialogueEnv] = {}
_TOKENS = itertools.count()


def _host_step(token, action, handle, terminal):
    env = _ACTIVE[int(token)]
    batch = len(env.cases)
    if env.error is None:
        try:
            return env.step(np.asarray(action), np.asarray(handle), np.asarray(terminal))
        except Exception as e:  # noqa: BLE001 (any error, a bug too, is re-raised by `search` as itself)
            env.error = e
    zeros = np.zeros(batch, np.float32)
    fields = env._embedding_arrays([(b, 0) for b in range(batch)])
    return zeros, zeros, zeros, np.zeros((batch, env.num_actions), np.float32), fields


@functools.partial(jax.jit, static_argnames=("policy", "num_simulations", "c_uct"))
def _search(token, root, keys, invalid, *, policy: str, num_simulations: int, c_uct: float) -> mctx.Tree:
    batch, num_actions = root.prior_logits.shape
    node = root.embedding
    shapes = (
        *(jax.ShapeDtypeStruct((batch,), jnp.float32) for _ in range(3)),
        jax.ShapeDtypeStruct((batch, num_actions), jnp.float32),
        tuple(jax.ShapeDtypeStruct(getattr(node, f).shape, getattr(node, f).dtype) for f in NODE_FIELDS),
    )

    def recurrent_fn(params, rng_key, action, node: NodeState):
        del params, rng_key
        reward, discount, value, prior, fields = io_callback(
            _host_step, shapes, token, action, node.handle, node.terminal, ordered=True
        )
        out = mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=prior, value=value)
        return out, NodeState(**dict(zip(NODE_FIELDS, fields, strict=True)))

    return search_trees(
        root, recurrent_fn, keys, policy=policy, num_simulations=num_simulations, c_uct=c_uct, invalid_actions=invalid
    )


def search(env: DialogueEnv, keys, *, policy: str, num_simulations: int, c_uct: float) -> mctx.Tree:
    """Searches the environment's B trees: mctx's loop compiled once per shape, the host step called from it.
    A doctor that can (`LocalBackend.caching_prefixes`) keeps prompt KV caches for the search, within
    `max_state_bytes`: a node's turn then prefills only the tokens its dialogue adds to an earlier prompt."""
    caching = getattr(env.doctor, "caching_prefixes", None)
    with caching(env.max_state_bytes) if caching else contextlib.nullcontext():
        return _search_with(env, keys, policy=policy, num_simulations=num_simulations, c_uct=c_uct)


def _search_with(env: DialogueEnv, keys, *, policy: str, num_simulations: int, c_uct: float) -> mctx.Tree:
    root = env.root()
    token = next(_TOKENS)
    _ACTIVE[token] = env
    try:
        tree = _search(
            jnp.int32(token),
            root,
            keys,
            root.embedding.masked,
            policy=policy,
            num_simulations=num_simulations,
            c_uct=c_uct,
        )
        jax.block_until_ready(tree)
    finally:
        del _ACTIVE[token]
    if env.error is not None:
        raise env.error
    return tree
