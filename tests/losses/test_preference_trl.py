"""Agreement of the reference-model preference losses with TRL's DPOTrainer (the PyTorch oracle).

TRL 1.x computes every `loss_type` inside `DPOTrainer._compute_loss(model, inputs, ...)`. We call
the unbound method with a `SimpleNamespace` self holding only the attributes it reads, a fake model
whose `log_probs` sum to the sequence log-probs we choose, and precomputed reference log-probs.
TRL returns the batch mean, so per-example losses come from one call per example; the batch call
checks the mean and TRL's logged metrics.
"""

from __future__ import annotations

import collections
import inspect
import math
import re
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

from jaxalign.losses import preference as P  # noqa: E402

DPOTrainer = dpo_trainer.DPOTrainer


def trl_dpo(loss_type, pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
            f_alpha=0.5, tau=0.05, chosen_lengths=None, rejected_lengths=None, dtype=torch.float64):
    """Runs TRL's DPOTrainer._compute_loss on given sequence log-probs; returns (mean loss, metrics)."""
    pc, pr, rc, rr = (torch.as_tensor(np.asarray(x, np.float64), dtype=dtype).reshape(-1) for x in (pc, pr, rc, rr))
    b = pc.shape[0]
    ones = np.ones(b, np.int64)
    lengths = torch.as_tensor(np.concatenate([
        ones if chosen_lengths is None else np.asarray(chosen_lengths, np.int64),
        ones if rejected_lengths is None else np.asarray(rejected_lengths, np.int64),
    ]))
    t = int(lengths.max()) + 1
    pos = torch.arange(t)
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()  # [2B, T]; token 0 is the prompt
    log_probs = torch.zeros(2 * b, t - 1, dtype=dtype)
    log_probs[:, 0] = torch.cat([pc, pr])  # rows sum to the sequence log-probs
    outputs = types.SimpleNamespace(
        log_probs=log_probs, entropy=torch.zeros(2 * b, t - 1), mean_logits=torch.zeros(2 * b, t - 1),
        is_top1=torch.zeros(2 * b, t - 1, dtype=torch.bool),
    )
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=types.SimpleNamespace(discopop_tau=tau),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[0] for k, v in fake._metrics["train"].items()}


def test_oracle_harness_reproduces_hand_value():
    # pi_c - ref_c = 0.5, pi_r - ref_r = -0.5, beta = 0.1: z = 0.1, loss = log(1 + e^-0.1).
    loss, metrics = trl_dpo("sigmoid", [-1.0], [-2.0], [-1.5], [-1.5])
    assert loss == pytest.approx(math.log1p(math.exp(-0.1)), rel=1e-12)
    assert metrics["rewards/chosen"] == pytest.approx(0.05)


# --- inputs -----------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
_B = 6
MODERATE = {  # log-ratios of order 1..20 (sequence log-probs around -10..-60)
    "pc": -_rng.uniform(10, 60, _B), "pr": -_rng.uniform(10, 60, _B),
    "rc": -_rng.uniform(10, 60, _B), "rr": -_rng.uniform(10, 60, _B),
}
# Extreme rows: |log-ratio| up to 1e4, in every sign combination, plus a tie.
_L = 1e4
EXTREME = {
    "pc": np.array([-1.0, -_L, -1.0, -_L, -5.0, -3.0, -2.0, -_L]),
    "rc": np.array([-_L, -1.0, -_L, -1.0, -5.0, -3.0 - 1e3, -2.0, -_L]),
    "pr": np.array([-_L, -1.0, -1.0, -_L, -5.0, -3.0, -_L, -2.0]),
    "rr": np.array([-1.0, -_L, -_L, -1.0, -5.0, -3.0, -2.0, -_L + 100.0]),
}
LENGTHS = {"moderate": (np.array([3, 1, 7, 2, 5, 4]), np.array([1, 6, 2, 9, 3, 4])),
           "extreme": (np.array([1, 5, 2, 8, 3, 1, 4, 2]), np.array([2, 1, 6, 3, 1, 7, 2, 5]))}
INPUTS = {"moderate": MODERATE, "extreme": EXTREME}

