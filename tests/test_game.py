"""The batched coalition game: batched == separately built prompts, prefix reuse == no reuse, sharded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from promed_jax import assets
from promed_jax.data.cases import Case, load_cases
from promed_jax.errors import ConfigError
from promed_jax.models.checkpoints import load_gguf
from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer, causal_mask
from promed_jax.shapley import estimators as est
from promed_jax.shapley import game as game_lib
from promed_jax.shapley import layout
from promed_jax.shapley import plan as plan_lib
from promed_jax.sharding import make_mesh
from promed_jax.text import prompts
from promed_jax.text.tokenizer import build_tiny_tokenizer, load_tokenizer

EN_CASE = Case(
    id="test:en",
    source="test",
    language="en",
    initial_info="A 45 year old man comes with chest pain.",
    question="What is the most likely diagnosis?",
    options={"A": "myocardial infarction", "B": "pneumonia", "C": "asthma"},
    answer=("A",),
    facts=(
        "The patient is a 45 year old man.",
        "The pain started two hours ago.",
        "The pain goes to his left arm.",
        "He feels short of breath.",
        "His father had a heart attack.",
    ),
)
ZH_CASE = Case(
    id="test:zh",
    source="test",
    language="zh",
    initial_info="患者男，45岁。",
    question="最可能的诊断是",
    options={"A": "心肌梗死", "B": "肺炎", "C": "哮喘"},
    answer=("A", "C"),
    facts=("患者男，45岁", "胸痛2小时。", "疼痛放射至左臂"),
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    # Sharpen the random model so that coalition values differ by far more than the tolerances below.
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 2.0, params))


@pytest.fixture(scope="module")
def game(model, tokenizer):
    return game_lib.CoalitionGame(model, tokenizer, batch_size=16)


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(graphdef, params, tokens, valid):
    """[1, T] right-padded prompt -> log-softmax [T, V] (padding after a token cannot change it)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, causal_mask(valid), use_lora=False)
    return jax.nn.log_softmax(logits[0], axis=-1)


def separate_value(model, prompt: layout.ValuePrompt, coalition) -> float:
    """v(S) from the coalition's own prompt, built and scored alone at batch 1 (the definition)."""
    ids, start = layout.coalition_ids(prompt, coalition)
    slots = layout.length_bucket(ids.size, minimum=128)  # one compilation for many prompt lengths
    tokens = np.zeros((1, slots), np.int32)
    tokens[0, : ids.size] = ids
    graphdef, params = nnx.split(model)
    logp = np.asarray(_log_probs(graphdef, params, tokens, np.arange(slots)[None] < ids.size))
    return float(np.mean(logp[np.arange(start - 1, ids.size - 1), ids[start:]]))


def test_pieces_drop_exactly_a_facts_tokens(tokenizer):
    prompt = layout.tokenize_value_prompt(tokenizer, EN_CASE)
    full, start = layout.coalition_ids(prompt, [True] * 5)
    header, facts, question, answer = prompts.shapley_value_pieces(
        language="en", facts=EN_CASE.facts, question=EN_CASE.question, answer=EN_CASE.gold_text
    )
    text = tokenizer.decode(full)
    assert text == header + "".join(facts) + question + answer
    assert text.startswith("You are a professional doctor") and text.endswith("answer: myocardial infarction")
    dropped, _ = layout.coalition_ids(prompt, [True, False, True, True, True])
    assert dropped.size == full.size - prompt.facts[1].size
    empty, empty_start = layout.coalition_ids(prompt, [False] * 5)
    assert tokenizer.decode(empty[:empty_start]).endswith(
        "Patient information:\n\nQuestion: " + EN_CASE.question + "\nanswer:"
    )
    np.testing.assert_array_equal(full[start:], prompt.answer)


def test_chunk_sizes():
    assert layout.chunk_sizes(18, 4, 64) == [16, 2]
    assert layout.chunk_sizes(128, 4, 64) == [64, 64]
    assert layout.chunk_sizes(100, 8, 64) == [64, 32, 4]
    assert layout.chunk_sizes(3, 4, 64) == [3]
    assert layout.chunk_sizes(40, 8, 24) == [16, 16, 8]
    assert layout.chunk_sizes(0, 4, 64) == []


