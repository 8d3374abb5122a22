"""The NNX BERT encoder against transformers' BertModel in torch on all-MiniLM-L6-v2: token ids and vectors."""

import json
import pathlib

import numpy as np
import pytest

from promed_jax import assets
from promed_jax.errors import CheckpointError
from promed_jax.models import bert
from tests.conftest import need, need_torch

SENTENCES = [
    "Her pulse is 126/min.",
    "What's her heart rate?",
    "Does she have a fever?",
    (
        "Vital signs: temperature is 102 deg F (39.4 deg C), blood pressure is 114/82 mmHg, pulse is 96/min, "
        "respirations are 18, and oxygen saturation of 97% on room air."
    ),
    (
        "Ophthalmoplegia is noted on cranial nerve testing, and he has decreased vibration sensation in the "
        "bilateral lower extremity."
    ),
    "Is he tired?",
    "Cerebrospinal fluid cultured on Thayer-Martin agar and normal sheep blood agar shows no growth.",
    "患者有疲劳症状",
    "Is she up at four in the morning and can't drift off again?",
]


@pytest.fixture(scope="module")
def folder():
    need(assets.minilm_available(), f"all-MiniLM-L6-v2 ({assets.MINILM_INSTALL})")
    return assets.minilm_dir()


@pytest.fixture(scope="module")
def encoder(folder):
    from promed_jax.consult import retrieval

    return retrieval.sentence_encoder()  # the process's encoder, shared with the semantic patient's tests


def test_matches_torch_bert_mean_pooled(folder, encoder):
    torch = need_torch()
    from transformers import BertModel, BertTokenizerFast

    questions = [
        json.loads(line)["question"]
        for line in (pathlib.Path(__file__).parent / "data" / "natural_questions_tune.jsonl").read_text().splitlines()
    ][:40]
    texts = SENTENCES + questions
    tok = BertTokenizerFast.from_pretrained(str(folder))
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert encoder.token_ids(texts) == [
        row[: int(m.sum())].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])
    ]
    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    ours = encoder.encode(texts)
    assert ours.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()


def test_batching_does_not_change_vectors(encoder):
    """Each length and batch bucket gives the vector the sentence gets alone (padding is masked out)."""
    together = encoder.encode(SENTENCES)
    alone = np.stack([encoder.encode([s])[0] for s in SENTENCES[:4]])
    np.testing.assert_allclose(together[:4], alone, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_unmapped_tensor_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="encoder.layer.0.attention.self.rotary"):
        bert._map_name("encoder.layer.0.attention.self.rotary")
