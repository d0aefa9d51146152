"""Known facts: prompts whose answer a model is expected to know (ROME's ``known_1000.json``),
for causal-trace averages and for measuring recall. The one loader of such files.

    facts = load_known_facts("../shared/data/knowns/known_1000.json")
    facts[0].prompt, facts[0].subject, facts[0].answer      # "Vinson Massif is located in the continent of", ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .errors import DataError

__all__ = ["KnownFact", "load_known_facts", "BUILTIN_SUBJECTS", "BUILTIN_TEMPLATES"]

#: subjects a small model tends to know, used when no bank of known facts is given
BUILTIN_SUBJECTS = (
    "France", "Germany", "Japan", "Brazil", "Portugal", "Italy", "Spain", "Canada", "India", "China", "Egypt",
    "Mexico", "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Moscow", "Cairo", "the Eiffel Tower",
    "the Colosseum", "Big Ben", "Mount Everest", "the Amazon River", "Google", "Microsoft", "Apple", "Toyota",
    "Nokia", "Samsung", "IBM", "Albert Einstein", "Barack Obama", "William Shakespeare", "Pablo Picasso",
    "Lionel Messi", "Elvis Presley", "Marie Curie", "Isaac Newton")

#: relation templates used when no bank is given (a subject, then the answer)
BUILTIN_TEMPLATES = (
    "{} is located in", "The capital of {} is", "The official language of {} is", "{} was founded by",
    "{} was born in", "{} is a citizen of", "{} works in the field of", "The headquarters of {} are in",
    "{} is part of the continent of", "The currency of {} is")


@dataclass(frozen=True)
class KnownFact:
    """A known fact: ``prompt`` (subject filled in) whose answer is ``answer``.

    Attributes:
        prompt: the prompt with the subject written in.
        subject: the subject as it occurs in the prompt.
        answer: the expected continuation (ROME's ``attribute``).
        id: the record's ``known_id`` (else its index), as text.
        relation_id: the Wikidata relation (``P…``) when the file gives one.
    """

    prompt: str
    subject: str
    answer: str
    id: str = ""
    relation_id: str = ""


def load_known_facts(path) -> List[KnownFact]:
    """Facts from ROME's knowns file (a JSON list of ``{prompt, subject, attribute, ...}``) or JSON
    lines with ``prompt``, ``subject`` and ``attribute`` (or ``answer``); a malformed file raises
    :class:`~factedit.core.errors.DataError` naming the file and the record."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read facts file {p}: {e}") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise DataError(f"{p} is neither a JSON list nor JSON lines: {e}") from None
    facts = []
    for i, r in enumerate(records):
        answer = r.get("attribute", r.get("answer")) if isinstance(r, dict) else None
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("subject"), str)
                and isinstance(answer, str)):
            raise DataError(f"{p}, record {i}: need string fields prompt, subject and attribute (or answer)")
        facts.append(KnownFact(r["prompt"], r["subject"], answer, str(r.get("known_id", i)),
                               str(r.get("relation_id", ""))))
    if not facts:
        raise DataError(f"{p} holds no facts")
    return facts
