import jax
import ml_collections as mlc
import pytest

from jaxalign.data import build_char_tokenizer
from jaxalign.train import setup
from jaxalign.train.config import base_config


def tiny_model(layers=2, hidden=32, seed=0):
    """(model, params, tokenizer): a random tiny Llama over the character tokenizer."""
    tok = build_char_tokenizer()
    cfg = base_config().model
    cfg.init = mlc.ConfigDict(dict(family="llama", vocab_size=0, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True))
    model, params = setup.build_model(cfg, tok, jax.random.PRNGKey(seed))
    return model, params, tok


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()
