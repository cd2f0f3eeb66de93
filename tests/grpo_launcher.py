"""Runs stage 3's CLI in a subprocess with one extra test reward: the character length of the
completion, which varies even for a random tiny model, so advantages are non-zero."""

import rewards
from train_grpo_softmask import main


def completion_chars(prompts, completions, **_):
    return [len(c) / 100 for c in completions]


rewards.REWARDS["completion_chars"] = completion_chars

if __name__ == "__main__":
    main()
