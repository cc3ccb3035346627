"""Objectives with a loss index (LM head on the loss positions only) equal the all-positions path:
same loss, metrics and gradients, for preference (reference model, LoRA base reference, RPO term,
vocabulary chunks) and SFT batches from the collators; an index inconsistent with loss_mask gives
NaN instead of a silently smaller loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import data as jdata, models
from jaxalign.losses import dpo_loss
from jaxalign.train.objectives import ObjectiveSpec, make_objective, token_logps_of

CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def setup():
    tok = jdata.build_char_tokenizer()
    model = models.build_model(CFG)
    params = models.init_params(model, jax.random.PRNGKey(0))
    pref = jdata.tokenize_dataset(jdata.make_preference_dataset(6, seed=0), tok, kind="preference")
    batch = jdata.make_collate_fn("preference", pad_id=tok.pad_token_id, pad_to_multiple_of=4)(pref.examples)
    return tok, model, params, batch


def _without_index(batch):
    return {k: v for k, v in batch.items() if not k.endswith("loss_index")}


def _loss_and_grads(objective, trainable, frozen, batch):
    (loss, metrics), g = jax.value_and_grad(
        lambda t: objective(t, frozen, batch, jax.random.PRNGKey(0), True), has_aux=True)(trainable)
    return loss, metrics, g


def _assert_same(a, b, atol=1e-5):
    la, ma, ga = a
    lb, mb, gb = b
    np.testing.assert_allclose(float(la), float(lb), atol=atol, rtol=1e-5)
    assert set(ma) == set(mb)
    for k in ma:
        np.testing.assert_allclose(np.asarray(ma[k]), np.asarray(mb[k]), atol=atol, rtol=1e-4, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_collated_preference_batch_has_a_shorter_index(setup):
    _, _, _, batch = setup
    t = batch["chosen_tokens"].shape[1]
    k = batch["chosen_loss_index"].shape[1]
    assert batch["rejected_loss_index"].shape[1] == k and k < t - 1


@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_dpo_with_reference_model_and_rpo(setup, vocab_chunk):
    _, model, params, batch = setup
    # a policy different from the reference, so the DPO margin and its gradient are not trivial
    policy = jax.tree.map(lambda x: x * 1.1, params)
    spec = ObjectiveSpec(kind="preference", loss_fn=dpo_loss, loss_kwargs=(("beta", 0.1),),
                         reference="model", rpo_alpha=0.5, vocab_chunk=vocab_chunk)
    obj = make_objective(model, spec)
    frozen = {"ref_params": params}
    compact = _loss_and_grads(obj, {"params": policy}, frozen, batch)
    full = _loss_and_grads(obj, {"params": policy}, frozen, _without_index(batch))
    _assert_same(compact, full)
    assert float(compact[0]) > 0 and np.isfinite(float(compact[0]))


def test_dpo_lora_base_reference_and_average(setup):
    from jaxalign.peft import LoraSpec, init_lora

    _, model, params, batch = setup
    spec_l = LoraSpec(rank=4, alpha=8, targets=r"(proj)$")
    lmodel = model.clone(lora=spec_l)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(params, spec_l, jax.random.PRNGKey(1)))
    spec = ObjectiveSpec(kind="preference", loss_fn=dpo_loss, loss_kwargs=(("beta", 0.1),),
                         reference="base", average_logps=True)
    obj = make_objective(lmodel, spec)
    compact = _loss_and_grads(obj, {"lora": lora}, {"params": params}, batch)
    full = _loss_and_grads(obj, {"lora": lora}, {"params": params}, _without_index(batch))
    _assert_same(compact, full)


def test_sft_batch(setup):
    tok, model, params, _ = setup
    ds = jdata.tokenize_dataset(jdata.make_sft_dataset(5, seed=1), tok, kind="sft")
    batch = jdata.make_collate_fn("sft", pad_id=tok.pad_token_id, pad_to_multiple_of=4)(ds.examples)
    assert "loss_index" in batch
    obj = make_objective(model, ObjectiveSpec(kind="sft"))
    _assert_same(_loss_and_grads(obj, {"params": params}, {}, batch),
                 _loss_and_grads(obj, {"params": params}, {}, _without_index(batch)))


def test_index_missing_a_loss_token_gives_nan(setup):
    _, model, params, batch = setup
    tokens, am, lm = (jnp.asarray(batch[f"chosen_{k}"]) for k in ("tokens", "attention_mask", "loss_mask"))
    li = np.array(batch["chosen_loss_index"])
    ok = np.asarray(token_logps_of(model, {"params": params}, tokens, am, lm, loss_index=li))
    assert np.isfinite(ok).all()
    # the index sums to the all-positions log-probs, row by row
    full = np.asarray(token_logps_of(model, {"params": params}, tokens, am, lm))
    np.testing.assert_allclose(ok.sum(1), full.sum(1), rtol=1e-5)
    li[0, 0] = 0  # row 0 loses its first loss token
    bad = np.asarray(token_logps_of(model, {"params": params}, tokens, am, lm, loss_index=li))
    assert np.isnan(bad[0]).all() and np.isfinite(bad[1:]).all()


def _packed(batch):
    from jaxalign.data.prefix_sharing import share_prefix

    return share_prefix(batch, pad_to_multiple_of=4)


@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_prefix_shared_batch_equals_unpacked(setup, vocab_chunk):
    """DPO with a reference model and the RPO term on the packed batch (each prompt once): the
    same loss, metrics and gradients as the unpacked batch."""
    _, model, params, batch = setup
    packed = _packed(batch)
    assert packed["packed_tokens"].size < 2 * batch["chosen_tokens"].size
    policy = jax.tree.map(lambda x: x * 1.1, params)
    spec = ObjectiveSpec(kind="preference", loss_fn=dpo_loss, loss_kwargs=(("beta", 0.1),),
                         reference="model", rpo_alpha=0.5, vocab_chunk=vocab_chunk)
    obj = make_objective(model, spec)
    frozen = {"ref_params": params}
    _assert_same(_loss_and_grads(obj, {"params": policy}, frozen, packed),
                 _loss_and_grads(obj, {"params": policy}, frozen, batch))


def test_prefix_shared_lora_base_reference_average_and_precomputed(setup):
    from jaxalign.peft import LoraSpec, init_lora

    _, model, params, batch = setup
    spec_l = LoraSpec(rank=4, alpha=8, targets=r"(proj)$")
    lmodel = model.clone(lora=spec_l)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(params, spec_l, jax.random.PRNGKey(1)))
    for reference in ("base", "precomputed"):
        b = dict(batch)
        if reference == "precomputed":  # reference log-probs of the unpacked batch carry over
            b["ref_chosen_logps"] = np.linspace(-30, -20, len(batch["chosen_tokens"])).astype(np.float32)
            b["ref_rejected_logps"] = b["ref_chosen_logps"] - 1.5
        spec = ObjectiveSpec(kind="preference", loss_fn=dpo_loss, loss_kwargs=(("beta", 0.1),),
                             reference=reference, average_logps=True)
        obj = make_objective(lmodel, spec)
        _assert_same(_loss_and_grads(obj, {"lora": lora}, {"params": params}, _packed(b)),
                     _loss_and_grads(obj, {"lora": lora}, {"params": params}, b))
