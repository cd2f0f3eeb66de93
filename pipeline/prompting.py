"""Dataset rows -> model prompts, the way TRL 1.16 renders them, and the text view of chat messages.

A ``prompt`` column (TRL's layout) is used as TRL uses it: chat messages go through the tokenizer's
chat template with the generation prompt, text is tokenized as it is. Our ``question`` column is a
user turn through the chat template (``Question: ...\\nAnswer:`` for a tokenizer without one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import UserError


def is_conversational(prompt: Any) -> bool:
    """TRL's test: a list of {"role", "content"} messages (not a string)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], Mapping) and "role" in prompt[0]


def as_text(value: Any) -> str:
    """Chat messages (a prompt, or a completion ``[{"role": "assistant", ...}]``) as their joined contents."""
    return "\n".join(str(m["content"]) for m in value) if is_conversational(value) else value


def render_prompt(tokenizer, row: Mapping[str, Any]) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a dataset row."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt, tokenizer(prompt)["input_ids"]
    messages = prompt if is_conversational(prompt) else [{"role": "user", "content": row["question"]}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif prompt is None:
        text = f"Question: {row['question']}\nAnswer:"
    else:
        raise UserError("the dataset's prompts are chat messages but the model's tokenizer has no chat template: "
                        "give `prompt` as text, or use a chat model")
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
