"""Hybrid fact retrieval for the semantic patient: dense similarity + BM25 over clinical concepts.

A fact's score for a question is `dense_weight * cos + contrast_weight * (cos - mean cos over the case's
facts) + lexical_weight * bm25 / (bm25 + 1)`, where `cos` is the cosine of the two all-MiniLM-L6-v2 vectors
and `bm25` is computed over concepts: stemmed content words with clinical synonyms folded together
(`SYNONYMS`: "heart rate" and "pulse" are one concept, "fever" and "temperature" another), with IDF over
the case's facts. The contrast term is what a question aimed at one fact has and a broad or off-topic one
lacks: one fact standing out from the others. Facts scoring at least `threshold` are returned best first,
a later one only within `margin` of the best, at most `max_facts`; none above it is the cannot-answer
reply. The defaults (configs/base.py `patient.*`) were chosen on tests/data/natural_questions_tune.jsonl
only (experiments/patient_questions.py).

Chinese facts (CMB) have no encoder here (MiniLM is English-only): they are scored by BM25 over character
bigrams (the lexical patient's `content_words`) with a few lay-word synonyms, and the same threshold rule
on `bm25 / (bm25 + 1)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import numpy as np

from promed_jax.consult import patients as lexical
from promed_jax.consult.patients import PatientReply, PatientRequest
from promed_jax.text import prompts

# Clinical synonyms, written for this patient: each line is one concept, its first word the concept's name;
# multi-word forms are joined with '_' and matched as phrases before words are split. Lay words, vital-sign
# names and the Latin/Greek forms facts use.
SYNONYMS_EN = """
    pulse heart_rate heartbeat heart_beat tachycardia tachycardic bradycardia bradycardic hr palpitation
    pulse heart_going heart_racing racing_heart heart_beating heart_pounding
    temperature fever febrile afebrile feverish pyrexia temp chill
    itch itchy itching pruritic pruritus scratch
    exam examination physical_exam physical_examination
    medication medicine med drug pill tablet prescription prescribed
    blood_pressure bp hypertension hypertensive hypotension hypotensive
    respiration respiratory_rate breathing breathe breath tachypnea tachypneic respiratory
    dyspnea short_of_breath shortness_of_breath winded breathless
    oxygen saturation spo2 oximetry o2
    fatigue tired tiredness fatigued exhausted exhaustion weary lethargic lethargy
    drowsy drowsiness sleepy sleepiness somnolent somnolence
    weight pound lb kg weigh thin cachectic emaciated bmi
    smoke smoking smoker cigarette tobacco pack_year
    alcohol drink drinking beer wine booze ethanol drinker
    urine urinate urination pee peeing void voiding urinary micturition dysuria pass_water passing_water wee
    stool bowel poop diarrhea constipation fecal feces
    vomit vomiting throw_up throwing_up emesis nausea nauseous
    pain hurt hurting ache aching sore painful tender tenderness discomfort sting stinging burning
    sweat sweaty sweating diaphoretic diaphoresis
    pale pallor pallid
    jaundice yellow icterus icteric
    family father mother sister brother uncle aunt relative parent sibling grandmother grandfather
    surgery operation operated surgical resection
    pregnancy pregnant gestation prenatal antenatal
    glucose sugar glycemia
    cardiac heart
    kidney renal creatinine gfr
    liver hepatic
    lung pulmonary
    radiograph x_ray xray radiography radiogram film chest_film
    imaging scan ct mri ultrasound sonography
    rash eruption hive exanthem
    swelling swollen edema puffy
    confusion confused disoriented oriented orientation know_where
    syncope faint fainted pass_out passed_out unconscious consciousness
    travel abroad trip overseas returned immigrated emigrated
    occupation job work working works employed
    sleep asleep insomnia
    suicide suicidal end_your_life ending_your_life kill_yourself killing_yourself
    sex sexual sexually intercourse condom contraception contraceptive
    anemia anemic anaemia anaemic hemoglobin haemoglobin
    reflex reflexes
    stiff stiffness rigidity nuchal
    cough coughing
    infection infected infectious
    injury trauma
    mass lump nodule growth tumor tumour
    bruise bruising ecchymosis ecchymoses purpura
    enlarge enlarged big large swollen_up
    thirst thirsty polydipsia
    similar happened_before happen_before this_before had_this_before previously recurrent recurrence
    numbness numb tingling pins_and_needles paresthesia paraesthesia
    angina chest_tightness chest_pressure
    exertion exertional exert climbing_stairs climbing exercise exercising
    orthopnea pillow pillows prop_yourself_up propped_up lie_flat lying_flat
    csf cerebrospinal spinal_fluid lumbar_puncture
    angiography angiogram cath catheterization
    stridor high_pitched
    drainage drain draining discharge coming_out
    stiff_neck neck_stiffness nuchal_rigidity meningism
    """
# One word for two concepts: the Greek/Latin compounds facts use for what a question says in two words.
COMPOUNDS_EN = """
    hepatomegaly liver enlarge
    splenomegaly spleen enlarge
    hepatosplenomegaly liver spleen
    cardiomegaly heart enlarge
    lymphadenopathy lymph_node enlarge
    tachycardia pulse fast
    tachypnea breathing fast
    hematuria blood urine
    hemoptysis blood cough
    hematemesis blood vomit
    melena blood stool
    dysuria pain urine
    nocturia night urine
    polyuria urine more
    arthralgia joint pain
    myalgia muscle pain
    """
SYNONYMS_ZH = """
    腹泻 拉肚子 拉稀
    发热 发烧 高热 寒战 发冷
    水肿 浮肿
    无力 乏力 没力气
    痉挛 抽筋
    面色 脸色
    心律失常 心跳不规律 心律不齐
    恶心 想吐
    渗出 渗液
    抗感染 消炎
    """
# Words a question carries but no fact is about: they must not count as evidence (promed_jax.consult.patients
# stop words plus question framing).
_STOP_EXTRA_WORDS = """
    long problem problems worse better thing things happen happened happening time day lot way go going
    getting gets come see look looks make made right now ever lately usually normally anywhere anyone
    someone something trouble issue issues okay ok fine well history
    """
_STOP_EXTRA = frozenset(_STOP_EXTRA_WORDS.split())


def _stem(word: str) -> str:
    """The lexical patient's stemmer, plus the endings it misses (medicines/medications, examination/exam via SYNONYMS_EN)."""
    for suffix, repl in (("ations", ""), ("ation", ""), ("ines", ""), ("ine", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)] + repl
            break
    return lexical._stem(word)