def test_length_buckets_are_few():
    buckets = {layout.length_bucket(n) for n in range(1, 513)}
    assert sorted(buckets) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 368, 432, 512]
    assert all(layout.length_bucket(n) <= max(16, 1.2 * n + 16) for n in range(1, 2000))
    assert all(layout.length_bucket(n) >= n for n in range(1, 2000))


@pytest.mark.parametrize("case", [EN_CASE, ZH_CASE], ids=["en", "zh"])
def test_batched_equals_separate_prompts(game, model, tokenizer, case):
    prompt = game.prompt(case)
    coalitions = est.all_coalitions(case.n_facts)
    batched = game.values(prompt, coalitions)  # all of them: several chunks and length buckets
    some = np.arange(0, len(coalitions), 3 if case.n_facts > 3 else 1)
    separate = np.array([separate_value(model, prompt, coalitions[k]) for k in some])
    batched = batched[some]
    np.testing.assert_allclose(batched, separate, atol=1e-4, rtol=0)
    assert np.ptp(separate) > 0.05  # the comparison is not between near-constants


def test_prefix_reuse_equals_no_reuse(game, model, tokenizer):
    plain = game_lib.CoalitionGame(model, tokenizer, batch_size=16, reuse_prefix=False)
    coalitions = est.all_coalitions(5)
    np.testing.assert_allclose(
        game.values(game.prompt(EN_CASE), coalitions), plain.values(plain.prompt(EN_CASE), coalitions), atol=1e-4
    )


def test_plan_levels_by_hand():
    lens = np.array([10, 10])
    everything = est.all_coalitions(2)  # 00, 10, 01, 11
    sizes = {"min_batch": 1, "batch_size": 16}
    # Flat: one forward of 4 rows of 24 slots (the longest row, 20 tokens, rounded up to 8s): 96 + c.
    # Cut after fact 0: the node "fact 0 kept" (16 slots) + c, then 4 leaves of 16 slots + c: 80 + 2c.
    assert plan_lib.level_cost(np.array([1, 10, 10, 20]), call_cost=5, **sizes) == 5 + 4 * 24
    assert plan_lib.level_cost(np.array([0, 10, 0]), call_cost=5, **sizes) == 5 + 16  # empty nodes are copies
    assert plan_lib.plan_levels(lens, everything, call_cost=15, **sizes) == [1, 2]
    assert plan_lib.plan_levels(lens, everything, call_cost=17, **sizes) == [2]
    assert plan_lib.plan_levels(lens, np.ones((1, 2), bool), call_cost=0, **sizes) == [2]  # nothing shared
    bounds = plan_lib.plan_levels(np.array([5] * 6), est.all_coalitions(6), **sizes)  # all coalitions: a tree
    assert len(bounds) >= 3 and bounds[-1] == 6 and bounds == sorted(set(bounds))


def test_fact_tree_equals_flat_layout(game, model, tokenizer):
    prompt = game.prompt(EN_CASE)
    coalitions = est.all_coalitions(5)
    [(_, tree)] = game.plans(prompt, coalitions)
    levels = tree.levels
    assert len(levels) > 2 and len(levels[-1].rows) == 32  # a real tree: shared levels above the leaves
    flat = game_lib.CoalitionGame(model, tokenizer, batch_size=16, share_facts=False)
    assert [len(tree.levels) for _, tree in flat.plans(prompt, coalitions)] == [1]
    np.testing.assert_allclose(game.values(prompt, coalitions), flat.values(prompt, coalitions), atol=1e-4)
    # Any subset, in any order, duplicates included: values follow the rows.
    rows = np.random.default_rng(1).integers(0, 32, size=13)
    np.testing.assert_allclose(game.values(prompt, coalitions[rows]), flat.values(prompt, coalitions)[rows], atol=1e-4)


def test_sharded_over_data_axis(game, model, tokenizer):
    mesh = make_mesh((-1,), ("data",))
    assert mesh.shape["data"] == 8
    sharded = game_lib.CoalitionGame(model, tokenizer, batch_size=16, mesh=mesh)
    coalitions = est.all_coalitions(5)[::3]  # 11 rows: padded to the mesh
    np.testing.assert_allclose(
        sharded.values(sharded.prompt(EN_CASE), coalitions), game.values(game.prompt(EN_CASE), coalitions), atol=1e-4
    )


