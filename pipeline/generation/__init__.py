"""Generation backends behind one interface (see ``base.GenerationBackend``)."""

from pipeline.generation.base import Completion, GenerationBackend, Request, SamplingParams
from pipeline.generation.hf import HFBackend

__all__ = ["Completion", "GenerationBackend", "HFBackend", "Request", "SamplingParams"]
