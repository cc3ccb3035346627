"""Rollouts: grouped sampling with the jitted sampler, scoring, teacher-forced log-probs (checked
against TRL's own per-token log-prob / entropy helpers on the same weights in PyTorch)."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxalign import models
from jaxalign.rl.rewards import exact_match_source, python_source
from jaxalign.rl.rollout import (
    PromptStream, concat_rollouts, forward_logps, generate, make_logps_fn, rollout_metrics,
    terminated,
)
from jaxalign.sample import make_sampler
from tests.rl.conftest import make_rollout


def _length_reward(completions, **_):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def rollout(tiny, tokenizer, prompts):
    model, params = tiny
    stream = PromptStream(prompts, pad_id=tokenizer.pad_token_id, batch_size=4, seed=0)
    sampler = make_sampler(model, max_new_tokens=5, eos_ids=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, temperature=0.7)
    batch = stream.next()
    r = generate(sampler, {"params": params}, batch, group_size=3, rng=jax.random.PRNGKey(0),
                 tokenizer=tokenizer, sources=[python_source("len", _length_reward),
                                               exact_match_source(weight=0.0)])
    return r, batch, stream


def test_generate_layout_and_rewards(rollout, tokenizer):
    r, batch, stream = rollout
    p = stream.width
    assert r.tokens.shape == (12, p + 5) and r.sample_logps.shape == (12, p + 4)
    # prompts repeated consecutively (TRL's group layout), columns repeated with them
    np.testing.assert_array_equal(r.tokens[:, :p], np.repeat(batch["prompt_tokens"], 3, 0))
    assert r.columns["answer"] == [a for a in batch["answer"] for _ in range(3)]
    assert r.prompts[0] == r.prompts[2] != r.prompts[3]
    # completion mask: only completion columns, a prefix of each row's completion
    assert not r.loss_mask[:, :p].any()
    lm = r.loss_mask[:, p:]
    assert (np.diff(lm.astype(int), axis=1) <= 0).all() and (lm.sum(1) >= 1).all()
    np.testing.assert_array_equal(r.attention_mask[:, p:], lm)
    # rewards come from the decoded completions
    np.testing.assert_array_equal(r.rewards, [float(len(c)) for c in r.completions])
    np.testing.assert_array_equal(r.reward_parts["len"], r.rewards)
    assert r.completions[0] == tokenizer.decode(r.tokens[0, p:][lm[0]].tolist())


def test_sample_logps_equal_teacher_forced(rollout, tiny):
    r, _, _ = rollout
    model, params = tiny
    lp = np.asarray(make_logps_fn(model, temperature=0.7)(
        {"params": params}, r.tokens, r.attention_mask, r.loss_mask))
    np.testing.assert_allclose(lp, r.sample_logps, atol=2e-5)
    assert (lp[~r.loss_mask[:, 1:]] == 0).all()


def test_forward_logps_and_entropy_match_trl_helpers(rollout, tiny, tmp_path):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    r, _, _ = rollout
    model, params = tiny
    models.save_pretrained(model, params, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    pos = np.maximum(np.cumsum(r.attention_mask, 1) - 1, 0)
    with torch.no_grad():
        logits = hf(torch.tensor(r.tokens, dtype=torch.long),
                    attention_mask=torch.tensor(r.attention_mask.astype(np.int64)),
                    position_ids=torch.tensor(pos)).logits[:, :-1].float() / 0.7
        ref_lp = selective_log_softmax(logits, torch.tensor(r.tokens[:, 1:], dtype=torch.long))
        ref_ent = entropy_from_logits(logits)
    lp, ent, hidden = forward_logps(model, {"params": params}, r.tokens, r.attention_mask,
                                    r.loss_mask, temperature=0.7, return_hidden=True)
    m = r.loss_mask[:, 1:]
    np.testing.assert_allclose(np.asarray(lp)[m], ref_lp.numpy()[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent)[m], ref_ent.numpy()[m], atol=2e-5)
    assert (np.asarray(ent)[~m] == 0).all() and hidden.shape == (*r.tokens.shape, 16)


def test_rollout_metrics_by_hand():
    r = make_rollout([1, 0, 1, 1, 0, 0], group_size=3, lengths=[3, 6, 2, 6, 1, 4])
    r.tokens[3, -1] = 5  # a 6-token completion without EOS: truncated
    m = rollout_metrics(r, eos_id=2)
    assert m["reward"] == pytest.approx(0.5)
    assert m["reward_std"] == pytest.approx(np.std([1, 0, 1, 1, 0, 0], ddof=1))
    g1, g2 = np.std([1, 0, 1], ddof=1), np.std([1, 0, 0], ddof=1)
    assert m["reward_std/group"] == pytest.approx((g1 + g2) / 2)
    assert m["frac_reward_zero_std"] == 0.0
    assert m["completions/mean_length"] == pytest.approx(22 / 6)
    assert (m["completions/min_length"], m["completions/max_length"]) == (1, 6)
    np.testing.assert_array_equal(terminated(r, 2), [1, 1, 1, 0, 1, 1])
    assert m["completions/clipped_ratio"] == pytest.approx(1 / 6)
    assert rollout_metrics(make_rollout([2, 2, 0, 0], group_size=2), eos_id=2)[
        "frac_reward_zero_std"] == 1.0


def test_take_and_concat():
    a = make_rollout([1, 0, 0, 1], group_size=2)
    b = make_rollout([5, 6, 7, 8], group_size=2, tokens_seed=1)
    c = concat_rollouts([a, b])
    assert c.tokens.shape == (8, 10) and c.group_size == 2
    np.testing.assert_array_equal(c.rewards, [1, 0, 0, 1, 5, 6, 7, 8])
    t = c.take([5, 0])
    np.testing.assert_array_equal(t.tokens, c.tokens[[5, 0]])
    assert t.completions == [c.completions[5], c.completions[0]] and t.group_size == 1
    with pytest.raises(ValueError, match="share group_size"):
        concat_rollouts([a, make_rollout([1, 2, 3], group_size=3)])


def test_prompt_stream_fixed_width_and_resumable(prompts, tokenizer):
    s = PromptStream(prompts, pad_id=0, batch_size=8, seed=3)
    widths = {s.next()["prompt_tokens"].shape[1] for _ in range(3)}
    assert widths == {s.width}
    saved = s.state
    nxt = s.next()
    again = PromptStream(prompts, pad_id=0, batch_size=8, seed=3, state=saved).next()
    np.testing.assert_array_equal(nxt["prompt_tokens"], again["prompt_tokens"])
    with pytest.raises(ValueError, match="exceeds the prompt dataset size"):
        PromptStream(prompts, pad_id=0, batch_size=1000, seed=0)
