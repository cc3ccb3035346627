"""Shared fixtures for the online-training tests: the char tokenizer, a tiny random Llama sized
for it, tokenized arithmetic prompts, and a hand-made `Rollout` builder."""

import numpy as np
import pytest

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.rl.rollout import Rollout


@pytest.fixture(scope="session")
def tokenizer():
    return jdata.build_char_tokenizer()


def tiny_llama(tokenizer, *, hidden=16, layers=1, seed=0):
    import jax

    cfg = models.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                             max_position_embeddings=64, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    model = models.build_model(cfg)
    return model, models.init_params(model, jax.random.PRNGKey(seed))


@pytest.fixture(scope="session")
def tiny(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    ds = jdata.make_prompt_dataset(64, seed=0, digits=1, operators="+")
    return jdata.tokenize_dataset(ds, tokenizer, kind="prompt")


def make_rollout(rewards, *, group_size, lengths=None, completions=None, width=4, prompt_len=3,
                 eos_id=2, tokens_seed=0):
    """A Rollout with `len(rewards)` rows: prompt of `prompt_len` tokens left-padded to `width`,
    completions of `lengths` tokens (last one EOS) right-padded to 6."""
    n = len(rewards)
    lengths = [3] * n if lengths is None else list(lengths)
    rng = np.random.default_rng(tokens_seed)
    c = 6
    tokens = np.zeros((n, width + c), np.int32)
    am = np.zeros((n, width + c), bool)
    lm = np.zeros((n, width + c), bool)
    tokens[:, width - prompt_len:width] = rng.integers(7, 17, (n, prompt_len))
    am[:, width - prompt_len:width] = True
    for i, k in enumerate(lengths):
        tokens[i, width:width + k] = rng.integers(7, 17, k)
        if k:
            tokens[i, width + k - 1] = eos_id
        am[i, width:width + k] = True
        lm[i, width:width + k] = True
    completions = completions or [f"c{i}" for i in range(n)]
    r = np.asarray(rewards, np.float32)
    return Rollout(tokens, am, lm, np.zeros((n, width + c - 1), np.float32), r, {"r": r},
                   [f"p{i // group_size}" for i in range(n)], list(completions),
                   {"answer": ["1"] * n}, group_size)