def _synonym_table(text: str) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """(word stem -> concept, phrases longest first as (surface with spaces, concept))."""
    words: dict[str, str] = {}
    phrases: list[tuple[str, str]] = []
    for line in text.strip().splitlines():
        forms = line.split()
        concept = forms[0]
        for form in forms:
            if "_" in form:
                phrases.append((form.replace("_", " "), concept))
            else:
                words[_stem(form)] = concept
    return words, tuple(sorted(phrases, key=lambda p: -len(p[0])))


_WORDS_EN, _PHRASES_EN = _synonym_table(SYNONYMS_EN)
FAMILY = "family"  # the concept of SYNONYMS_EN's relatives line
_COMPOUNDS_EN = {_stem(w): tuple(rest) for w, *rest in map(str.split, COMPOUNDS_EN.strip().splitlines())}
_ZH_SYN = [line.split() for line in SYNONYMS_ZH.strip().splitlines()]


def concepts(text: str) -> tuple[str, ...]:
    """English: stemmed content words with synonyms folded to one concept, phrases first (with repeats, in
    order). Chinese: the lexical patient's character bigrams, lay words replaced by the facts' words."""
    low = text.lower()
    if lexical._CJK_RUN.search(low):
        for forms in _ZH_SYN:
            for form in forms[1:]:
                low = low.replace(form, forms[0])
        return tuple(sorted(lexical.content_words(low)))
    low = low.replace("-", " ").replace("'s", "")
    for surface, concept in _PHRASES_EN:
        low = re.sub(rf"\b{re.escape(surface)}\b", f" {concept} ", low)
    out = []
    for w in re.findall(r"[a-z0-9_]+", low):
        if w in lexical._STOP_EN or w in _STOP_EXTRA:
            continue
        stem = _stem(w)
        if stem in lexical._STOP_EN or stem in _STOP_EXTRA:
            continue
        if stem in _COMPOUNDS_EN:
            out += [_WORDS_EN.get(_stem(c), c) for c in _COMPOUNDS_EN[stem]]
        else:
            out.append(_WORDS_EN.get(stem, w if "_" in w else stem))
    return tuple(w for w in out if w)