def test_estimators_on_tiny_lm_game(game):
    exact, n_evals = est.exact(game.value_fn(EN_CASE), 5)
    assert n_evals == 32
    values = game.value_fn(EN_CASE)
    v = values(np.stack([np.zeros(5, bool), np.ones(5, bool)]))
    assert exact.sum() == pytest.approx(v[1] - v[0], abs=1e-5)
    for name in ("antithetic", "kernel_shap", "permutation"):
        phi, _ = est.choose_estimator(5, exact_max_n=0, fallback=name)[1](values, 5, budget=400, key=0)
        assert phi.sum() == pytest.approx(v[1] - v[0], abs=1e-5)
        # Large budgets on 5 players: close to exact.
        assert np.abs(phi - exact).sum() < 0.25 * np.abs(exact).sum() + 1e-3, (name, phi, exact)


def test_bad_coalition_shape(game):
    with pytest.raises(ValueError, match=r"bool\[K, 5\]"):
        game.values(game.prompt(EN_CASE), np.ones((2, 4), bool))


@pytest.mark.slow
def test_smollm2_batched_equals_separate_on_medqa(data_dir, smollm2_gguf):
    case = next(c for c in load_cases(data_dir / "medqa_dev_convo.jsonl", on_error="skip") if 5 <= c.n_facts <= 8)
    model = load_gguf(assets.smollm2_gguf_path())
    tokenizer = load_tokenizer(assets.smollm2_gguf_path())
    model.materialize_head()
    smol_game = game_lib.CoalitionGame(model, tokenizer, batch_size=4)
    prompt = smol_game.prompt(case)
    rng = np.random.default_rng(0)
    some = rng.random((3, case.n_facts)) < 0.5
    coalitions = np.concatenate([np.zeros((1, case.n_facts), bool), np.ones((1, case.n_facts), bool), some, ~some])
    assert len(smol_game.plans(prompt, coalitions)[0][1].levels) > 1  # the fact tree is exercised, not only the flat layout
    batched = smol_game.values(prompt, coalitions)
    separate = np.array([separate_value(model, prompt, c) for c in coalitions])
    np.testing.assert_allclose(batched, separate, atol=1e-4, rtol=0)


LONG_CASE = Case(
    id="test:long",
    source="test",
    language="en",
    initial_info="A 60 year old woman comes with a cough.",
    question="What is the most likely diagnosis?",
    options={"A": "pneumonia", "B": "asthma"},
    answer=("A",),
    facts=tuple(f"Finding {i}: the patient reports symptom number {i}." for i in range(12)),
)


def test_memory_model_from_config(model):
    memory = plan_lib.MemoryModel.of(model.config)
    assert memory.kv_slot_bytes == 2 * 2 * 2 * 16 * 4  # keys and values x layers x kv heads x head dim x fp32
    # The flat layout of 5 coalitions: chunks of 4 and 1 (padded to 4) after the header's row; the peak is the
    # header and one chunk's rows twice (gathered, then written).
    prompt = layout.tokenize_value_prompt(build_tiny_tokenizer(), EN_CASE)
    tree = plan_lib.plan_tree(prompt, est.all_coalitions(5)[:5], plan_lib.Batching(4, 16), share_facts=False, tail_slots=8)
    assert tree.header_slots == layout.length_bucket(prompt.prefix.size)
    assert tree.peak_cache_slots == tree.header_slots + 2 * 4 * tree.slots
    assert memory.plan_bytes(tree, 8) > tree.peak_cache_slots * memory.kv_slot_bytes
    # With the fact tree, every level's rows have the whole row's slots: one shape for the call's forwards.
    [(_, deep)] = game_lib.CoalitionGame(model, build_tiny_tokenizer()).plans(prompt, est.all_coalitions(5))
    assert len(deep.levels) > 1 and {level.slots for level in deep.levels} == {deep.slots}


# A long last fact, as medqa_dev_convo:20 (its 8th fact is 197 of the prompt's 402 SmolLM2 tokens).
LONG_LAST_CASE = dataclasses.replace(
    LONG_CASE,
    id="test:long_last",
    facts=(*(f"Finding {i}: symptom {i}." for i in range(11)), "Her chart: " + " ".join(f"item {i} normal;" for i in range(40))),
)


