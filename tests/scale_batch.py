"""A left-padded batch of random prompts and right-padded completions for a tiny model (stage-3 layout)."""

from __future__ import annotations

import torch

from pipeline.grpo.logprobs import position_ids_for
from pipeline.grpo.rollout import pad_batch


def random_batch(vocab_size: int, seed: int = 0, rows: int = 6, prompt_lens=(3, 5), completion_lens=(0, 2, 7, 9)):
    """(input_ids, attention_mask, completion_mask) with mixed lengths, an empty completion among them."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab_size, (prompt_lens[i % len(prompt_lens)],), generator=gen).tolist()
               for i in range(rows)]
    completions = [torch.randint(3, vocab_size, (completion_lens[i % len(completion_lens)],), generator=gen).tolist()
                   for i in range(rows)]
    return pad_batch(prompts, completions, pad_id=0)


def naive_logprobs(model, input_ids, attention_mask, completion_len: int, temperature: float = 1.0):
    """The full-vocabulary way (the code before chunking), as ground truth: all logits at once."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask),
                use_cache=False)
    logits = out.logits[:, -completion_len - 1:-1].float() / temperature
    log_norm = logits.logsumexp(-1)
    targets = input_ids[:, -completion_len:]
    entropy = log_norm - (logits.softmax(-1) * logits).sum(-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm, entropy.detach()