def bm25(question: Sequence[str], facts: Sequence[Sequence[str]], *, k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    """BM25 of each fact (a document of concepts) for the question's distinct concepts, IDF over `facts`:
    float [F]. A concept in no fact adds nothing, so words no fact holds cannot outweigh the matched ones."""
    n = len(facts)
    if not n:
        return np.zeros(0)
    lengths = np.array([len(f) for f in facts], float)
    avg = max(lengths.mean(), 1.0)
    counts = [dict.fromkeys(f, 0) for f in facts]
    for c, f in zip(counts, facts):
        for w in f:
            c[w] += 1
    out = np.zeros(n)
    for w in set(question):
        df = sum(w in c for c in counts)
        if not df:
            continue
        idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        tf = np.array([c.get(w, 0) for c in counts], float)
        out += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avg))
    return out


# Words that frame a sentence (who has it, the tense) rather than say what it is about: they are dropped
# before encoding, so "Has he been very thirsty?" and "He has been having headaches." do not meet on
# "he has been". Neither questions nor facts lose meaning by it.
_FRAME_WORDS = """
    the patient patient's patient’s patients he she his her him you your yours has have had been is are was were
    does do did any a an of
    """
_FRAME = frozenset(_FRAME_WORDS.split())
_ENC_TOKEN = re.compile(r"[\w/.%°\-–+]+(?:['’]\w+)?|[^\w\s]")

# Everyday questions of a consultation, none about a particular fact. A fact close to all of them (an exam
# "within normal limits", "immunization status unknown") attracts every question; its mean cosine to these
# is its hub score, subtracted with `hub_weight` (as CSLS does for hub words in embedding retrieval).
PROBES = (
    "Do you have any pain?",
    "What medicines do you take?",
    "Do you smoke?",
    "Any fever?",
    "What did the tests show?",
    "How is your breathing?",
    "Any family history of illness?",
    "Have you had surgery?",
    "What's your blood pressure?",
    "Have you lost weight?",
    "Do you drink alcohol?",
    "Any problems with urination?",
    "How are your bowels?",
    "Have you been sleeping well?",
    "Any rash?",
    "Any headaches?",
    "How is your mood?",
    "Have you travelled?",
    "What do you do for work?",
    "Are you pregnant?",
)


def encoder_text(text: str) -> str:
    """`text` without framing words, as the encoder sees it (unchanged if nothing else is left)."""
    kept = [t for t in _ENC_TOKEN.findall(text) if t.lower() not in _FRAME]
    return " ".join(kept) or text


@dataclasses.dataclass(frozen=True)
class HybridWeights:
    """The retriever's calibrated constants (defaults: configs/base.py `patient.*`, tuned on the tune set)."""

    contrast_weight: float
    hub_weight: float
    lexical_weight: float
    threshold: float
    margin: float
    max_facts: int
    zh_threshold: float


def hybrid_scores(cos: np.ndarray, hub: np.ndarray, lex: np.ndarray, w: HybridWeights) -> np.ndarray:
    """cos: float [F] question-fact cosines; hub: float [F] the facts' hub scores; lex: float [F] BM25 ->
    float [F] scores (`cos + contrast * (cos - mean cos) - hub_weight * hub + lexical_weight * lex/(lex+1)`)."""
    return cos + w.contrast_weight * (cos - cos.mean()) - w.hub_weight * hub + w.lexical_weight * lex / (lex + 1.0)


def select(scores: np.ndarray, w: HybridWeights, *, threshold: float | None = None) -> tuple[int, ...]:
    """Facts at or above the threshold, best first (ties by fact order), within `margin` of the best."""
    threshold = w.threshold if threshold is None else threshold
    order = np.argsort(-scores, kind="stable")
    if not len(order) or scores[order[0]] < threshold:
        return ()
    best = scores[order[0]]
    return tuple(int(i) for i in order[: w.max_facts] if scores[i] >= threshold and scores[i] >= best - w.margin)


