"""promed_jax.consult: the consultation protocol, patient simulators and batched multi-turn rollouts."""

from promed_jax.consult.patients import (
    FactSelectPatient,
    LLMPatient,
    Patient,
    PatientReply,
    PatientRequest,
    make_patient,
    retrieve,
)
from promed_jax.consult.protocol import (
    DoctorTurn,
    doctor_first_message,
    extract_answer,
    format_score,
    is_correct,
    parse_doctor_turn,
    turn_kind,
)
from promed_jax.consult.rollout import Dialogue, DialogueTokens, Rollout, TokenTemplate, consult, rollout, to_rollout

__all__ = [
    "Dialogue",
    "DialogueTokens",
    "DoctorTurn",
    "FactSelectPatient",
    "LLMPatient",
    "Patient",
    "PatientReply",
    "PatientRequest",
    "Rollout",
    "TokenTemplate",
    "consult",
    "doctor_first_message",
    "extract_answer",
    "format_score",
    "is_correct",
    "make_patient",
    "parse_doctor_turn",
    "retrieve",
    "rollout",
    "to_rollout",
    "turn_kind",
]