def hand_prompt(fact_lens, prefix=28, question=20, answer=3) -> layout.ValuePrompt:
    """A value prompt of given token counts (ids are irrelevant to planning)."""
    ids = lambda k: np.ones(k, np.int32)
    return layout.ValuePrompt(ids(prefix), tuple(ids(k) for k in fact_lens), ids(question), ids(answer))


SMOLLM2_MEMORY = plan_lib.MemoryModel.of(  # SmolLM2-135M's shapes (tests/test_smollm.py reads them from the GGUF)
    ModelConfig.tiny(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64
    )
)


def test_budget_groups_keep_a_long_facts_leaves_apart(monkeypatch):
    # medqa_dev_convo:20's token counts, SmolLM2's shapes, the default 1 GiB: the whole tree needs ~6 GB. Sorted
    # by the facts' own order, every group of 16 mixes leaves with and without the 197-token fact, all padded
    # to its width; led by that fact, a group holds it present or absent.
    prompt, coalitions, batching = hand_prompt([12, 14, 62, 16, 22, 28, 23, 197]), est.all_coalitions(8), plan_lib.Batching(4, 16)
    options = {"share_facts": True, "tail_slots": 8, "memory": SMOLLM2_MEMORY}
    [(_, whole)] = plan_lib.plan_groups(prompt, coalitions, batching, max_bytes=None, **options)
    cost = lambda groups: sum(plan_lib.plan_cost(tree, batching) for _, tree in groups)
    groups = plan_lib.plan_groups(prompt, coalitions, batching, max_bytes=2**30, **options)
    assert len(groups) > 1 and all(SMOLLM2_MEMORY.plan_bytes(tree, 8) <= 2**30 for _, tree in groups)
    assert sorted(np.concatenate([rows for rows, _ in groups]).tolist()) == list(range(256))
    assert cost(groups) < 1.25 * cost([(None, whole)])
    monkeypatch.setattr(plan_lib, "key_orders", lambda lens: [tuple(range(len(lens)))])
    assert cost(plan_lib.plan_groups(prompt, coalitions, batching, max_bytes=2**30, **options)) > 1.4 * cost([(None, whole)])


def test_a_small_group_that_does_not_fit_keeps_its_tree_in_narrower_forwards():
    # 16 coalitions sharing 5 leading facts, a 197-token fact in every leaf: the tree of 16-row forwards does not
    # fit 1 GiB; 8-row forwards of the tree cost less than the flat layout (every row recomputing its facts).
    prompt, batching = hand_prompt([12, 14, 62, 16, 22, 28, 23, 197]), plan_lib.Batching(4, 16)
    coalitions = est.all_coalitions(8)[np.all(est.all_coalitions(8)[:, [0, 1, 2, 7]], axis=1)]
    assert len(coalitions) == 16
    options = {"share_facts": True, "tail_slots": 8, "memory": SMOLLM2_MEMORY}
    [(_, tree)] = plan_lib.plan_groups(prompt, coalitions, batching, max_bytes=None, **options)
    assert SMOLLM2_MEMORY.plan_bytes(tree, 8) > 2**30
    [(_, fitted)] = plan_lib.plan_groups(prompt, coalitions, batching, max_bytes=2**30, **options)
    assert SMOLLM2_MEMORY.plan_bytes(fitted, 8) <= 2**30
    assert len(fitted.levels) > 1 and max(c.rows for level in fitted.levels for c in level.chunks) == 8
    flat = plan_lib.plan_tree(prompt, coalitions, batching, share_facts=False, tail_slots=8)
    assert plan_lib.plan_cost(fitted, batching) < plan_lib.plan_cost(flat, batching)