# (our function, TRL loss_type, our hyperparameters, TRL hyperparameters, needs lengths)
CASES = {
    "sigmoid": (P.dpo_loss, "sigmoid", {"beta": 0.1}, {"beta": 0.1}, False),
    "sigmoid_b2": (P.dpo_loss, "sigmoid", {"beta": 2.0}, {"beta": 2.0}, False),
    "robust": (P.robust_dpo_loss, "robust", {"beta": 0.1, "label_smoothing": 0.2},
               {"beta": 0.1, "label_smoothing": 0.2}, False),
    "ipo_lengths": (P.ipo_loss, "ipo", {"beta": 0.1}, {"beta": 0.1}, True),
    "hinge": (P.hinge_loss, "hinge", {"beta": 0.1}, {"beta": 0.1}, False),
    "exo_pair": (P.exo_loss, "exo_pair", {"beta": 0.1, "label_smoothing": 1e-3},
                 {"beta": 0.1, "label_smoothing": 1e-3}, False),
    "exo_pair_eps0.2": (P.exo_loss, "exo_pair", {"beta": 0.5, "label_smoothing": 0.2},
                        {"beta": 0.5, "label_smoothing": 0.2}, False),
    "nca_pair": (P.nca_pair_loss, "nca_pair", {"beta": 0.1}, {"beta": 0.1}, False),
    "bco_pair": (P.bco_pair_loss, "bco_pair", {"beta": 0.1}, {"beta": 0.1}, False),
    "sppo_hard": (P.sppo_hard_loss, "sppo_hard", {"beta": 0.1}, {"beta": 0.1}, False),
    "apo_zero": (P.apo_zero_loss, "apo_zero", {"beta": 0.1}, {"beta": 0.1}, False),
    "apo_down": (P.apo_down_loss, "apo_down", {"beta": 0.1}, {"beta": 0.1}, False),
    "discopop": (P.discopop_loss, "discopop", {"beta": 0.1, "tau": 0.05}, {"beta": 0.1, "tau": 0.05}, False),
    "discopop_tau0.5": (P.discopop_loss, "discopop", {"beta": 1.0, "tau": 0.5}, {"beta": 1.0, "tau": 0.5}, False),
    "sigmoid_norm": (P.sigmoid_norm_loss, "sigmoid_norm", {"beta": 0.1}, {"beta": 0.1}, True),
    "aot": (P.aot_loss, "aot", {"beta": 0.1, "label_smoothing": 0.1}, {"beta": 0.1, "label_smoothing": 0.1}, False),
    "aot_unpaired": (P.aot_unpaired_loss, "aot_unpaired", {"beta": 0.1, "label_smoothing": 0.1},
                     {"beta": 0.1, "label_smoothing": 0.1}, False),
}
BATCH_SORTING = {"aot", "aot_unpaired"}  # per-example losses are quantiles: compare the mean only
F_DIV_LOSSES = ["sigmoid", "robust", "ipo_lengths", "hinge", "exo_pair", "discopop", "sigmoid_norm"]
F_DIVS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
          ("alpha_divergence", 2.0), ("alpha_divergence", 1.0)]
# Where TRL itself is not finite (overflow to inf, then inf * 0 or inf - inf) we stay finite by
# design; this is the complete list of (case, divergence) pairs for which that is allowed.
TRL_NONFINITE_OK = {"discopop", "forward_kl"}


def _ours(fn, arrays, hyper, lengths):
    kw = dict(policy_chosen_logps=arrays["pc"], policy_rejected_logps=arrays["pr"],
              ref_chosen_logps=arrays["rc"], ref_rejected_logps=arrays["rr"], **hyper)
    if lengths is not None:
        kw.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    losses, metrics = fn(**{k: (np.asarray(v, np.float32) if isinstance(v, np.ndarray) else v)
                            for k, v in kw.items()})
    return np.asarray(losses, np.float64), {k: np.asarray(v, np.float64) for k, v in metrics.items()}


