import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.analysis import tax
from jaxalign.losses.logps import sequence_logps
from jaxalign.sample import make_sampler


def test_teacher_forced_scores_hand_case():
    # Vocabulary of 3; row 0: every completion token is the argmax; row 1: its second completion
    # token is not; row 2: no completion tokens at all.
    tokens = jnp.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    big = jnp.array([0.0, 0.0, 0.0])
    logits = jnp.stack([
        jnp.stack([jnp.array([0.0, 5.0, 0.0]), jnp.array([0.0, 0.0, 5.0]), big]),
        jnp.stack([jnp.array([0.0, 5.0, 0.0]), jnp.array([0.0, 5.0, 0.0]), big]),
        jnp.stack([big, big, big]),
    ])
    loss_mask = jnp.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], bool)
    s = jax.jit(tax.teacher_forced_scores)(logits, tokens, loss_mask)
    np.testing.assert_array_equal(s["correct"], [True, False, False])
    np.testing.assert_array_equal(s["num_tokens"], [2, 2, 0])
    lse = np.log(np.exp(5.0) + 2.0)
    np.testing.assert_allclose(s["logps"], [2 * (5.0 - lse), (5.0 - lse) + (0.0 - lse), 0.0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        tax.teacher_forced_scores(logits[0], tokens, loss_mask)


def test_greedy_decoding_reproduces_exactly_the_teacher_forced_argmax(tiny):
    """The module's claim: greedy decoding reproduces a completion iff every completion token is
    the teacher-forced argmax. Greedy outputs of a random model score as correct; changing any one
    of their tokens makes them incorrect."""
    model, params, _ = tiny
    variables = {"params": params}
    rng = np.random.default_rng(0)
    prompts = rng.integers(7, 20, size=(4, 5)).astype(np.int32)
    sampler = make_sampler(model, max_new_tokens=4, eos_ids=[2], pad_id=0, greedy=True)
    out = sampler(variables, prompts, np.ones_like(prompts), jax.random.PRNGKey(0))
    gen, gmask = np.asarray(out["tokens"]), np.asarray(out["mask"]).astype(bool)
    tokens = np.concatenate([prompts, gen], 1)
    am = np.concatenate([np.ones_like(prompts, bool), gmask], 1)
    lm = np.concatenate([np.zeros_like(prompts, bool), gmask], 1)
    scorer = tax.make_completion_scorer(model)
    assert np.asarray(scorer(variables, tokens, am, lm)["correct"]).all()
    for pos in range(gen.shape[1]):
        bad = tokens.copy()
        col = prompts.shape[1] + pos
        bad[:, col] = np.where(bad[:, col] == 8, 9, 8)
        correct = np.asarray(scorer(variables, bad, am, lm)["correct"])
        np.testing.assert_array_equal(correct[gmask[:, pos]], False)


def test_completion_metrics_independent_of_batching_and_match_sequence_logps(tiny):
    model, params, tok = tiny
    variables = {"params": params}
    es = tax.make_eval_set("cap", tok, source="synthetic:sft", n=5, seed=3,
                           synthetic={"operators": "-"})
    scorer = tax.make_completion_scorer(model)
    m4 = tax.completion_metrics(scorer, variables, es, batch_size=4)  # one padded partial batch
    m5 = tax.completion_metrics(scorer, variables, es, batch_size=5)
    assert m4["n"] == m5["n"] == 5
    for k in ("accuracy", "nll", "logps"):
        assert m4[k] == pytest.approx(m5[k], rel=1e-5)
    b = es.collate(list(es.examples))
    logits = model.apply(variables, b["tokens"], attention_mask=b["attention_mask"])
    seq = sequence_logps(logits[:, :-1], b["tokens"][:, 1:], b["loss_mask"][:, 1:])
    assert m5["logps"] == pytest.approx(float(seq.mean()), rel=1e-5)
    ntok = b["loss_mask"][:, 1:].sum()
    assert m5["nll"] == pytest.approx(float(-seq.sum() / ntok), rel=1e-5)


def test_pair_metrics_hand_case():
    # A stand-in scorer: log p of a sequence = -(sum of its masked tokens), so shorter/smaller wins.
    def scorer(variables, tokens, am, lm):
        t = np.asarray(tokens, np.float32)
        return {"correct": np.zeros(len(t), bool), "logps": -(t * lm).sum(1),
                "num_tokens": lm.sum(1)}

    examples = [{"c": [1, 2], "r": [1, 3]}, {"c": [1, 4], "r": [1, 1]}, {"c": [2, 2], "r": [2, 5]}]

    def collate(rows):
        out = {}
        for side, key in (("chosen_", "c"), ("rejected_", "r")):
            out[side + "tokens"] = np.array([r[key] for r in rows])
            out[side + "attention_mask"] = np.ones((len(rows), 2), bool)
            out[side + "loss_mask"] = np.array([[0, 1]] * len(rows), bool)
        return out

    es = tax.EvalSet("pairs", examples, collate, kind="preference")
    m = tax.pair_metrics(scorer, None, es, batch_size=2)
    np.testing.assert_allclose(m["logps"]["chosen"], [-2, -4, -2])
    np.testing.assert_allclose(m["logps"]["rejected"], [-3, -1, -5])
    assert m["pref_accuracy"] == pytest.approx(2 / 3)
    assert m["pref_margin"] == pytest.approx((1 - 3 + 3) / 3)
    ref = {"chosen": np.array([-2.0, -2.0, -2.0]), "rejected": np.array([-2.0, -2.0, -2.0])}
    m = tax.pair_metrics(scorer, None, es, batch_size=2, ref_logps=ref, beta=0.5)
    # r_w - r_l = beta * ((lw - ref_w) - (ll - ref_l)) = 0.5 * ([0, -2, 0] - [-1, 1, -3])
    assert m["reward_margin"] == pytest.approx(0.5 * (1 - 3 + 3) / 3)
    assert m["reward_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ref_logps"):
        tax.pair_metrics(scorer, None, es, ref_logps={"chosen": np.zeros(2)})


def test_alignment_tax_hand_case():
    before = {"capability/accuracy": 0.5, "alignment/accuracy": 0.2, "capability/nll": 1.0}
    after = {"capability/accuracy": 0.4, "alignment/accuracy": 0.35, "capability/nll": 1.5}
    r = tax.alignment_tax(before, after)
    assert r["tax"] == pytest.approx(0.1)
    assert r["gain"] == pytest.approx(0.15)
    assert r["relative_tax"] == pytest.approx(0.2)
    r = tax.alignment_tax(before, after, capability="capability/nll",
                          capability_higher_is_better=False)
    assert r["tax"] == pytest.approx(0.5)  # the NLL rose: a positive tax
    assert r["gain"] == pytest.approx(0.15)
    r = tax.alignment_tax(before, after, alignment="capability/nll", alignment_higher_is_better=False)
    assert r["gain"] == pytest.approx(-0.5)  # a lower-is-better metric that rose: a negative gain
    assert np.isnan(tax.alignment_tax({**before, "capability/accuracy": 0.0}, after)["relative_tax"])
    with pytest.raises(ValueError, match="alignment/pref_accuracy"):
        tax.alignment_tax(before, after, alignment="alignment/pref_accuracy")


def test_eval_set_errors(tiny):
    _, _, tok = tiny
    with pytest.raises(ValueError, match="synthetic sources"):
        tax.make_eval_set("x", tok, source="synthetic:kto")
    with pytest.raises(ValueError, match="empty"):
        tax.EvalSet("x", [], lambda rows: rows)
    with pytest.raises(ValueError, match="kind"):
        tax.EvalSet("x", [{}], lambda rows: rows, kind="prompt")