@pytest.mark.parametrize("case", [LONG_CASE, LONG_LAST_CASE], ids=["even", "long_last"])
def test_budget_cuts_coalitions_into_groups_with_equal_values(tokenizer, monkeypatch, case):
    # Deeper than the tiny model, so that the KV cache, not one forward's activations, dominates (as with
    # SmolLM2, whose 30 layers x 3 KV heads keep ~46 kB per slot and row).
    model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer), num_layers=6, num_kv_heads=4), rngs=nnx.Rngs(1))
    game = game_lib.CoalitionGame(model, tokenizer, batch_size=16)
    prompt = game.prompt(case)
    coalitions = np.random.default_rng(0).random((104, 12)) < 0.5  # kernel_shap's 8(n+1) at n = 12
    [(_, whole)] = game.plans(prompt, coalitions)
    assert len(whole.levels) > 1
    need = game.memory.plan_bytes(whole, 8)
    budget = need // 3
    budgeted = game_lib.CoalitionGame(model, tokenizer, batch_size=16, max_cache_bytes=budget)
    groups = budgeted.plans(prompt, coalitions)
    assert len(groups) >= 3 and all(budgeted.memory.plan_bytes(tree, 8) <= budget for _, tree in groups)
    assert sorted(np.concatenate([rows for rows, _ in groups]).tolist()) == list(range(104))
    done = []  # progress within one call: one report per group, adding up to the call's coalitions
    trims = []  # the C heap is trimmed between groups (what glibc keeps of a group's freed rows)
    monkeypatch.setattr(game_lib.memory, "trim_heap", lambda: trims.append(len(done)))
    values = budgeted.values(prompt, coalitions, progress=done.append)
    assert done == [len(rows) for rows, _ in groups]
    assert trims == list(range(1, len(groups)))
    np.testing.assert_allclose(values, game.values(prompt, coalitions), atol=1e-5, rtol=0)
    some = [0, 17, 50, 103]
    separate = np.array([separate_value(model, prompt, coalitions[k]) for k in some])
    np.testing.assert_allclose(values[some], separate, atol=1e-4, rtol=0)
    # A budget the whole tree fits in plans it as without one.
    roomy = game_lib.CoalitionGame(model, tokenizer, batch_size=16, max_cache_bytes=need)
    assert len(roomy.plans(prompt, coalitions)) == 1


def test_budget_below_one_forward_is_a_config_error(model, tokenizer):
    tight = game_lib.CoalitionGame(model, tokenizer, batch_size=16, max_cache_bytes=10_000)
    with pytest.raises(ConfigError, match=r"^shapley\.max_cache_bytes=10000: one forward of"):
        tight.values(tight.prompt(EN_CASE), est.all_coalitions(5))
    with pytest.raises(ConfigError, match=r"shapley\.max_cache_bytes=0"):
        game_lib.CoalitionGame(model, tokenizer, max_cache_bytes=0)


def test_compiled_executables_are_bounded_between_cases(model, tokenizer):
    bounded = game_lib.CoalitionGame(model, tokenizer, batch_size=16, max_executables=1)
    coalitions = est.all_coalitions(3)
    first = bounded.value_fn(ZH_CASE)(coalitions)
    assert bounded.executables > 1
    again = bounded.value_fn(ZH_CASE)  # a new case starts: past the bound, the compiled functions go
    assert bounded.executables == 0
    np.testing.assert_allclose(again(coalitions), first, atol=1e-6)
    kept = game_lib.CoalitionGame(model, tokenizer, batch_size=16, max_executables=None)
    kept.value_fn(ZH_CASE)(coalitions)
    count = kept.executables
    kept.value_fn(ZH_CASE)
    assert kept.executables == count > 1


def test_budget_narrows_the_forwards_of_long_prompts(game, model, tokenizer):
    prompt = game.prompt(LONG_CASE)
    coalitions = np.random.default_rng(2).random((16, 12)) < 0.5  # one chunk of 16 rows, unbudgeted
    flat = plan_lib.plan_tree(prompt, coalitions, game.batching, share_facts=False, tail_slots=8)
    budget = flat.peak_cache_slots * game.memory.kv_slot_bytes * 9 // 10  # below the cache of 16 flat rows
    narrow = game_lib.CoalitionGame(model, tokenizer, batch_size=16, share_facts=False, max_cache_bytes=budget)
    groups = narrow.plans(prompt, coalitions)
    rows = {chunk.rows for _, tree in groups for level in tree.levels for chunk in level.chunks}
    assert max(rows) < 16 and all(narrow.memory.plan_bytes(tree, 8) <= budget for _, tree in groups)
    # other row counts per forward: float32 sums in another order (1.9e-5 seen on values of ~13), as the batching tests
    np.testing.assert_allclose(narrow.values(prompt, coalitions), game.values(prompt, coalitions), atol=1e-4, rtol=0)