def _compare(case, data, f_div="reverse_kl", f_alpha=0.5):
    fn, loss_type, ours_hyper, trl_hyper, needs_lengths = CASES[case]
    # both sides see the same fp32-rounded inputs; TRL runs in fp64 (fp32 for alpha: its clamp
    # table has no fp64 entry)
    arrays = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in INPUTS[data].items()}
    lengths = LENGTHS[data] if needs_lengths else None
    ours_hyper = dict(ours_hyper)
    if f_div != "reverse_kl":
        ours_hyper.update(f_divergence_type=f_div, f_alpha_divergence_coef=f_alpha)
    trl_kw = dict(beta=trl_hyper["beta"], label_smoothing=trl_hyper.get("label_smoothing", 0.0),
                  tau=trl_hyper.get("tau", 0.05), f_divergence_type=f_div, f_alpha=f_alpha,
                  dtype=torch.float32 if f_div == "alpha_divergence" else torch.float64)
    losses, metrics = _ours(fn, arrays, ours_hyper, lengths)
    assert losses.shape == (len(arrays["pc"]),)
    # IPO squares the f-score: beyond |score| ~ 1.8e19 (forward KL / alpha with |log-ratio| > ~44)
    # the exact loss exceeds the fp32 range, for TRL as for us (checked row by row below).
    ipo_overflow_ok = case.startswith("ipo") and f_div in ("forward_kl", "alpha_divergence")
    assert ipo_overflow_ok or np.all(np.isfinite(losses)), (case, f_div, losses)

    rtol, atol = (1e-4, 1e-5) if f_div == "alpha_divergence" else (2e-5, 1e-5)
    if case not in BATCH_SORTING:
        for i in range(len(losses)):
            li = None if lengths is None else ([lengths[0][i]], [lengths[1][i]])
            ref, _ = trl_dpo(loss_type, *(arrays[k][i:i + 1] for k in ("pc", "pr", "rc", "rr")),
                             chosen_lengths=None if li is None else li[0],
                             rejected_lengths=None if li is None else li[1], **trl_kw)
            if not math.isfinite(losses[i]):
                assert ipo_overflow_ok and not math.isfinite(ref), (case, f_div, i, losses[i], ref)
                continue
            if not math.isfinite(ref):
                assert case.split("_")[0] in TRL_NONFINITE_OK or f_div in TRL_NONFINITE_OK, (case, f_div, i, ref)
                continue
            if f_div == "forward_kl":
                lr = (arrays["pc"][i] - arrays["rc"][i], arrays["pr"][i] - arrays["rr"][i])
                if min(lr) < -80:  # our exponent clamp (see f_divergence_scores) is active
                    continue
            np.testing.assert_allclose(losses[i], ref, rtol=rtol, atol=atol, err_msg=f"{case} {f_div} row {i}")

    ref_mean, ref_metrics = trl_dpo(loss_type, arrays["pc"], arrays["pr"], arrays["rc"], arrays["rr"],
                                    chosen_lengths=None if lengths is None else lengths[0],
                                    rejected_lengths=None if lengths is None else lengths[1], **trl_kw)
    if math.isfinite(ref_mean) and math.isfinite(losses.mean()) and (f_div != "forward_kl" or data == "moderate"):
        np.testing.assert_allclose(losses.mean(), ref_mean, rtol=rtol, atol=atol, err_msg=f"{case} {f_div} mean")
    elif case in BATCH_SORTING:
        pytest.fail(f"TRL's {case} mean is not finite: {ref_mean}")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics[key].mean(), ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("data", ["moderate", "extreme"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(case, data):
    _compare(case, data)


@pytest.mark.parametrize("data", ["moderate", "extreme"])
@pytest.mark.parametrize("f_div,f_alpha", F_DIVS)
@pytest.mark.parametrize("case", F_DIV_LOSSES)
def test_f_divergence_matches_trl(case, f_div, f_alpha, data):
    _compare(case, data, f_div, f_alpha)


def test_ipo_average_logps_form_matches_trl():
    """Passing average log-probs and no lengths equals TRL's length-normalised IPO."""
    a = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in MODERATE.items()}
    lc, lr = LENGTHS["moderate"]
    losses, _ = P.ipo_loss(policy_chosen_logps=np.float32(a["pc"] / lc), policy_rejected_logps=np.float32(a["pr"] / lr),
                           ref_chosen_logps=np.float32(a["rc"] / lc), ref_rejected_logps=np.float32(a["rr"] / lr),
                           beta=0.1)
    ref, _ = trl_dpo("ipo", a["pc"], a["pr"], a["rc"], a["rr"], beta=0.1, chosen_lengths=lc, rejected_lengths=lr)
    np.testing.assert_allclose(float(np.mean(losses)), ref, rtol=1e-5)


def test_discopop_where_trl_is_nan():
    """TRL's discopop is NaN once exp(-z) overflows; ours follows the -z asymptote."""
    beta = 0.1  # r_c - r_r = -9999
    ref, _ = trl_dpo("discopop", [-_L], [-1.0], [-1.0], [-1.0], beta=beta)
    assert math.isnan(ref)
    losses, _ = P.discopop_loss(policy_chosen_logps=np.array([-_L], np.float32),
                                policy_rejected_logps=np.array([-1.0], np.float32),
                                ref_chosen_logps=np.array([-1.0], np.float32),
                                ref_rejected_logps=np.array([-1.0], np.float32), beta=beta)
    # softplus(-z) * sigmoid(-z / tau) + ~0 with z = beta * (-9999) = -999.9
    np.testing.assert_allclose(float(losses[0]), 999.9, rtol=1e-6)


def test_registry_covers_trl_loss_types():
    """Every pairwise TRL loss_type (all but the SFT term) is registered under TRL's name."""
    src = inspect.getsource(DPOTrainer._compute_loss)
    trl_types = set(re.findall(r'loss_type == "(\w+)"', src)) - {"sft"}
    assert len(trl_types) >= 14
    assert trl_types <= set(P.LOSSES), trl_types - set(P.LOSSES)
