"""Patient simulators: fact_select retrieval targets (synthetic clinic, MedQA), the LLM patient's prompt."""

import random

import pytest

from promed_jax.consult import patients as PT
from promed_jax.data import synthetic
from promed_jax.data.cases import load_cases
from promed_jax.text import prompts

PATIENT = PT.FactSelectPatient()
OFF_TOPIC = [
    "What is your favourite colour?",
    "Do you play football on weekends?",
    "How is the weather today?",
    "Which city were you born in?",
]


def ask(case, question):
    (reply,) = PATIENT.reply([PT.PatientRequest(case=case, question=question)])
    return reply


def finding_question(finding: synthetic.Finding) -> str:
    """A question about a finding in the words of its fact (lexical retrieval cannot bridge paraphrases such as
    the table's "find heat hard to bear" for "cannot stand the heat")."""
    return f"Is it true that {finding.fact[0].lower()}{finding.fact[1:].rstrip('.')}?"


def test_synthetic_clinic_returns_exactly_the_finding():
    cases = synthetic.make_cases(200, seed=3)
    for case in cases:
        for name, finding in synthetic.FINDINGS.items():
            reply = ask(case, finding_question(finding))
            if finding.fact in case.facts:
                assert reply.text == finding.fact, (case.id, name, reply)
                assert reply.facts == (case.facts.index(finding.fact),)
            else:
                assert reply.text == prompts.PATIENT_CANNOT_ANSWER["en"], (case.id, name, reply)
                assert reply.facts == ()


def _content_question(fact, rng, *, share):
    words = [w for w in PT._WORD.findall(fact.lower()) if w not in PT._STOP_EN]
    words = list(dict.fromkeys(words))
    k = max(1, round(len(words) * share))
    return "Can you tell me about " + " ".join(rng.sample(words, k)) + "?"


@pytest.fixture(scope="module")
def medqa50(data_dir):
    return load_cases(data_dir / "medqa_dev_convo.jsonl", on_error="skip")[:50]


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_medqa_question_from_fact_words_returns_that_fact_first(medqa50, share):
    rng = random.Random(0)
    hits = total = 0
    for case in medqa50:
        for i, fact in enumerate(case.facts):
            reply = ask(case, _content_question(fact, rng, share=share))
            total += 1
            hits += bool(reply.facts) and reply.facts[0] == i
            if reply.facts:
                assert reply.text.startswith(case.facts[reply.facts[0]])  # verbatim
    assert total > 300
    assert hits / total >= 0.8, f"{hits}/{total}"


def test_medqa_off_topic_cannot_answer(medqa50):
    for case in medqa50:
        for question in OFF_TOPIC:
            assert ask(case, question) == PT.PatientReply(text=prompts.PATIENT_CANNOT_ANSWER["en"], facts=())


def test_chinese_retrieval(data_dir):
    cases = load_cases(data_dir / "cmb_atomic_patient_train.json", on_error="skip")[:20]
    rng = random.Random(0)
    hits = total = 0
    for case in cases:
        for i, fact in enumerate(case.facts):
            bigrams = sorted(PT.content_words(fact))
            if not bigrams:
                continue
            question = "请问有没有" + "、".join(rng.sample(bigrams, max(1, len(bigrams) // 2))) + "？"
            (reply,) = PT.FactSelectPatient().reply([PT.PatientRequest(case=case, question=question)])
            total += 1
            hits += bool(reply.facts) and reply.facts[0] == i
        (reply,) = PT.FactSelectPatient().reply([PT.PatientRequest(case=case, question="你喜欢什么颜色的汽车？")])
        assert reply.text == prompts.PATIENT_CANNOT_ANSWER["zh"]
    assert hits / total >= 0.7, f"{hits}/{total}"


def test_retrieve_ranks_and_caps():
    facts = ("She has a fever and a cough.", "She has a fever.", "Her knee is swollen.")
    assert PT.retrieve("Do you have a fever?", facts, threshold=0.5, max_facts=3) == (1, 0)  # precision breaks ties
    assert PT.retrieve("Any fever or cough?", facts, threshold=0.5, max_facts=3)[0] == 0
    assert PT.retrieve("Any fever or cough?", facts, threshold=0.5, max_facts=1) == (0,)
    assert PT.retrieve("Is your knee swollen?", facts, threshold=0.5, max_facts=3) == (2,)
    assert PT.retrieve("Do you have fevers?", facts, threshold=0.5, max_facts=3) == (1, 0)  # stemming
    assert PT.retrieve("", facts, threshold=0.5, max_facts=3) == ()
    assert PT.retrieve("What?", facts, threshold=0.5, max_facts=3) == ()  # stop words only


class _RecordingBackend:
    def __init__(self):
        self.calls = []

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        self.calls.append((conversations, max_tokens, temperature))
        return [f"  reply {i}\n" for i in range(len(conversations))]


def test_llm_patient_prompt_and_history():
    case = synthetic.make_cases(1)[0]
    backend = _RecordingBackend()
    patient = PT.LLMPatient(backend=backend, temperature=0.7, max_tokens=64)
    requests = [
        PT.PatientRequest(case=case, question="Do you have a fever?"),
        PT.PatientRequest(case=case, question="Any cough?", history=(("Do you have a fever?", "Yes."),)),
    ]
    replies = patient.reply(requests)
    assert replies == [PT.PatientReply("reply 0", None), PT.PatientReply("reply 1", None)]
    ((convs, max_tokens, temperature),) = backend.calls
    assert (max_tokens, temperature) == (64, 0.7)
    system = convs[0][0]
    assert system["role"] == "system" and all(f in system["content"] for f in case.facts)
    assert convs[0][1:] == [{"role": "user", "content": "Do you have a fever?"}]
    assert [m["role"] for m in convs[1]] == ["system", "user", "assistant", "user"]
    assert patient.reply([]) == []


def test_make_patient_by_name():
    import ml_collections

    cfg = ml_collections.ConfigDict({"kind": "fact_select", "threshold": 0.5, "max_facts": 2, "temperature": 0.7, "max_tokens": 64})
    assert isinstance(PT.make_patient(cfg), PT.FactSelectPatient)
    cfg.kind = "llm"
    with pytest.raises(ValueError, match="needs a chat backend"):
        PT.make_patient(cfg)
    assert isinstance(PT.make_patient(cfg, _RecordingBackend()), PT.LLMPatient)
    cfg.kind = "openai"
    with pytest.raises(ValueError, match="'openai' needs the OpenAI-compatible backend"):
        PT.make_patient(cfg)
    assert isinstance(PT.make_patient(cfg, _RecordingBackend()), PT.LLMPatient)
    cfg.kind = "psychic"
    with pytest.raises(KeyError, match="unknown patient 'psychic'"):
        PT.make_patient(cfg)
