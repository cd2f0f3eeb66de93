"""Curriculum samplers (docs/samplers.md): pure Python/NumPy, reward feedback, exact resume.

    sampler = build(name, rows, batch_size=B, total_steps=T, seed=s, **params)
    idx = sampler.next_batch(); sampler.update(idx, rewards); sampler.probabilities()
    sampler.state_dict(); sampler.load_state_dict(state)

See docs/samplers.md for every sampler, its parameters and formulas.
"""

from pipeline.samplers.base import Sampler
from pipeline.samplers.registry import ALIASES, SAMPLERS, build, check_params, sampler_params

__all__ = ["ALIASES", "SAMPLERS", "Sampler", "build", "check_params", "sampler_params"]
