"""The GRPO step (promed_jax.rl.step): log-probs against the sampler's, the reference with adapters off, the
sharded step against one device, and μ passes over minibatches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from promed_jax.backends.local import LocalBackend
from promed_jax.models.loader import load_model
from promed_jax.models.lora import LoRA
from promed_jax.rl import step as step_lib
from promed_jax.rl.losses import LossConfig
from promed_jax.sampling.keys import row_keys
from promed_jax.sharding import make_mesh


def tiny_model(lora_rank: int = 8, seed: int = 0, perturb: bool = True):
    section = base.model_config()
    section.lora_rank = lora_rank
    section.seed = seed
    model, tokenizer = load_model(section)
    if perturb:  # adapters that change the output, so that "adapters off" is a different model
        key = jax.random.key(seed + 1)
        for _, module in nnx.iter_graph(model):
            if isinstance(module, LoRA):
                key, sub = jax.random.split(key)
                module.b[...] = 0.3 * jax.random.normal(sub, module.b[...].shape)
    return model, tokenizer


def sampled_rows(model, tokenizer, n=4, max_tokens=24):
    """n prompts of the tokenizer's chat template and the turns the sampler drew for them at T = 0.7."""
    backend = LocalBackend.from_model(model, tokenizer, max_batch=8)
    prompts = [
        backend.encode([{"role": "user", "content": f"question {i}: the patient has a cough"}]) for i in range(n)
    ]
    turns = backend.sample_turns(
        prompts, max_tokens=max_tokens, temperature=0.7, keys=row_keys(3, [(i,) for i in range(n)])
    )
    model.inference_head = nnx.data(None)  # back to the tied head for training
    return prompts, turns


def rows_of(prompts, turns, pad_id):
    t = max(len(p) + len(s.ids) for p, s in zip(prompts, turns, strict=True))
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    role = np.zeros((len(prompts), t), bool)
    for r, (p, s) in enumerate(zip(prompts, turns, strict=True)):
        tokens[r, : len(p)] = p
        tokens[r, len(p) : len(p) + len(s.ids)] = s.ids
        role[r, len(p) : len(p) + len(s.ids)] = True
    lengths = np.array([len(p) + len(s.ids) for p, s in zip(prompts, turns, strict=True)], np.int32)
    return tokens, role, lengths


def updater(model, rows, mesh, *, lora=True, passes=1, minibatches=1, grad_accum=1, kl_beta=0.04):
    return step_lib.GrpoUpdater(
        model,
        rows=rows,
        lora=lora,
        loss=LossConfig(kl_beta=kl_beta),
        update=step_lib.UpdateConfig(passes=passes, minibatches=minibatches, grad_accum=grad_accum, vocab_chunk=64),
        optimizer=step_lib.state_lib.OptimizerConfig(learning_rate=1e-2, total_steps=10, final_lr_fraction=1.0),
        mesh=mesh,
        seed=0,
    )


def test_logprobs_equal_the_samplers_and_the_reference_is_adapters_off():
    model, tokenizer = tiny_model()
    prompts, turns = sampled_rows(model, tokenizer)
    tokens, role, lengths = rows_of(prompts, turns, tokenizer.pad_token_id)
    batch = step_lib.update_batch(
        tokens, role, lengths, np.zeros(role.shape, np.float32), pad_id=tokenizer.pad_token_id
    )
    up = updater(model, len(prompts), make_mesh((1,), ("data",)))
    out = up.logprobs(batch)
    for r, (p, s) in enumerate(zip(prompts, turns, strict=True)):
        got = out["old_logps"][r, len(p) - 1 : len(p) - 1 + len(s.ids)]
        np.testing.assert_allclose(got, s.logprobs, atol=1e-4)
        assert batch["weights"][r, len(p) - 1 : len(p) - 1 + len(s.ids)].all()
    # The reference: the same weights with the adapters off, computed by a plain forward.
    valid = jnp.asarray(batch["valid"])
    from promed_jax.models.transformer import causal_mask, positions_from_mask

    logits, _ = model(jnp.asarray(batch["tokens"]), positions_from_mask(valid), causal_mask(valid), use_lora=False)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(out["ref_logps"][w], np.asarray(ref)[w], atol=1e-5)
    assert np.abs(out["ref_logps"][w] - out["old_logps"][w]).max() > 1e-3  # adapters on and off differ
    # Entropy against the full softmax.
    logits_on, _ = model(jnp.asarray(batch["tokens"]), positions_from_mask(valid), causal_mask(valid))
    p = jax.nn.softmax(logits_on)
    entropy = -(p * jax.nn.log_softmax(logits_on)).sum(-1)
    np.testing.assert_allclose(out["entropy"][w], np.asarray(entropy)[w], atol=1e-4)


