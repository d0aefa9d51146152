"""Edit requests: ``(prompt template with "{}", subject, target_new[, target_true])``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .errors import RequestError

__all__ = ["Request", "same_prompt_message"]


@dataclass(frozen=True)
class Request:
    """One fact to write.

    Attributes:
        prompt: template with exactly one ``{}`` where the subject goes,
            e.g. ``"{} is located in the city of"``.
        subject: the subject string, e.g. ``"Eiffel Tower"``.
        target_new: the new object, e.g. ``"Rome"`` (scored with a leading space).
        target_true: the current object, optional (for evaluation), e.g. ``"Paris"``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: Optional[str] = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(self, name), str):
                raise RequestError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RequestError("target_true must be a string or None")
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(
                f"prompt template must contain exactly one '{{}}' where the subject goes, "
                f"found {n}: {self.prompt!r} (e.g. '{{}} is located in the city of')"
            )
        if not self.subject.strip():
            raise RequestError("subject is empty")
        if not self.target_new.strip():
            raise RequestError("target_new is empty: give the new object, e.g. 'Rome'")
        if self.target_true is not None and not self.target_true.strip():
            raise RequestError("target_true is empty (omit it instead)")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise RequestError(f"target_new and target_true are the same ({self.target_new!r})")

    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, target_true: Optional[str] = None) -> "Request":
        """Build from a prompt with the subject already written in (CounterFact KnowEdit layout)."""
        if not isinstance(prompt, str) or not isinstance(subject, str):
            raise RequestError("prompt and subject must be strings")
        if "{}" in prompt:
            return cls(prompt, subject, target_new, target_true)
        if not subject.strip() or subject not in prompt:
            raise RequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        i = prompt.rfind(subject)
        return cls(prompt[:i] + "{}" + prompt[i + len(subject):], subject, target_new, target_true)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict:
        return asdict(self)


def same_prompt_message(earlier: Request, later: Request, where: str = "") -> str:
    """Why ``later`` cannot join a batch holding ``earlier`` (same prompt template and subject): a duplicate (same
    new answer) or a contradiction; ``where`` names the two, e.g. ``"#0 and #3 "``."""
    kind = "duplicate" if earlier.target_new == later.target_new else "contradictory"
    return (f"{kind} requests in one batch: {where}both edit {later.text!r} (targets {earlier.target_new!r} and "
            f"{later.target_new!r})")
