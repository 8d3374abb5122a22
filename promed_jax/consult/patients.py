"""Patient simulators: they hold a case's atomic facts and answer the doctor's questions from them only.

All patients answer a batch of requests at once (`Patient.reply`), so that the rollout engine can ask every
live dialogue's patient in one call. `semantic` (the default; promed_jax/consult/retrieval.py) and
`fact_select` are deterministic and offline: they return the facts that answer a question verbatim (MediQ's
FactSelect idea), so which facts were revealed is known exactly (promed.md §2, exact SIG mode);
`fact_select` by lexical overlap only, `semantic` by a sentence encoder and clinical synonyms as well, so
that it understands "What's her heart rate?" for "Her pulse is 126/min.". `llm` prompts a chat backend (our
model or an OpenAI-compatible server) as the paper's patient; it does not know which facts it revealed.
A patient's `name` (where it has one) is what evaluation records, so results of different patients never
mix, also when `semantic` falls back to `fact_select`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Protocol

from absl import logging

from promed_jax import registry
from promed_jax.backends.base import ChatBackend, Message
from promed_jax.data.cases import Case
from promed_jax.text import prompts


@dataclasses.dataclass(frozen=True)
class PatientRequest:
    """One question to one case's patient.

    Attributes:
      case: the case whose facts the patient holds.
      question: the doctor's question (the text after `question:`).
      history: earlier (question, reply) pairs of this dialogue, oldest first.
    """

    case: Case
    question: str
    history: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class PatientReply:
    """The patient's reply.

    Attributes:
      text: what the patient says.
      facts: indices of the facts the reply reveals (sorted by relevance); None when the patient cannot know
        (an LLM patient), in which case SIG needs the paper's understanding + judge mode.
    """

    text: str
    facts: tuple[int, ...] | None


class Patient(Protocol):
    def reply(self, requests: Sequence[PatientRequest]) -> list[PatientReply]:
        """One reply per request, in order."""
        ...


# --- lexical retrieval ------------------------------------------------------------------------------

# Function words, question framing ("is it true that", "whether") and words every case's facts share
# ("patient"), which say nothing about which fact a question is after.
_STOP_EN_WORDS = """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
    of off on once only or other our ours out over own same she should so some such than that the their them
    then there these they this those through to too under until up very was we were what when where which while
    who whom why will with would you your yours yourself yourselves ever any anything else also
    patient patients tell describe please experience experienced experiencing notice noticed feel feeling
    know like may might much many recently recent currently current any kind sort type have had get got
    there s t ve ll d re m true false whether say says said
    """
_STOP_EN = frozenset(_STOP_EN_WORDS.split())
_STOP_ZH_WORDS = "患者 情况 一下 最近 目前 现在"
_STOP_ZH = frozenset(_STOP_ZH_WORDS.split())
# Chinese function characters: a bigram holding one straddles a word boundary ("有发" in "有发热") or is a
# question frame ("是否"), so it is dropped from both questions and facts.
_STOP_ZH_CHARS = frozenset("你您我他她的了吗呢吧啊是否有没无么什怎请问和及或在")
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")


def _stem(word: str) -> str:
    """Light suffix stripping so that `fevers`/`fever`, `wheezes`/`wheeze`, `vomiting`/`vomited` meet."""
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ness", "ing", "ed", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def content_words(text: str) -> frozenset[str]:
    """Stemmed content words of English text, plus character bigrams of Chinese runs, without stop words."""
    low = text.lower()
    words = {_stem(w) for w in _WORD.findall(low) if w not in _STOP_EN}
    for run in _CJK_RUN.findall(low):
        bigrams = (run[i : i + 2] for i in range(len(run) - 1))
        words.update(b for b in bigrams if b not in _STOP_ZH and not (set(b) & _STOP_ZH_CHARS))
        if len(run) == 1:
            words.add(run)
    words.discard("")
    return frozenset(w for w in words if w not in _STOP_EN)


def retrieve(question: str, facts: Sequence[str], *, threshold: float, max_facts: int) -> tuple[int, ...]:
    """Indices of the facts that answer `question`, best first.

    A fact's score is the IDF-weighted share of the question's content words it contains (IDF over the
    case's facts, so a word in every fact weighs little and a word in none weighs most); facts scoring at
    least `threshold` are returned, ties broken by the share of the fact's own words the question covers,
    then by fact order. An off-topic question has no fact above the threshold.
    """
    q = content_words(question)
    if not q or not facts:
        return ()
    fact_words = [content_words(f) for f in facts]
    n = len(facts)
    df = {w: sum(w in fw for fw in fact_words) for w in q}
    idf = {w: math.log(1.0 + n / max(df[w], 0.5)) for w in q}
    q_mass = sum(idf.values())
    scored = []
    for i, fw in enumerate(fact_words):
        shared = q & fw
        if not shared:
            continue
        recall = sum(idf[w] for w in shared) / q_mass
        precision = len(shared) / len(fw)
        if recall >= threshold:
            scored.append((-recall, -precision, i))
    return tuple(i for _, _, i in sorted(scored)[:max_facts])


# --- patients ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactSelectPatient:
    """Deterministic, offline: the facts that answer the question, verbatim, else a fixed cannot-answer reply."""

    threshold: float = 0.5
    max_facts: int = 2
    name = "fact_select"

    def reply(self, requests: Sequence[PatientRequest]) -> list[PatientReply]:
        out = []
        for r in requests:
            idx = retrieve(r.question, r.case.facts, threshold=self.threshold, max_facts=self.max_facts)
            if idx:
                out.append(PatientReply(text=" ".join(r.case.facts[i] for i in idx), facts=idx))
            else:
                out.append(PatientReply(text=prompts.PATIENT_CANNOT_ANSWER[r.case.language], facts=()))
        return out


def patient_conversation(request: PatientRequest) -> list[Message]:
    """The LLM patient's view: the facts as system prompt, the doctor's questions as user turns."""
    msgs: list[Message] = [
        {"role": "system", "content": prompts.patient_system_prompt(language=request.case.language, facts=request.case.facts)}
    ]
    for question, answer in request.history:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    msgs.append({"role": "user", "content": request.question})
    return msgs


@dataclasses.dataclass(frozen=True)
class LLMPatient:
    """The paper's patient: a chat model prompted with every fact of the case (our model or a server)."""

    backend: ChatBackend
    temperature: float = 0.7
    max_tokens: int = 256

    def reply(self, requests: Sequence[PatientRequest]) -> list[PatientReply]:
        if not requests:
            return []
        texts = self.backend.chat(
            [patient_conversation(r) for r in requests], max_tokens=self.max_tokens, temperature=self.temperature
        )
        return [PatientReply(text=t.strip(), facts=None) for t in texts]


@registry.register("patient", "fact_select")
def _fact_select(cfg, backend: ChatBackend | None = None) -> Patient:
    return FactSelectPatient(threshold=cfg.get("threshold", 0.5), max_facts=cfg.get("max_facts", 2))


@registry.register("patient", "semantic")
def _semantic(cfg, backend: ChatBackend | None = None) -> Patient:
    from promed_jax import assets

    if not assets.minilm_available():
        logging.warning(
            "patient 'semantic': all-MiniLM-L6-v2 is not installed (%s); using the lexical 'fact_select' "
            "patient instead, and results are recorded under that name",
            assets.MINILM_INSTALL,
        )
        return _fact_select(cfg, backend)
    from promed_jax.consult import retrieval

    weights = retrieval.HybridWeights(
        contrast_weight=cfg.contrast_weight,
        hub_weight=cfg.hub_weight,
        lexical_weight=cfg.lexical_weight,
        threshold=cfg.semantic_threshold,
        margin=cfg.margin,
        max_facts=cfg.max_facts,
        zh_threshold=cfg.zh_threshold,
    )
    return retrieval.SemanticPatient(weights)


# The two LLM patient kinds differ only in the backend their caller builds.
_LLM_BACKENDS = {"llm": "a chat backend (our model)", "openai": "the OpenAI-compatible backend (from config.backend)"}


@registry.register("patient", "llm")
@registry.register("patient", "openai")
def _llm(cfg, backend: ChatBackend | None = None) -> Patient:
    if backend is None:
        raise ValueError(f"patient kind {cfg.kind!r} needs {_LLM_BACKENDS[cfg.kind]}; none was given")
    return LLMPatient(backend=backend, temperature=cfg.temperature, max_tokens=cfg.max_tokens)


def make_patient(cfg, backend: ChatBackend | None = None) -> Patient:
    """The patient named by `cfg.kind` (`semantic` | `fact_select` | `llm` | `openai`); LLM kinds need their
    backend."""
    return registry.get("patient", cfg.kind)(cfg, backend)
