"""Prompt formats: how a task item becomes the text the model continues.

Three formats (:data:`PROMPT_FORMATS`). On the embedded SmolLM2-135M with 2-term ``chain_sum``
(greedy, n=64) the design notes measured accuracies of 8/64, 17/64 and 33/64 respectively:

``raw``
    ``Q: {question}\\nA: Let's think step by step.``, mechreward's prompt, kept byte-for-byte
    so that its numbers can be reproduced.
``fewshot``
    ``shots`` demos from :meth:`Task.fewshot`, each ``Q: {demo question}\\nA: {demo answer}\\n\\n``,
    then ``Q: {question}\\nA:``. A base model tends to go on to invent the next ``Q:``. Cut
    completions with :func:`saereward.tasks.cut_completion` (the extractors already do) before
    judging or pooling over them.
``chat``
    The tokenizer's chat template, applied to a single user turn holding the question, with the
    generation prompt appended. It needs the tokenizer (``ValueError`` without one).
"""

from __future__ import annotations

from typing import Any, Literal

from saereward.errors import SaeRewardError
from saereward.tasks.base import Task, TaskItem

__all__ = ["PROMPT_FORMATS", "PromptFormat", "format_prompt"]

PromptFormat = Literal["raw", "fewshot", "chat"]

PROMPT_FORMATS: tuple[str, ...] = ("raw", "fewshot", "chat")


def format_prompt(task: Task, item: TaskItem, fmt: str, tokenizer: Any = None, shots: int = 2) -> str:
    """The prompt for ``item`` in format ``fmt``; see the module docstring for the exact layouts."""
    q = item.question
    if fmt == "raw":
        return f"Q: {q}\nA: Let's think step by step."
    if fmt == "fewshot":
        demos = "".join(f"Q: {dq}\nA: {da}\n\n" for dq, da in task.fewshot(shots))
        return f"{demos}Q: {q}\nA:"
    if fmt == "chat":
        if tokenizer is None:
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
        )
    raise SaeRewardError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")
