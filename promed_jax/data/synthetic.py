"""The synthetic clinic: a small disease-finding table and a seeded generator of MediQ-shaped cases.

A case's gold disease has four findings; the patient holds them as facts ("The patient has a fever."). The
initial information names one finding that at least one distractor shares, so several options fit it; all
the facts together fit only the gold disease, because no disease's findings contain another's (equal-size,
distinct sets). Scripted doctors and patients may read `DISEASES`, `FINDINGS` and `fits` (never the `Case`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from promed_jax.data.cases import Case

SOURCE = "synthetic"
QUESTION = "Which of the following is the most likely diagnosis?"
N_OPTIONS = 4


@dataclasses.dataclass(frozen=True)
class Finding:
    """One clinical finding: how the patient states it, how a doctor asks about it, and a chief complaint."""

    fact: str
    question: str
    complaint: str


FINDINGS: dict[str, Finding] = {
    "fever": Finding("The patient has a fever.", "Does the patient have a fever?", "a fever"),
    "cough": Finding("The patient has a cough.", "Does the patient have a cough?", "a cough"),
    "dyspnea": Finding(
        "The patient is short of breath.", "Is the patient short of breath?", "shortness of breath"
    ),
    "chest_pain": Finding("The patient has chest pain.", "Does the patient have chest pain?", "chest pain"),
    "headache": Finding("The patient has a headache.", "Does the patient have a headache?", "a headache"),
    "neck_stiffness": Finding(
        "The patient has a stiff neck.", "Does the patient have a stiff neck?", "a stiff neck"
    ),
    "photophobia": Finding(
        "The patient finds light painful.", "Does the patient find light painful?", "pain on looking at light"
    ),
    "aura": Finding(
        "The patient sees flashing lights before the pain.",
        "Does the patient see flashing lights before the pain?",
        "flashing lights in the vision",
    ),
    "rash": Finding("The patient has a rash.", "Does the patient have a rash?", "a rash"),
    "joint_pain": Finding("The patient has joint pain.", "Does the patient have joint pain?", "joint pain"),
    "morning_stiffness": Finding(
        "The patient's joints are stiff in the morning.",
        "Are the patient's joints stiff in the morning?",
        "morning stiffness of the joints",
    ),
    "joint_swelling": Finding(
        "The patient has swollen joints.", "Does the patient have swollen joints?", "swollen joints"
    ),
    "abdominal_pain": Finding(
        "The patient has abdominal pain.", "Does the patient have abdominal pain?", "abdominal pain"
    ),
    "diarrhea": Finding("The patient has diarrhea.", "Does the patient have diarrhea?", "diarrhea"),
    "vomiting": Finding("The patient is vomiting.", "Is the patient vomiting?", "vomiting"),
    "jaundice": Finding(
        "The patient's skin is yellow.", "Is the patient's skin yellow?", "yellowing of the skin"
    ),
    "dark_urine": Finding("The patient's urine is dark.", "Is the patient's urine dark?", "dark urine"),
    "fatigue": Finding("The patient feels tired all the time.", "Does the patient feel tired?", "tiredness"),
    "weight_loss": Finding(
        "The patient has lost weight.", "Has the patient lost weight?", "weight loss"
    ),
    "night_sweats": Finding(
        "The patient sweats at night.", "Does the patient sweat at night?", "night sweats"
    ),
    "dysuria": Finding(
        "The patient has pain on urination.", "Does the patient have pain on urination?", "pain on urination"
    ),
    "frequency": Finding(
        "The patient urinates often.", "Does the patient urinate often?", "passing urine often"
    ),
    "flank_pain": Finding("The patient has flank pain.", "Does the patient have flank pain?", "flank pain"),
    "hematuria": Finding(
        "The patient has blood in the urine.", "Does the patient have blood in the urine?", "blood in the urine"
    ),
    "suprapubic_pain": Finding(
        "The patient has pain above the pubic bone.",
        "Does the patient have pain above the pubic bone?",
        "pain above the pubic bone",
    ),
    "palpitations": Finding(
        "The patient feels the heart racing.", "Does the patient feel the heart racing?", "a racing heart"
    ),
    "dizziness": Finding("The patient feels dizzy.", "Does the patient feel dizzy?", "dizziness"),
    "leg_swelling": Finding(
        "The patient's legs are swollen.", "Are the patient's legs swollen?", "swollen legs"
    ),
    "orthopnea": Finding(
        "The patient is breathless when lying flat.",
        "Is the patient breathless when lying flat?",
        "breathlessness when lying flat",
    ),
    "wheezing": Finding("The patient wheezes.", "Does the patient wheeze?", "wheezing"),
    "sore_throat": Finding(
        "The patient has a sore throat.", "Does the patient have a sore throat?", "a sore throat"
    ),
    "red_eyes": Finding("The patient has red eyes.", "Does the patient have red eyes?", "red eyes"),
    "heat_intolerance": Finding(
        "The patient cannot stand the heat.", "Does the patient find heat hard to bear?", "feeling too hot"
    ),
    "tremor": Finding("The patient's hands shake.", "Do the patient's hands shake?", "shaking hands"),
    "anorexia": Finding(
        "The patient has lost the appetite.", "Has the patient lost the appetite?", "loss of appetite"
    ),
}

DISEASES: dict[str, frozenset[str]] = {
    name: frozenset(findings)
    for name, findings in {
        "Pneumonia": ("fever", "cough", "dyspnea", "chest_pain"),
        "Acute bronchitis": ("cough", "sore_throat", "fatigue", "wheezing"),
        "Tuberculosis": ("cough", "fever", "night_sweats", "weight_loss"),
        "Meningitis": ("fever", "headache", "neck_stiffness", "photophobia"),
        "Migraine": ("headache", "photophobia", "vomiting", "aura"),
        "Gastroenteritis": ("diarrhea", "vomiting", "abdominal_pain", "fever"),
        "Hepatitis": ("jaundice", "fatigue", "abdominal_pain", "dark_urine"),
        "Pyelonephritis": ("fever", "flank_pain", "dysuria", "vomiting"),
        "Cystitis": ("dysuria", "frequency", "hematuria", "suprapubic_pain"),
        "Kidney stone": ("flank_pain", "hematuria", "vomiting", "abdominal_pain"),
        "Heart failure": ("dyspnea", "leg_swelling", "fatigue", "orthopnea"),
        "Atrial fibrillation": ("palpitations", "dizziness", "dyspnea", "fatigue"),
        "Rheumatoid arthritis": ("joint_pain", "morning_stiffness", "fatigue", "joint_swelling"),
        "Systemic lupus erythematosus": ("joint_pain", "rash", "fatigue", "fever"),
        "Measles": ("fever", "rash", "cough", "red_eyes"),
        "Hyperthyroidism": ("palpitations", "weight_loss", "heat_intolerance", "tremor"),
        "Appendicitis": ("abdominal_pain", "fever", "vomiting", "anorexia"),
    }.items()
}

FACT_TO_FINDING: dict[str, str] = {finding.fact: name for name, finding in FINDINGS.items()}


def fits(disease: str, findings: Iterable[str]) -> bool:
    """Whether a disease explains every one of the findings (finding names, see FINDINGS)."""
    return set(findings) <= DISEASES[disease]


def findings_of(facts: Iterable[str]) -> set[str]:
    """The finding names of facts written as in FINDINGS; any other text raises KeyError."""
    return {FACT_TO_FINDING[fact] for fact in facts}


def _make_case(index: int, rng: np.random.Generator) -> Case:
    names = sorted(DISEASES)
    gold = names[rng.integers(len(names))]
    gold_findings = sorted(DISEASES[gold])
    shared = [f for f in gold_findings if any(f in DISEASES[d] for d in names if d != gold)]
    complaint = shared[rng.integers(len(shared))]
    sharers = [d for d in names if d != gold and complaint in DISEASES[d]]
    first = sharers[rng.integers(len(sharers))]
    rest = [d for d in names if d not in (gold, first)]
    others = [rest[i] for i in rng.choice(len(rest), size=N_OPTIONS - 2, replace=False)]
    diseases = [gold, first, *others]
    order = rng.permutation(N_OPTIONS)
    letters = "ABCDEFGH"[:N_OPTIONS]
    options = {letters[k]: diseases[int(i)] for k, i in enumerate(order)}
    answer = next(letter for letter, disease in options.items() if disease == gold)
    age = int(rng.integers(18, 80))
    sex = ("man", "woman")[int(rng.integers(2))]
    facts = tuple(FINDINGS[f].fact for f in (gold_findings[int(i)] for i in rng.permutation(len(gold_findings))))
    return Case(
        id=f"{SOURCE}:{index}",
        source=SOURCE,
        language="en",
        initial_info=f"A {age}-year-old {sex} comes to the clinic because of {FINDINGS[complaint].complaint}.",
        question=QUESTION,
        options=options,
        answer=(answer,),
        facts=facts,
        known=(),
    )


def complaint_of(case: Case) -> str:
    """The finding named in a synthetic case's initial information."""
    matches = [name for name, f in FINDINGS.items() if case.initial_info.endswith(f"because of {f.complaint}.")]
    if len(matches) != 1:
        raise ValueError(f"{case.id}: initial information names no single finding: {case.initial_info!r}")
    return matches[0]


def make_cases(n: int, seed: int = 0) -> list[Case]:
    """`n` cases; case i depends only on (seed, i), so a longer list extends a shorter one."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_make_case(i, np.random.default_rng([seed, i])) for i in range(n)]
