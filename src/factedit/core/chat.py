"""Requests as a deployed chat model sees them: the prompt as the user's turn, then the assistant's
answer beginning with it, rendered through the tokenizer's own chat template.

    chat_request(tok, Request("{} is located in the city of", "Eiffel Tower", "Rome"))
    # prompt: "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nEiffel Tower is located in the city
    #          of<|im_end|>\\n<|im_start|>assistant\\n{} is located in the city of"

The subject occurs twice, written in the user's turn and as ``{}`` in the answer prefix: the fact token
is the one in the answer, right before the target (as in a plain prompt), and the target follows with
its usual leading space. The rendered text starts with the template's own markup, so it is read
without a prompt prefix (``prompt_prefix="none"``).
"""

from __future__ import annotations

from typing import Optional

from .errors import RequestError
from .requests import Request

__all__ = ["has_chat_template", "chat_request", "chat_prompt"]


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_prompt(tok, user_text: str) -> str:
    """The rendered conversation up to the opened assistant turn, for a user message ``user_text``."""
    if not has_chat_template(tok):
        raise RequestError("this model's tokenizer has no chat template; edit without --chat")
    try:
        text = tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:  # a template that cannot render a single user turn
        raise RequestError(f"the chat template could not render a user turn: {e}") from None
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and list(tok("a")["input_ids"])[:1] == [tok.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds its BOS itself: not twice
    return text


def chat_request(tok, req: Request, answer_prefix: Optional[str] = None) -> Request:
    """``req`` rendered as a chat turn (see the module docstring); ``answer_prefix`` (a template with
    ``{}``) is how the assistant's answer begins, by default the request's own prompt."""
    answer = req.prompt if answer_prefix is None else answer_prefix
    if answer.count("{}") != 1:
        raise RequestError(f"the answer prefix must contain exactly one '{{}}': {answer!r}")
    head = chat_prompt(tok, req.text)
    if "{}" in head:
        raise RequestError("the rendered conversation contains '{}' itself; rephrase the prompt")
    return Request(head + answer, req.subject, req.target_new, req.target_true)
