"""GRPO maths against values computed by hand (arithmetic in the comments)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo import aggregate, group_advantages, grpo_loss, kl_k3, kl_penalty, policy_loss  # noqa: E402

LN2 = math.log(2)


def close(x, expected, tol=1e-5):
    torch.testing.assert_close(x, torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


# --- advantages -------------------------------------------------------------------------------------------

def test_advantages_sample_std():
    # group 1 = [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3,
    #   std = 0.577350 -> A = (1.154700, -0.577350, -0.577350)
    # group 2 = [2, 4, 6]: mean 4, deviations (-2, 0, 2), sample var = 8 / 2 = 4, std = 2 -> A = (-1, 0, 1)
    #   (population std sqrt(8/3) = 1.633 would give -1.2247: the trap for the wrong std)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 2, 4, 6]), group_size=3)
    close(adv, [1.154700, -0.577350, -0.577350, -1.0, 0.0, 1.0], tol=1e-5)


def test_advantages_no_std():
    # Dr. GRPO: r - mean only -> (2/3, -1/3, -1/3) and (-2, 0, 2)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 2, 4, 6]), group_size=3, std_norm=False)
    close(adv, [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])


def test_advantages_group_order_is_contiguous():
    # [1, 0 | 0, 0] as groups of 2: the first group gets (+-0.5)/(sample std 0.7071) = +-0.7071, the second 0.
    # Interleaved grouping ([1, 0] at positions 0, 2) would give a different answer.
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0]), group_size=2)
    close(adv, [0.707106, -0.707106, 0.0, 0.0], tol=1e-5)


@pytest.mark.parametrize("std_norm", [True, False])
def test_all_equal_rewards_give_exact_zero(std_norm):
    # in float32 mean(0.9, 0.9, 0.9) - 0.9 = 6e-8 (one ulp) and std is ~1e-7, so a plain (r - mean) / (std + 1e-6)
    # gives 0.056 instead of 0 (0.45 likewise: 0.029). Exactly 0 is required, and no NaN.
    adv = group_advantages(torch.tensor([0.9, 0.9, 0.9, 0.45, 0.45, 0.45, 1.0, 0.0, 0.0]), 3, std_norm=std_norm)
    assert torch.isfinite(adv).all()
    assert (adv[:6] == 0).all()
    assert (adv[6:] != 0).all()


def test_advantages_int_rewards_and_errors():
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="no learning signal"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


# --- k3 ---------------------------------------------------------------------------------------------------

def test_k3_values_and_gradient():
    # d = ref - logp; k3 = e^d - d - 1
    # d = 0 -> 0;  d = ln2 -> 2 - 0.693147 - 1 = 0.306853;  d = -ln2 -> 0.5 + 0.693147 - 1 = 0.193147
    # d k3 / d logp = -e^d + 1 = 1 - exp(ref - logp) -> 0, -1, 0.5
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[0.0, LN2, -LN2]])
    k3 = kl_k3(logp, ref)
    close(k3.detach(), [[0.0, 0.306853, 0.193147]])
    k3.sum().backward()
    close(logp.grad, [[0.0, -1.0, 0.5]])
    close(logp.grad, 1 - torch.exp(ref - logp.detach()))


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    assert (kl_k3(torch.randn(4, 7, generator=g) * 3, torch.randn(4, 7, generator=g) * 3) >= 0).all()


# --- which KL each estimator's gradient follows -----------------------------------------------------------

CATEGORICALS = [  # (logits of pi, ref): a 4-way and a 3-way categorical, pi and ref far apart
    (torch.tensor([0.5, -0.3, 1.2, 0.0], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)),
    (torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)),
]


def expected_penalty_gradient(estimator, logits, ref):
    """d/d logits of E_{x ~ pi_old}[penalty(x)] at pi_old = pi = softmax(logits), computed exactly: every outcome
    weighted by its probability (a constant: the samples do not move), the penalty differentiated through log pi(x)
    as the loss is."""
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)  # (K,): one "token" per outcome
    penalty = kl_penalty(logp[None], logp.detach()[None], ref.log()[None], estimator)[0]  # (K,)
    (logp.detach().exp() * penalty).sum().backward()
    return logits.grad


def exact_kl_gradients(logits, ref):
    """(grad KL(ref || pi), grad KL(pi || ref)) in the logits, by hand and checked against autograd of the sums:
    KL(ref || pi) = sum ref log(ref / pi)  -> pi - ref
    KL(pi || ref) = sum pi log(pi / ref)   -> pi * (log(pi / ref) - KL(pi || ref))"""
    pi = torch.softmax(logits, -1)
    reverse = pi - ref
    forward = pi * ((pi / ref).log() - (pi * (pi / ref).log()).sum())
    for by_hand, kl in ((reverse, lambda p: (ref * (ref / p).log()).sum()),
                        (forward, lambda p: (p * (p / ref).log()).sum())):
        x = logits.clone().requires_grad_()
        kl(torch.softmax(x, -1)).backward()
        torch.testing.assert_close(x.grad, by_hand)
    return reverse, forward


@pytest.mark.parametrize("logits, ref", CATEGORICALS)
def test_k3_gradient_is_that_of_kl_ref_pi_and_k3_ratio_that_of_kl_pi_ref(logits, ref):
    reverse, forward = exact_kl_gradients(logits, ref)
    # the two targets differ, and neither is near 0: a swapped pair or a flipped sign cannot pass
    assert (reverse - forward).abs().max() > 0.05 and reverse.abs().max() > 0.1 and forward.abs().max() > 0.1
    torch.testing.assert_close(expected_penalty_gradient("k3", logits, ref), reverse)
    torch.testing.assert_close(expected_penalty_gradient("k3-ratio", logits, ref), forward)


def test_kl_estimators_in_grpo_loss_by_hand():
    # one token, ratio 1, d = ref - logp = ln2, beta 0.1: both estimators have the value k3 = 0.306853;
    # k3 grad:       beta * (1 - e^d)            = 0.1 * (1 - 2) = -0.1
    # k3-ratio grad: beta * (k3 + 1 - e^d) = beta * (-d) = -0.1 * ln2 = -0.0693147
    for estimator, grad in (("k3", -0.1), ("k3-ratio", -0.1 * LN2)):
        logp = torch.tensor([[-2.0]], requires_grad=True)
        loss, stats = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1), logp.detach() + LN2,
                                beta=0.1, kl_estimator=estimator)
        loss.backward()
        close(logp.grad, [[grad]])
        assert stats["kl"] == pytest.approx(0.306853, abs=1e-6)
    # off the old policy (ratio 1.5) k3-ratio weighs the value too: 1.5 * 0.306853
    logp, ref = torch.tensor([[-2.0]]), torch.tensor([[-2.0 + LN2]])
    close(kl_penalty(logp, logp - math.log(1.5), ref, "k3-ratio"), [[1.5 * 0.306853]])
    close(kl_penalty(logp, logp - math.log(1.5), ref, "k3"), [[0.306853]])
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(logp, logp, ref, "k2")


# --- clipped surrogate ------------------------------------------------------------------------------------

def _one_token(ratio, a):
    """A single token with the given ratio and advantage; returns (loss, clipped, d loss / d logp)."""
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, clipped = policy_loss(logp, old, torch.tensor([a]))
    loss.sum().backward()
    return loss.item(), clipped.item(), logp.grad.item()


def test_clip_high_positive_advantage():
    # ratio 1.5 > 1 + 0.28, A = +1: -min(1.5, 1.28) = -1.28, clipped, no gradient
    loss, clipped, grad = _one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.28) and clipped and grad == 0


def test_clip_low_negative_advantage():
    # ratio 0.5 < 1 - 0.2, A = -1: -min(-0.5, -0.8) = 0.8, clipped, no gradient
    loss, clipped, grad = _one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8) and clipped and grad == 0


def test_clip_inactive_on_the_other_side():
    # ratio 1.5, A = -1: -min(-1.5, -1.28) = 1.5, not clipped; d(-ratio*A)/dlogp = -A*ratio = 1.5
    loss, clipped, grad = _one_token(1.5, -1.0)
    assert loss == pytest.approx(1.5) and not clipped and grad == pytest.approx(1.5)
    # ratio 0.5, A = +1: -min(0.5, 0.8) = -0.5, not clipped; gradient -A*ratio = -0.5
    loss, clipped, grad = _one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5) and not clipped and grad == pytest.approx(-0.5)


def test_ratio_one_gradient_is_minus_advantage_over_count():
    # on-policy (ratio 1): loss_t = -A_row, token-mean over 3 valid tokens -> d loss / d logp_t = -A_row / 3
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    loss.backward()
    close(loss.detach(), (-2 - 2 + 1) / 3)
    close(logp.grad, [[-2 / 3, -2 / 3], [1 / 3, 0.0]])
    assert stats == {"clip_frac": 0.0, "kl": 0.0, "ratio_mean": 1.0}


def test_bf16_inputs_compute_in_float32():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    loss, _ = grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), ref_logp=logp - 0.5, beta=0.1)
    assert loss.dtype == torch.float32


# --- aggregation ------------------------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_aggregations_by_hand():
    close(aggregate(PER_TOKEN, MASK), (1 + 2 + 4) / 3)                          # token-mean: 7/3
    close(aggregate(PER_TOKEN, MASK, "seq-mean"), ((1 + 2) / 2 + 4 / 1) / 2)   # (1.5 + 4) / 2 = 2.75
    close(aggregate(PER_TOKEN, MASK, "constant", max_new=3), 7 / (2 * 3))      # 7/6
    # masked positions may hold anything, inf included
    close(aggregate(PER_TOKEN.masked_fill(~MASK, float("inf")), MASK), 7 / 3)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError, match="max_new"):
        aggregate(PER_TOKEN, MASK, "constant")
    with pytest.raises(ValueError, match="shape"):
        aggregate(PER_TOKEN, MASK[:, :2])


@pytest.mark.parametrize("how", ["token-mean", "seq-mean", "constant"])
def test_micro_batches_sum_to_full_batch(how):
    g = torch.Generator().manual_seed(1)
    n, t = 5, 6
    base = torch.randn(n, t, generator=g)
    old = base + 0.3 * torch.randn(n, t, generator=g)  # ratios off 1, some clipped
    ref = base + 0.3 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([6, 1, 3, 4, 2])  # uneven: a plain mean of micro-batch means would be wrong
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (n, t)
    kw = dict(beta=0.05, how=how, max_new=t)

    full_logp = base.clone().requires_grad_()
    full, _ = grpo_loss(full_logp, old, adv, mask, ref, **kw)
    full.backward()

    split_logp = base.clone().requires_grad_()
    totals = dict(n_rows=n, n_tokens=mask.sum())
    parts = [grpo_loss(split_logp[s], old[s], adv[s], mask[s], ref[s], **kw, **totals)[0]
             for s in (slice(0, 2), slice(2, 5))]
    sum(parts).backward()
    close(sum(parts).detach(), full.detach(), tol=1e-6)
    close(split_logp.grad, full_logp.grad, tol=1e-6)
    # without the totals each part normalises by its own counts, and the sum is not the full loss
    naive = sum(grpo_loss(base[s], old[s], adv[s], mask[s], ref[s], **kw)[0] for s in (slice(0, 2), slice(2, 5)))
    assert not torch.allclose(naive, full.detach())


# --- the whole objective ----------------------------------------------------------------------------------

def test_grpo_loss_gradient_by_hand():
    # ratio 1 (old = logp), beta = 0.1, A = (1, -0.5), mask [[1, 1], [1, 0]], d = ref - logp per token:
    #   d = [[0, ln2], [-ln2, ln3 (masked)]] -> k3 = [[0, 0.306853], [0.193147, -]], valid sum = 0.5 exactly
    # loss = [(-1 + 0) + (-1 + 0.1*0.306853) + (0.5 + 0.1*0.193147)] / 3 = (-1.5 + 0.05) / 3 = -0.483333
    # grad_t = (-A + beta * (1 - e^d)) / 3:
    #   (-1 + 0)/3 = -1/3;  (-1 + 0.1*(1 - 2))/3 = -1.1/3;  (0.5 + 0.1*(1 - 0.5))/3 = 0.55/3;  masked 0
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[0.0, LN2], [-LN2, math.log(3)]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -0.5]), mask, ref_logp=ref, beta=0.1)
    loss.backward()
    close(loss.detach(), -1.45 / 3)
    close(logp.grad, [[-1 / 3, -1.1 / 3], [0.55 / 3, 0.0]])
    assert stats["kl"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert stats["clip_frac"] == 0 and stats["ratio_mean"] == pytest.approx(1.0)


def test_clip_frac_counts_valid_tokens_only():
    # ratios [[1.5, 1.5], [1.5, 1.5]] with A = +1: every token clipped, but only 3 are valid -> 3/3 = 1
    old = torch.zeros(2, 2)
    logp = old + math.log(1.5)
    _, stats = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), torch.tensor([[1, 1], [1, 0]]))
    assert stats["clip_frac"] == pytest.approx(1.0) and stats["ratio_mean"] == pytest.approx(1.5)
    # A = (+1, -1): row 0 clipped (2 tokens), row 1 not (ratio above 1 + eps with negative A) -> 2/3
    _, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    assert stats["clip_frac"] == pytest.approx(2 / 3)


def test_all_equal_rewards_give_zero_gradient():
    # group 1 all equal (0.9: the value whose float32 mean leaves a residue), group 2 mixed; off-policy ratios
    g = torch.Generator().manual_seed(2)
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 1.0])
    for std_norm in (True, False):
        adv = group_advantages(rewards, 3, std_norm=std_norm)
        logp = torch.randn(6, 4, generator=g).requires_grad_()
        old = logp.detach() + 0.1 * torch.randn(6, 4, generator=g)
        loss, _ = grpo_loss(logp, old, adv, torch.ones(6, 4))
        loss.backward()
        assert torch.isfinite(logp.grad).all()
        assert (logp.grad[:3] == 0).all()
        assert (logp.grad[3:] != 0).any()


def test_grpo_loss_errors():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="adv"):
        grpo_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
