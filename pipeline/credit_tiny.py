"""``credit-tiny``: the credit task's own policy, small enough for a powered study on a CPU.

A 2-layer Llama over the task's 16 symbols, built from a fixed seed and given the task's format by a
short supervised warm-up on the idealised policy of ``pipeline.tasks.credit`` (uniform fillers, each
decision right with probability ``WARMUP_P_RIGHT``), so that it starts well above 0 and well below 1
reward and its true f is the task's formula. Built once into the model cache (a few seconds),
like the embedded model's conversion; the directory name carries the recipe's version.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.model_cache import save_atomically
from pipeline.tasks.credit import (
    DIGITS,
    END,
    FILLERS,
    FREE,
    LEVELS,
    SEPARATOR,
    Spec,
    make_spec,
    sample_completion,
)

NAME = "credit-tiny"
RECIPE_VERSION = 1  # bump when anything below changes: the cache keys on it
PAD, EOS = "<pad>", "</s>"
VOCAB = [PAD, EOS, FREE, END, SEPARATOR, *DIGITS, *FILLERS]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} " + SEPARATOR + "{% endif %}")
CHAT_TEMPLATE_PROMPT = "{template} " + SEPARATOR  # what the template renders a prompt to
WARMUP_P_RIGHT = 0.4
DECISION_WEIGHT = 20.0
WARMUP_STEPS, WARMUP_BATCH, WARMUP_LR, SEED = 800, 64, 3e-3, 0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per symbol, split on spaces; the chat template appends the separator the answer follows."""
    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(VOCAB)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=None, tie_word_embeddings=True)


def ideal_next(tokenizer: PreTrainedTokenizerFast, spec: Spec) -> torch.Tensor:
    """(length + 1, vocab): the idealised policy's distribution over each completion token and the stop,
    decision rows weighted by DECISION_WEIGHT (which digit is right is a small share of the loss)."""
    vocab = tokenizer.get_vocab()
    target = torch.zeros(spec.length + 1, len(vocab))
    for slot in range(spec.length):
        if slot in spec.targets:
            target[slot, [vocab[d] for d in DIGITS]] = (1 - WARMUP_P_RIGHT) / (len(DIGITS) - 1)
            target[slot, vocab[spec.targets[slot]]] = WARMUP_P_RIGHT
            target[slot] *= DECISION_WEIGHT
        else:
            target[slot, [vocab[f] for f in FILLERS]] = 1 / len(FILLERS)
    target[spec.length, tokenizer.eos_token_id] = 1.0
    return target


def warmup_batch(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, target distributions) of WARMUP_BATCH idealised completions. The targets are the
    policy's distributions, not its samples: the warm-up fits them without sampling noise."""
    rows = []
    for _ in range(WARMUP_BATCH):
        spec = make_spec(rng.choice(list(LEVELS)), rng)
        prompt_ids = tokenizer(render_template(spec), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(sample_completion(spec, WARMUP_P_RIGHT, rng), add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, completion_ids + [tokenizer.eos_token_id], ideal_next(tokenizer, spec)))
    width = max(len(p) + len(c) for p, c, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    targets = torch.zeros(len(rows), width, len(tokenizer))
    for i, (p, c, target) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        targets[i, len(p) - 1:len(p) - 1 + len(c)] = target  # position u - 1 predicts completion token u
    return ids, targets


def render_template(spec: Spec) -> str:
    return CHAT_TEMPLATE_PROMPT.format(template=spec.template())


def build(target: Path) -> None:
    """Warm the seeded model up on the task's format and save it (atomically) at ``target``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(build_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, WARMUP_STEPS)
    rng = random.Random(SEED)
    model.train()
    for _ in range(WARMUP_STEPS):
        ids, targets = warmup_batch(tokenizer, rng)
        logits = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id).logits
        weight = targets.sum(-1)
        loss = -(targets * logits.log_softmax(-1)).sum(-1).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    save_atomically(model, tokenizer, target)


def cache_name() -> str:
    return f"{NAME}-v{RECIPE_VERSION}"
