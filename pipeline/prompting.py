"""Questions -> model prompts through the tokenizer's chat template (plain text if it has none)."""

from __future__ import annotations


def render_prompt(tokenizer, question: str) -> tuple[str, list[int]]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"Question: {question}\nAnswer:"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
