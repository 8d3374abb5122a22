"""SFT: chunked log-probs against the full log-softmax, the step's accumulation, masking and LoRA freezing, the
dialogue reader, the naive doctor, and a tiny model that learns its trained turns (greedy decoding replays them)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from promed_jax.errors import DataError
from promed_jax.models import ModelConfig, Transformer
from promed_jax.models.lora import BASE_PARAMS, LoRAParam
from promed_jax.sharding import make_mesh
from promed_jax.training import data as data_lib
from promed_jax.training import state as S
from promed_jax.training.logprobs import chunk_width, token_logprobs
from promed_jax.training.sft import make_sft_loss

CFG = ModelConfig.tiny(vocab_size=97, tie_word_embeddings=True)
CHUNK = 40  # 97 columns: three blocks, the last padded


def _model(cfg=CFG, seed=0):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _batch(rows=8, t=16, seed=0, microbatches=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, rows)
    valid = np.arange(t)[None] < lengths[:, None]
    weights = valid & (rng.random((rows, t)) < 0.5)
    targets = np.where(valid, np.roll(tokens, -1, axis=1), 0).astype(np.int32)
    shape = (microbatches, rows // microbatches, t)
    return {
        k: v.reshape(shape)
        for k, v in {"tokens": tokens, "targets": targets, "weights": weights, "valid": valid}.items()
    }


@pytest.mark.parametrize("vocab,chunk", [(97, 40), (96, 40)])  # padded last block; 32-column blocks
def test_chunked_logprobs_equal_the_full_log_softmax(vocab, chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, 5, 8)) * 3
    head = jax.random.normal(k2, (8, vocab))
    targets = jax.random.randint(k3, (3, 5), 0, vocab)

    def full(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def chunked(h, w):
        return token_logprobs(h, w, targets, chunk=chunk)

    @jax.jit
    def both(h, w):
        def value_and_grads(f):
            return f(h, w), jax.grad(lambda h, w: (f(h, w) * jnp.arange(15.0).reshape(3, 5)).sum(), (0, 1))(h, w)

        return value_and_grads(chunked), value_and_grads(full)

    (ours, our_grads), (ref, ref_grads) = both(hidden, head)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    for a, b in zip(our_grads, ref_grads, strict=True):  # the backward's softmax is exp(logit - lse): fp32 rounding
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


def test_chunk_width_prefers_a_divisor():
    assert chunk_width(49152, 8192) == 8192
    assert chunk_width(97, 40) == 40  # 97 is prime: padded
    assert chunk_width(96, 40) == 32 and chunk_width(7, 64) == 7


@pytest.fixture(scope="module")
def grad_fn():
    """batch -> (loss, gradient of the mean) of one tiny model, jitted once (shared by the tests below)."""
    graphdef, params, frozen = S.split_for_training(_model(), lora=False)

    @jax.jit
    def grads(batch):
        total, count, g, _ = S.accumulate(make_sft_loss(CHUNK), graphdef, params, frozen, batch, jax.random.key(0))
        return total / count, jax.tree.map(lambda x: x / count, g)

    return grads


def test_labels_outside_the_doctor_mask_change_nothing(grad_fn):
    batch = _batch()
    other = dict(batch)
    noise = np.random.default_rng(1).integers(0, CFG.vocab_size, batch["targets"].shape).astype(np.int32)
    other["targets"] = np.where(batch["weights"], batch["targets"], noise)
    assert (other["targets"] != batch["targets"]).any()
    loss_a, grads_a = grad_fn(batch)
    loss_b, grads_b = grad_fn(other)
    assert float(loss_a) == float(loss_b)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grads_a, grads_b)


def test_four_microbatches_equal_one_batch(grad_fn):
    loss_1, grads_1 = grad_fn(_batch(microbatches=1))
    loss_4, grads_4 = grad_fn(_batch(microbatches=4))
    np.testing.assert_allclose(loss_4, loss_1, rtol=0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), grads_4, grads_1)


def _steps(model, batch, *, lora, n=3, mesh=None, lr=1e-2):
    opt = S.OptimizerConfig(learning_rate=lr, total_steps=n, warmup_steps=0)
    tx = S.make_optimizer(opt)
    graphdef, params, frozen = S.split_for_training(model, lora=lora)
    mesh = mesh or make_mesh((1,), ("data",))
    state = S.place_state(S.init_state(params, frozen, tx, seed=0), mesh)
    step = S.compile_step(
        S.make_train_step(make_sft_loss(CHUNK), graphdef, tx, S.schedule(opt)), state, mesh, batch["tokens"].shape[1]
    )
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return graphdef, state, losses


def test_lora_training_leaves_every_base_parameter_bit_identical():
    model = _model(CFG.replace(lora_rank=4, lora_dropout=0.1))
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))}
    graphdef, state, losses = _steps(model, _batch(), lora=True)
    trained = nnx.merge(graphdef, state.params, state.frozen)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trained, BASE_PARAMS))}
    assert before.keys() == after.keys()
    for k, value in before.items():
        assert value.tobytes() == after[k].tobytes(), k
    # only adapters are trained and hold optimizer moments; they did move
    params = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert params and all(isinstance(v, LoRAParam) for v in params)
    n_adapter = sum(np.size(v) for v in jax.tree.leaves(state.params))
    n_moments = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert n_moments == 2 * n_adapter
    assert any(
        np.abs(np.asarray(v)).sum() > 0 for k, v in nnx.to_flat_state(nnx.state(trained, LoRAParam)) if k[-1] == "b"
    )
    assert losses[-1] < losses[0]


def test_remat_scans_the_blocks_with_the_same_dropout_losses_and_updates():
    # model.remat runs the blocks as a scan over their stacked variables (transformer._scanned_blocks); with LoRA
    # dropout on, three steps give the unrolled loop's losses and parameters: each block draws its own masks
    cfg = CFG.replace(lora_rank=4, lora_dropout=0.3, num_layers=3)
    runs = [_steps(_model(cfg.replace(remat=remat)), _batch(), lora=True) for remat in (False, True)]
    np.testing.assert_allclose(runs[1][2], runs[0][2], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), runs[1][1].params, runs[0][1].params)
    no_dropout = _steps(_model(cfg.replace(lora_dropout=0.0)), _batch(), lora=True)
    assert abs(no_dropout[2][1] - runs[0][2][1]) > 1e-4  # the dropout did act


def test_scanned_blocks_advance_each_dropout_stream_as_the_loop_does():
    cfg = CFG.replace(lora_rank=4, lora_dropout=0.5, num_layers=2)
    tokens = jnp.asarray(_batch(rows=2)["tokens"][0])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool)), (*tokens.shape, tokens.shape[1]))
    outs = {}
    for remat in (False, True):
        model = _model(cfg.replace(remat=remat))
        for path, v in nnx.to_flat_state(nnx.state(model, LoRAParam)):
            if path[-1] == "b":  # zero at initialisation, where dropout on the adapters changes nothing
                v.set_value(jnp.full(v.shape, 0.5))
        model.train()
        outs[remat] = [np.asarray(model(tokens, positions, mask)[0]) for _ in range(2)]
    assert np.abs(outs[False][0] - outs[False][1]).max() > 1e-3  # a second call draws new masks
    for first, second in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(first, second, atol=5e-5)


def test_sharded_step_matches_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    batch = _batch(rows=8)
    _, _, single = _steps(_model(), batch, lora=False, n=2)
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    _, state, sharded = _steps(_model(), batch, lora=False, n=2, mesh=mesh)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    # and with remat, whose blocks run as a scan over their stacked (fsdp-sharded) weights
    _, _, scanned = _steps(_model(CFG.replace(remat=True)), batch, lora=False, n=2, mesh=mesh)
    np.testing.assert_allclose(scanned, single, rtol=0, atol=1e-5)
    # the embedding really is split over fsdp and the batch over data x fsdp
    embed = state.params["embed"][...]
    assert embed.addressable_shards[0].data.shape == (CFG.vocab_size, CFG.hidden_size // 4)
    assert S.batch_sharding(mesh, 8).spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


# --- the dialogue file reader -----------------------------------------------------------------------------


GOOD = {
    "case_id": "synthetic:0",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "question: x?"}],
}


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": GOOD["messages"]}, "line 2: field 'case_id': missing"),
        ({**GOOD, "messages": GOOD["messages"][:1]}, "field 'messages': needs at least one assistant turn"),
        ({**GOOD, "messages": GOOD["messages"][::-1]}, "field 'messages[0].role': must be 'user'"),
        ({**GOOD, "messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content': must be a string"),
        ({**GOOD, "reward": "high"}, "field 'reward': must be int or float, got str"),
        ({**GOOD, "correct": 1}, "field 'correct': must be bool, got int"),
        ({**GOOD, "turn_sig": [0.1, "x"]}, "field 'turn_sig': holds 'x'"),
    ],
)
def test_a_bad_dialogue_line_is_one_error_naming_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match="d.jsonl: line 2") as e:
        data_lib.read_dialogues(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_batch_order_is_a_function_of_seed_and_epoch():
    examples = [
        data_lib.Example("c", np.zeros(n, np.int32), np.zeros(n, np.int32), np.ones(n, bool))
        for n in (10, 20, 30, 300, 310, 320, 330)
    ]
    lengths = data_lib.bucket_lengths((64, 128), 512)
    assert lengths == (64, 128, 512)
    plan = data_lib.epoch_plan(examples, lengths, 2, seed=0, epoch=0)
    assert plan == data_lib.epoch_plan(examples, lengths, 2, seed=0, epoch=0)
    assert plan != data_lib.epoch_plan(examples, lengths, 2, seed=0, epoch=1)
    assert len(plan) == data_lib.batches_per_epoch(examples, lengths, 2) == 4
    assert sorted(i for _, rows in plan.batches for i in rows) == list(range(7))
    for length, rows in plan.batches:  # one bucket per batch, the smallest that holds every row
        assert {data_lib.bucket_of(examples[i].length, lengths) for i in rows} == {length}


# --- learning: a tiny model on the naive doctor's dialogues -------------------------------------------------


def _question_finding():
    from promed_jax.training.naive_doctor import _QUESTION_TO_FINDING

    return _QUESTION_TO_FINDING


def test_naive_doctor_speaks_the_protocol_and_answers_by_the_table(tmp_path):
    from promed_jax.consult.patients import FactSelectPatient
    from promed_jax.data import synthetic
    from promed_jax.training.naive_doctor import write_dialogues

    path = tmp_path / "naive.jsonl"
    records = write_dialogues(
        synthetic.make_cases(200, seed=5), FactSelectPatient(), path, seed=0, max_questions=6, protocol_max_questions=10
    )
    assert data_lib.read_dialogues(path) == records
    assert all(r["end"] == "answer" and r["policy"]["kind"] == "naive" for r in records)
    questions = [r["llm_calls"]["patient_replies"] for r in records]
    assert {1, 6} <= set(questions) <= set(range(1, 7))  # 1..6 questions
    # relevant and irrelevant alike: some questions reveal a fact, most do not
    replies = [m["content"] for r in records for m in r["messages"][2::2]]
    revealed = sum(not c.startswith("Sorry") for c in replies) / len(replies)
    assert 0.05 < revealed < 0.5
    # it stops at the first confirmed finding, or at its limit: what it heard is in the dialogue it leaves
    for r in records:
        confirmed = [not m["content"].startswith("Sorry") for m in r["messages"][2::2]]
        assert not any(confirmed[:-1])
        assert confirmed[-1] or len(confirmed) == 6
    # the marker holds the option's text, which the protocol reads as its letter
    cases = {c.id: c for c in synthetic.make_cases(200, seed=5)}
    for r in records:
        options = cases[r["case_id"]].options
        assert r["messages"][-1]["content"].endswith(f"【answer: {options[r['letters'][0]]}】")
    accuracy = np.mean([r["correct"] for r in records])
    assert 0.4 < accuracy < 0.9  # better than chance (1/4) by the table, worse than asking well (1.0)
    # it asks the table's findings in their fixed (alphabetical) order, the complaint left out
    for r in records:
        complaint = synthetic.complaint_of(cases[r["case_id"]])
        asked = [_question_finding()[m["content"]] for m in r["messages"][1::2][:-1]]
        assert asked == sorted(set(synthetic.FINDINGS) - {complaint})[: len(asked)]


def test_random_doctor_asks_the_limit_then_answers_the_best_fit():
    from promed_jax.consult.patients import FactSelectPatient
    from promed_jax.consult.rollout import consult
    from promed_jax.data import synthetic
    from promed_jax.training.naive_doctor import NaiveDoctor, RandomDoctor

    # best fit by hand: heard {a, b}, denied {c}; X explains a, b and claims c (2 - 0 - 1 = 1), Y explains a
    # only (1 - 1 - 0 = 0), Z explains both and nothing denied (2), W likewise (2): Z and W tie
    diseases = {"X": {"a", "b", "c"}, "Y": {"a"}, "Z": {"a", "b", "d"}, "W": {"a", "b"}}
    original = synthetic.DISEASES
    synthetic.DISEASES = diseases
    try:
        options = {"A": "X", "B": "Y", "C": "Z", "D": "W"}
        assert RandomDoctor._candidates(options, {"a", "b"}, {"c"}) == ["C", "D"]
        assert RandomDoctor._candidates(options, {"d"}, set()) == ["C"]  # Z alone explains d (1; the rest -1)
        assert RandomDoctor._candidates(options, set(), {"a"}) == ["A", "B", "C", "D"]  # each claims a: all -1
        # no disease explains both c and d: X and Z explain one each (0), Y and W neither (-2); the naive
        # doctor's rule would fall back to all four
        assert RandomDoctor._candidates(options, {"c", "d"}, set()) == ["A", "C"]
        assert NaiveDoctor._candidates(options, {"c", "d"}, set()) == ["A", "B", "C", "D"]
        assert NaiveDoctor._candidates(options, {"a", "b"}, {"c"}) == ["A", "C", "D"]  # denials not used
    finally:
        synthetic.DISEASES = original
    cases = synthetic.make_cases(120, seed=5)
    runs = {
        cls: consult(cases, cls(seed=0, max_questions=10), FactSelectPatient(), mode="proactive", max_questions=10)
        for cls in (RandomDoctor, NaiveDoctor)
    }
    assert {d.n_questions for d in runs[RandomDoctor]} == {10}
    assert all(d.end == "answer" for d in runs[RandomDoctor])
    accuracy = {cls: np.mean([d.correct for d in ds]) for cls, ds in runs.items()}
    assert accuracy[RandomDoctor] > 0.5  # 10 questions and the best fit beat chance (1/4) by far
    assert accuracy[RandomDoctor] < 1.0  # random questions miss the finding that separates the options


@pytest.mark.slow
def test_a_tiny_model_learns_its_trained_turns_and_greedy_decoding_replays_them(tmp_path):
    from promed_jax.backends.local import LocalBackend
    from promed_jax.consult.patients import FactSelectPatient
    from promed_jax.data import synthetic
    from promed_jax.text.tokenizer import build_tiny_tokenizer
    from promed_jax.training.naive_doctor import write_dialogues
    from promed_jax.training.run import Trainer

    tokenizer = build_tiny_tokenizer()
    path = tmp_path / "naive.jsonl"
    write_dialogues(
        synthetic.make_cases(2, seed=1), FactSelectPatient(), path, seed=0, max_questions=1, protocol_max_questions=10
    )
    records = data_lib.read_dialogues(path)
    pad = tokenizer.pad_token_id
    examples = [data_lib.render_example(tokenizer, r, pad) for r in records]
    lengths = (max(ex.length for ex in examples),)
    sft = {
        "batch_size": 2,
        "grad_accum": 1,
        "seed": 0,
        "epochs": 60,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "final_lr_fraction": 1.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "vocab_chunk": 512,
    }
    model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    trainer = Trainer(
        model, examples, sft=sft, lora=False, mesh=make_mesh((1,), ("data",)), pad_id=pad, lengths=lengths
    )
    batch = data_lib.collate(examples, lengths[0], 2, 1, pad)
    predict = jax.jit(
        lambda params, frozen: nnx.merge(trainer.graphdef, params, frozen)(
            batch["tokens"][0],
            jnp.cumsum(batch["valid"][0], 1) - 1,
            jnp.tril(jnp.ones((lengths[0],) * 2, bool))[None] & batch["valid"][0][:, None, :],
        )[0].argmax(-1)
    )
    first = trainer.eval_loss(examples)
    losses = []
    for _ in range(trainer.total_steps):
        losses.append(trainer.step()["loss"])
        guess = np.asarray(predict(trainer.state.params, trainer.state.frozen))
        if (guess == batch["targets"][0])[batch["weights"][0]].all():
            break
    else:
        pytest.fail(f"doctor tokens not reproduced after {len(losses)} steps; losses {losses[::10]}")
    assert trainer.eval_loss(examples) < 0.1 * first
    # teacher-forced argmax on every doctor token is greedy decoding; replay the turns with the sampler
    doctor = LocalBackend.from_model(trainer.model(), tokenizer)
    for r in records:
        turns = [k for k, m in enumerate(r["messages"]) if m["role"] == "assistant"]
        replies = doctor.chat([r["messages"][:k] for k in turns], max_tokens=64, temperature=0.0)
        assert replies == [r["messages"][k]["content"] for k in turns]


def test_sft_config_errors_are_one_line():
    from configs import sft as sft_config
    from promed_jax import config_check
    from promed_jax.errors import ConfigError

    config = sft_config.get_config()
    config.sft.grad_accum = 3
    with pytest.raises(ConfigError, match=r"^config sft.batch_size must be a multiple of sft.grad_accum=3, got 8$"):
        config_check.check_sft(config.sft)
    config = sft_config.get_config()
    config.sft.source = "files"
    with pytest.raises(ConfigError, match="sft.source='files' needs sft.dialogues"):
        config_check.check_sft(config.sft)
    config.sft.dialogues = ("/no/such.jsonl",)
    with pytest.raises(ConfigError, match="config sft.dialogues: no such file '/no/such.jsonl'"):
        config_check.check_sft(config.sft)
