import random
import string

import pytest
import torch

from exocortex.config import ModelConfig
from exocortex.tokenizer import Tokenizer


def _sample_texts(n=400, seed=0):
    rng = random.Random(seed)
    words = ["the", "river", "town", "Mira", "lives", "in", "Tarsk", "and", "sells", "glimmerfern", "at", "market",
             "12", "347", "+", "=", "it's", "we'll", "héllo", "naïve", "日本", "🙂", "\n", "  "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="session")
def texts():
    return _sample_texts()


@pytest.fixture(scope="session")
def tok(texts):
    return Tokenizer.train(texts, 400)


@pytest.fixture
def small_cfg():
    return ModelConfig(depth=2, width=64, head_dim=16, vocab_size=400, seq_len=32, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def exocortex_home(tmp_path_factory):
    """The owner's files (notes, document index: $EXOCORTEX_HOME) in a temporary place, for every test and the
    commands they start: tests never read or write ~/.exocortex."""
    import os
    home = tmp_path_factory.mktemp("exocortex-home")
    old = os.environ.get("EXOCORTEX_HOME")
    os.environ["EXOCORTEX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("EXOCORTEX_HOME", None)
    else:
        os.environ["EXOCORTEX_HOME"] = old
