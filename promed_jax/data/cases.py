"""The `Case` type: one consultation problem. Loaders and validation for every on-disk format follow."""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Case:
    """One multiple-choice consultation problem.

    Attributes:
      id: `<source>:<original id>` (original ids collide across files).
      source: short dataset name, e.g. `medqa`, `promed_medqa`, `cmb`, `synthetic`.
      language: `en` or `zh`.
      initial_info: what the doctor is told at the start (text).
      question: the atomic question (the inquiry without the patient's details).
      options: letter -> option text, letters in order; 4, 5 or more options.
      answer: the gold letters, sorted (several for CMB multi-answer items).
      facts: the atomic facts [n] held by the patient; every fact is a Shapley player.
      known: indices of the facts the doctor knows at the start (sorted).
    """

    id: str
    source: str
    language: str
    initial_info: str
    question: str
    options: Mapping[str, str]
    answer: tuple[str, ...]
    facts: tuple[str, ...]
    known: tuple[int, ...] = ()

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    @property
    def gold_text(self) -> str:
        """The gold option text(s): several are joined with "，" in letter order (promed.md §2)."""
        return "，".join(self.options[letter] for letter in self.answer)

    @property
    def multi_answer(self) -> bool:
        return len(self.answer) > 1
