import os

import pytest
import torch

from tests.tiny_model import save_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama + byte-level tokenizer with a chat template, as an HF directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory):
    """Same architecture, different vocabulary: for the wrong-tokenizer errors."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-other") / "tiny-other", vocab_size=280)


@pytest.fixture(scope="session")
def credit_tiny_cache(tmp_path_factory):
    """A model cache (for ``RVG_CACHE``) holding ``credit-tiny`` after a 20-step warm-up: the real
    architecture and tokenizer in a second; the full warm-up is tested (slow) in test_credit_tiny."""
    from unittest import mock

    from pipeline import credit_tiny

    cache = tmp_path_factory.mktemp("rvg-cache")
    with mock.patch.object(credit_tiny, "WARMUP_STEPS", 20):
        credit_tiny.build(cache / "models" / credit_tiny.cache_name())
    return cache