def random_batch(n=8, t=48, vocab=100, seed=0, pad_id=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(n, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, size=n).astype(np.int32)
    role = (rng.random((n, t)) < 0.5) & (np.arange(t)[None] < lengths[:, None]) & (np.arange(t)[None] > 4)
    adv = np.where(role, rng.normal(size=(n, t)), 0.0).astype(np.float32)
    return step_lib.update_batch(tokens, role, lengths, adv, pad_id=pad_id, length=64)


def test_sharded_step_matches_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS asks for fewer)")
    batch = random_batch()
    results = []
    for shape, names in (((1,), ("data",)), ((2, 4), ("data", "fsdp"))):
        model, _ = tiny_model()
        up = updater(model, 8, make_mesh(shape, names), minibatches=2, grad_accum=2)
        metrics, _ = up.update(batch, batch_index=0)
        results.append((metrics, jax.device_get(nnx.to_flat_state(up.state.params))))
    (m1, p1), (m8, p8) = results
    assert abs(m1["loss"] - m8["loss"]) <= 1e-5
    assert abs(m1["kl_last"] - m8["kl_last"]) <= 1e-5
    for (path, a), (_, b) in zip(p1, p8, strict=True):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-5, err_msg=str(path))


def test_first_update_loss_is_the_policy_loss_of_old_logps():
    """At the first step the ratio is 1 and the KL to fresh adapters 0: the loss is -mean advantage per row."""
    model, _ = tiny_model(perturb=False)
    batch = random_batch()
    up = updater(model, 8, make_mesh((1,), ("data",)))
    metrics, extra = up.update(batch, batch_index=0)
    w, a = batch["weights"], batch["advantages"]
    rows = (a * w).sum(1) / np.maximum(w.sum(1), 1)
    assert metrics["loss"] == pytest.approx(-rows[w.any(1)].mean(), abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(extra["old_logps"][w], extra["ref_logps"][w], atol=1e-6)


def test_passes_and_minibatches_take_that_many_steps_and_full_finetuning_keeps_a_frozen_reference():
    model, _ = tiny_model(lora_rank=0, perturb=False)
    batch = random_batch()
    up = updater(model, 8, make_mesh((1,), ("data",)), lora=False, passes=2, minibatches=2)
    before = up.logprobs(batch)
    metrics, _ = up.update(batch, batch_index=0)
    assert metrics["updates"] == 4 and int(up.state.step) == 4
    after = up.logprobs(batch)
    w = batch["weights"]
    np.testing.assert_array_equal(after["ref_logps"][w], before["ref_logps"][w])
    assert np.abs(after["old_logps"][w] - before["old_logps"][w]).max() > 1e-4
    assert metrics["kl_last"] > 0


def test_update_batch_shifts_targets_and_masks():
    tokens = np.array([[5, 6, 7, 8, 0]], np.int32)
    role = np.array([[False, False, True, True, False]])
    adv = np.array([[0, 0, 2.0, 3.0, 0]], np.float32)
    b = step_lib.update_batch(tokens, role, np.array([4]), adv, pad_id=0, length=8)
    np.testing.assert_array_equal(b["targets"][0, :4], [6, 7, 8, 0])
    np.testing.assert_array_equal(b["weights"][0], [False, True, True, False, False, False, False, False])
    np.testing.assert_array_equal(b["advantages"][0, :3], [0, 2.0, 3.0])
    np.testing.assert_array_equal(b["valid"][0], [True] * 4 + [False] * 4)
    assert dataclasses.is_dataclass(step_lib.UpdateConfig())
