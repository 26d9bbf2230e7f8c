import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model(tokenizer):
    return make_model(vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def quick_base_dir(tmp_path_factory):
    """One cache of the demos' tiny pretrained base per test session (the first demo test builds it)."""
    return tmp_path_factory.getbasetemp() / "demo-base-quick"
