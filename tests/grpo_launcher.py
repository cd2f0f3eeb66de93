"""Runs stage 3's CLI in a subprocess with two extra test rewards: the character length of the
completion, which varies even for a random tiny model, so advantages are non-zero; and whether
completion token ``DECIDING`` has an even id, a reward decided by that one token (online importance)."""

import rewards
from train_grpo_softmask import main


def completion_chars(prompts, completions, **_):
    return [len(c) / 100 for c in completions]


DECIDING = 3


def deciding_token(prompts, completions, completion_ids, **_):
    return [float(len(ids) > DECIDING and ids[DECIDING] % 2 == 0) for ids in completion_ids]


rewards.REWARDS["completion_chars"] = completion_chars
rewards.REWARDS["deciding_token"] = deciding_token

if __name__ == "__main__":
    main()