# --- the patient ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def sentence_encoder(folder: str | None = None):
    """The process's all-MiniLM-L6-v2 encoder (loaded once; `folder` None = the installed package's)."""
    from promed_jax import assets
    from promed_jax.models.bert import SentenceEncoder

    return SentenceEncoder(folder or assets.minilm_dir())


@dataclasses.dataclass(frozen=True)
class _CaseIndex:
    """One case's retrieval data, computed once: fact vectors float32 [F, D] and hub scores float32 [F]
    (None for Chinese), and the facts' concepts."""

    vectors: np.ndarray | None
    hub: np.ndarray | None
    concepts: tuple[tuple[str, ...], ...]


class SemanticPatient:
    """Offline and deterministic like `fact_select`, but it understands paraphrase: hybrid dense + lexical
    retrieval (module docstring). Facts are returned verbatim, so exact SIG mode still knows which were
    revealed. Each case's fact vectors are computed once, in one batch with the other new cases."""

    name = "semantic"

    def __init__(self, weights: HybridWeights, encoder=None):
        self.weights = weights
        self.encoder = encoder if encoder is not None else sentence_encoder()
        self._probes = self.encoder.encode([encoder_text(p) for p in PROBES])  # [P, D]
        self._index: dict[tuple[str, str], _CaseIndex] = {}

    def _indices(self, cases) -> list[_CaseIndex]:
        keys = [(c.id, c.fingerprint) for c in cases]
        new = {k: c for k, c in zip(keys, cases) if k not in self._index}
        english = [k for k, c in new.items() if c.language != "zh"]
        vectors = self.encoder.encode([encoder_text(f) for k in english for f in new[k].facts])
        offsets = np.cumsum([0] + [new[k].n_facts for k in english])
        by_key = {k: vectors[a:b] for k, a, b in zip(english, offsets[:-1], offsets[1:])}
        for k, c in new.items():
            v = by_key.get(k)
            hub = None if v is None else (v @ self._probes.T).mean(axis=1)
            self._index[k] = _CaseIndex(v, hub, tuple(concepts(f) for f in c.facts))
        return [self._index[k] for k in keys]

    def features(self, requests: Sequence[PatientRequest]) -> list[tuple[np.ndarray | None, ...]]:
        """Per request (cos [F], hub [F], bm25 [F]) float arrays; cos and hub None for a Chinese case."""
        indices = self._indices([r.case for r in requests])
        english = [i for i, x in enumerate(indices) if x.vectors is not None]
        qv = dict(zip(english, self.encoder.encode([encoder_text(requests[i].question) for i in english])))
        out = []
        for i, (r, index) in enumerate(zip(requests, indices)):
            cos = index.vectors @ qv[i] if i in qv else None
            out.append((cos, index.hub, bm25(concepts(r.question), index.concepts)))
        return out

    def admissible(self, request: PatientRequest) -> np.ndarray:
        """bool [F]: the facts that may answer at all. A question about relatives ("Any family history of
        ...?") is answered only by a fact about a relative: the patient's own colorectal cancer does not
        answer "Any family history of colon cancer?"."""
        index = self._indices([request.case])[0]
        if FAMILY not in concepts(request.question):
            return np.ones(len(index.concepts), bool)
        return np.array([FAMILY in c for c in index.concepts], bool)

    def scores(self, requests: Sequence[PatientRequest]) -> list[np.ndarray]:
        """Each request's fact scores, float [F] (Chinese: lexical only, `bm25 / (bm25 + 1)`)."""
        out = []
        for r, (cos, hub, lex) in zip(requests, self.features(requests)):
            s = lex / (lex + 1.0) if cos is None else hybrid_scores(cos, hub, lex, self.weights)
            out.append(np.where(self.admissible(r), s, -np.inf))
        return out

    def reply(self, requests: Sequence[PatientRequest]) -> list[PatientReply]:
        out = []
        for r, s in zip(requests, self.scores(requests)):
            zh = r.case.language == "zh"
            idx = select(s, self.weights, threshold=self.weights.zh_threshold if zh else None)
            if idx:
                out.append(PatientReply(text=" ".join(r.case.facts[i] for i in idx), facts=idx))
            else:
                out.append(PatientReply(text=prompts.PATIENT_CANNOT_ANSWER[r.case.language], facts=()))
        return out
