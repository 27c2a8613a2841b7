"""`Problem`: the unit of data every source, the pipeline, the toy world and the rollout share.

Its own module (no I/O, no imports from the rest of the package), so that the toy world and the
sources can both use it without importing each other.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem with a known answer: the unit every source, the pipeline and the toy world share.

    Fields:
      uid: stable identifier, "<file stem>:<row>" (JSONL rows with an `id` use "<stem>:<id>";
        TFDS rows "<name>/<split>:<row>"; toy problems "toy-<seed>:<index>").
      question: the raw problem text, without any instruction; used to build the meta and solution
        prompts and to drop predicted notions that the problem already names.
      answer: the ground-truth final answer as a string (what `\\boxed{}` must equal).
      solution: an optional reference (worked) solution, None when the source has none.
      source: where the record came from (a file path, "tfds:<name>/<split>" or "toy:<kind>").
      row: the 0-based row index in that source (line index for JSONL).
      difficulty: optional integer difficulty (MATH "Level 3" -> 3; toy level 1..5), else None.
    """

    uid: str
    question: str
    answer: str
    solution: str | None = None
    source: str = ""
    row: int = -1
    difficulty: int | None = None


def question_key(question: str) -> str:
    """What makes two questions the same problem for decontamination: their text up to whitespace."""
    return " ".join(question.split())
