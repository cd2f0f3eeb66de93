"""Runs run_study.py in a subprocess with the test reward ``completion_chars`` registered (it varies
even for a random tiny model, so stage 2 has informative pairs and GRPO non-zero advantages)."""

import tests.grpo_launcher  # noqa: F401  (registers completion_chars)
from run_study import main

if __name__ == "__main__":
    main()
