"""Losses against values worked out by hand, and against TRL's own code where it is reachable without a model."""

import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from selfimprove.train.loss_names import INPUTS, Inputs, needs_reference, needs_rejected
from selfimprove.train.losses import (
    LOSSES,
    LossOutput,
    SequenceLogps,
    TokenLogps,
    dpo,
    group_advantages,
    grpo,
    ipo,
    log1mexp,
    orpo,
    reward_metrics,
    rpo,
    sft,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def assert_near(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-5)


# The running pair: pc=-10, pr=-12, rc=-11, rr=-11, chosen 5 tokens, rejected 2 tokens.
PAIR = SequenceLogps(
    policy_chosen=t(-10.0),
    policy_rejected=t(-12.0),
    ref_chosen=t(-11.0),
    ref_rejected=t(-11.0),
    chosen_lengths=t(5),
    rejected_lengths=t(2),
)


# --- sft ---------------------------------------------------------------------------------------


def test_sft_is_nll_per_token():
    """pc=-10 over 5 tokens -> 10/5 = 2.0; pc=-3 over 4 tokens -> 3/4 = 0.75.

    Rewards are the summed policy log-probs: chosen (-10, -3); no rejected given -> (0, 0).
    """
    out = sft(SequenceLogps(policy_chosen=t(-10.0, -3.0), chosen_lengths=t(5, 4)))
    assert_near(out.losses, [2.0, 0.75])
    assert_near(out.chosen_rewards, [-10.0, -3.0])
    assert_near(out.rejected_rewards, [0.0, 0.0])


def test_sft_batch_tokens_is_trl_token_mean():
    """Token mean over the batch: (10 + 3) / (5 + 4) = 13/9 = 1.444444.

    Per-example shares: 10·2/9 = 2.222222 and 3·2/9 = 0.666667, whose mean is 13/9.
    """
    out = sft(SequenceLogps(policy_chosen=t(-10.0, -3.0), chosen_lengths=t(5, 4)), nll_norm="batch_tokens")
    assert_near(out.losses, [20 / 9, 6 / 9])
    assert_near(out.losses.mean(), 13 / 9)


# --- dpo ---------------------------------------------------------------------------------------


def test_dpo_hand_values():
    """z = β((pc − rc) − (pr − rr)) = 0.1·((−10 + 11) − (−12 + 11)) = 0.1·2 = 0.2.

    loss = −log σ(0.2) = log(1 + e^−0.2) = 0.598139.
    Second pair all −5: z = 0, loss = log 2 = 0.693147.
    Rewards: 0.1·(−10 + 11) = 0.1 and 0.1·(−12 + 11) = −0.1; the second pair 0 and 0.
    """
    logps = SequenceLogps(t(-10.0, -5.0), t(-12.0, -5.0), t(-11.0, -5.0), t(-11.0, -5.0))
    out = dpo(logps, beta=0.1)
    assert_near(out.losses, [0.598139, 0.693147])
    assert_near(out.chosen_rewards, [0.1, 0.0])
    assert_near(out.rejected_rewards, [-0.1, 0.0])


def test_dpo_beta_scales_logits():
    """β = 0.5: z = 0.5·2 = 1.0, loss = log(1 + e^−1) = 0.313262; rewards 0.5 and −0.5."""
    out = dpo(PAIR, beta=0.5)
    assert_near(out.losses, [0.313262])
    assert_near(out.chosen_rewards, [0.5])
    assert_near(out.rejected_rewards, [-0.5])


def test_dpo_label_smoothing_is_conservative_dpo():
    """ε = 0.1, z = 0.2: (1 − ε)·(−log σ(z)) + ε·(−log σ(−z)).

    −log σ(−z) = −log σ(z) + z, so the loss is −log σ(z) + ε·z = 0.598139 + 0.1·0.2 = 0.618139.
    """
    assert_near(dpo(PAIR, label_smoothing=0.1).losses, [0.618139])


def test_dpo_label_smoothing_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(PAIR, label_smoothing=0.5)


# --- rpo ---------------------------------------------------------------------------------------


def test_rpo_is_dpo_plus_length_normalised_nll():
    """DPO part 0.598139 (z = 0.2, as above); NLL part α·10/5 = 2.0 -> 2.598139.

    α = 0.5: 0.598139 + 0.5·2.0 = 1.598139. Rewards are DPO's: 0.1 and −0.1.
    """
    assert_near(rpo(PAIR).losses, [2.598139])
    out = rpo(PAIR, alpha=0.5)
    assert_near(out.losses, [1.598139])
    assert_near(out.chosen_rewards, [0.1])
    assert_near(out.rejected_rewards, [-0.1])


def test_rpo_length_normalisation():
    """Same pair, same summed chosen log-prob −10, winners of 5 and 20 tokens.

    NLL terms 10/5 = 2.0 and 10/20 = 0.5, so losses 0.598139 + 2.0 = 2.598139 and 0.598139 + 0.5 = 1.098139.
    TRL's token mean over the batch instead: NLL = (10 + 10)/(5 + 20) = 0.8 for the batch, each example's share
    10·2/25 = 0.8, so losses 1.398139 each: same mean as the paper's only when the lengths agree.
    """
    logps = SequenceLogps(t(-10.0, -10.0), t(-12.0, -12.0), t(-11.0, -11.0), t(-11.0, -11.0), chosen_lengths=t(5, 20))
    assert_near(rpo(logps).losses, [2.598139, 1.098139])
    assert_near(rpo(logps, nll_norm="batch_tokens").losses, [1.398139, 1.398139])


def test_rpo_nll_norm_checked():
    with pytest.raises(ValueError, match="nll_norm"):
        rpo(PAIR, nll_norm="tokens")


# --- orpo --------------------------------------------------------------------------------------


def test_log1mexp_hand_values():
    """log(1 − e^x): x = −ln 2 -> log 0.5 = −0.693147; x = −ln 4 -> log 0.75 = −0.287682;
    x = −1e-3 -> log(1 − e^−0.001) = log(0.00099950) = −6.908255; x = −50 -> −e^−50 ≈ 0;
    x = −1e-8 is clamped to −1e-7 -> log(1 − e^−1e-7) = −16.118096, where float32's
    log1p(−exp(−1e-8)) is log1p(−1) = −inf.
    """
    x = t(-math.log(2), -math.log(4), -1e-3, -50.0, -1e-8)
    assert_near(log1mexp(x), [-0.693147, -0.287682, -6.908255, 0.0, -16.118096])
    assert torch.isinf(torch.log1p(-torch.exp(t(-1e-8)))).all()


def test_orpo_hand_values():
    """Chosen −4·ln 2 over 4 tokens: mean m_c = −ln 2, p = 0.5, odds 1, log odds 0.
    Rejected −2·ln 4 over 2 tokens: m_r = −ln 4, p = 0.25, log odds = log(0.25/0.75) = −ln 3.
    Log odds ratio = ln 3; −log σ(ln 3) = log(1 + 1/3) = log(4/3) = 0.287682.
    NLL = −m_c = ln 2 = 0.693147, so loss = 0.693147 + 0.1·0.287682 = 0.721915.
    Rewards λ·m: 0.1·(−ln 2) = −0.0693147 and 0.1·(−ln 4) = −0.138629.
    """
    logps = SequenceLogps(
        policy_chosen=t(-4 * math.log(2)),
        policy_rejected=t(-2 * math.log(4)),
        chosen_lengths=t(4),
        rejected_lengths=t(2),
    )
    out = orpo(logps, lam=0.1)
    assert_near(out.losses, [0.721915])
    assert_near(out.chosen_rewards, [-0.0693147])
    assert_near(out.rejected_rewards, [-0.138629])
    assert_near(orpo(logps, lam=1.0).losses, [0.693147 + 0.287682])


def test_orpo_stays_finite_at_the_extremes():
    """Chosen mean −1e-8 (1 token), rejected mean −50 (−100 over 2 tokens):
    log odds_c = −1e-8 − log1mexp(−1e-7) = 16.118096; log odds_r = −50 − log(1 − e^−50) = −50;
    ratio 66.118 -> −log σ ≈ e^−66 ≈ 0, so loss ≈ NLL = 1e-8.
    Swapped (chosen −50 over 1 token, rejected −2e-8 over 2 tokens, mean −1e-8): ratio −66.118096,
    −log σ(−66.118096) = 66.118096, loss = 50 + 0.1·66.118096 = 56.611810. Gradients stay finite.
    """
    pc = t(-1e-8, -50.0).requires_grad_()
    pr = t(-100.0, -2e-8).requires_grad_()
    out = orpo(SequenceLogps(pc, pr, chosen_lengths=t(1, 1), rejected_lengths=t(2, 2)))
    assert_near(out.losses, [1e-8, 56.611810])
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# --- ipo ---------------------------------------------------------------------------------------


def test_ipo_hand_values():
    """Length-averaged (TRL): δ = (−10 + 11)/5 − (−12 + 11)/2 = 0.2 + 0.5 = 0.7; 1/(2β) = 5;
    loss = (0.7 − 5)² = 4.3² = 18.49. Summed: δ = 1 + 1 = 2, loss = (2 − 5)² = 9.
    Rewards β·(policy − ref) on the sums: 0.1 and −0.1.
    """
    out = ipo(PAIR, beta=0.1)
    assert_near(out.losses, [18.49])
    assert_near(out.chosen_rewards, [0.1])
    assert_near(out.rejected_rewards, [-0.1])
    assert_near(ipo(PAIR, beta=0.1, length_normalize=False).losses, [9.0])
    assert_near(ipo(PAIR, beta=0.5, length_normalize=False).losses, [1.0])  # (2 − 1)²


# --- grpo --------------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    """Group [1, 0, 0, 0]: mean 0.25, deviations (0.75, −0.25, −0.25, −0.25); Bessel variance
    (0.5625 + 3·0.0625)/3 = 0.25, std 0.5; over 0.5 + 1e-4: 0.75/0.5001 = 1.499700, −0.25/0.5001 = −0.499900.
    Group [0, 1, 0, 1]: mean 0.5, deviations ±0.5, variance 4·0.25/3 = 1/3, std 0.577350; 0.5/0.577450 = 0.865875.
    Group [1, 1, 1, 1]: all equal, zeros. Unscaled: the deviations themselves.
    """
    rewards = t(1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1).view(3, 4)
    a = 0.865875
    assert_near(group_advantages(rewards), [[1.499700, -0.499900, -0.499900, -0.499900], [-a, a, -a, a], [0, 0, 0, 0]])
    assert_near(group_advantages(rewards, scale=False),
                [[0.75, -0.25, -0.25, -0.25], [-0.5, 0.5, -0.5, 0.5], [0, 0, 0, 0]])


def test_group_advantages_zero_variance_and_single_samples_are_zero():
    """Equal rewards, whatever their value (and bools), and groups of one sample: exactly 0, never NaN."""
    assert group_advantages(t(0.7, 0.7, 0.7).view(1, 3)).tolist() == [[0.0, 0.0, 0.0]]
    assert group_advantages(torch.tensor([[True, True], [False, False]])).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert group_advantages(t(3.0, -2.0).view(2, 1)).tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match=r"\[groups, samples\]"):
        group_advantages(t(1.0, 0.0))


# Two responses: 2 tokens (logp −1, −2) then a pad holding NaN; 3 tokens (−0.5, −1, −1.5). Advantages 1 and −0.5.
GRPO_POLICY = [[-1.0, -2.0, math.nan], [-0.5, -1.0, -1.5]]
GRPO_MASK = [[1, 1, 0], [1, 1, 1]]


def _grpo_batch(**fields):
    policy = t(*sum(GRPO_POLICY, [])).view(2, 3).requires_grad_()
    return TokenLogps(policy, torch.tensor(GRPO_MASK), t(1.0, -0.5), **fields), policy


def test_grpo_on_policy_is_minus_the_advantage_per_token():
    """old = logp (detached): ρ = 1 within the clip, every token's loss is −A.
    sequence: each sequence's token mean −A_i -> (−1, 0.5), mean −0.25.
    batch_tokens: one mean over 5 tokens, −(2·1 + 3·(−0.5))/5 = −0.1; shares −2·2/5 = −0.8 and 1.5·2/5 = 0.6.
    The NaN pad reaches neither. Rewards: the advantages, and zeros.
    """
    logps, _ = _grpo_batch()
    out = grpo(logps)
    assert_near(out.losses, [-1.0, 0.5])
    assert_near(out.chosen_rewards, [1.0, -0.5])
    assert_near(out.rejected_rewards, [0.0, 0.0])
    batch = grpo(logps, token_norm="batch_tokens").losses
    assert_near(batch, [-0.8, 0.6])
    assert_near(batch.mean(), -0.1)


def test_grpo_gradient_is_the_advantage_per_token_over_length():
    """d(mean loss)/d logp_ij = −A_i / (|y_i| · B) on policy: −1/(2·2) = −0.25 on sequence 1's tokens,
    0.5/(3·2) = 0.083333 on sequence 2's; 0 on the pad (its NaN does not leak).
    batch_tokens: −A_i / (all tokens) = −1/5 = −0.2 and 0.5/5 = 0.1.
    """
    logps, policy = _grpo_batch()
    grpo(logps).losses.mean().backward()
    assert_near(policy.grad, [[-0.25, -0.25, 0.0], [1 / 12, 1 / 12, 1 / 12]])
    logps, policy = _grpo_batch()
    grpo(logps, token_norm="batch_tokens").losses.mean().backward()
    assert_near(policy.grad, [[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]])


def test_grpo_k3_kl_to_the_reference():
    """β = 0.1; ref − logp = d per token: sequence 1 (ln 2, 0), sequence 2 (0, −ln 2, 0).
    k3 = e^d − d − 1: ln 2 -> 2 − 0.693147 − 1 = 0.306853; 0 -> 0; −ln 2 -> 0.5 + 0.693147 − 1 = 0.193147.
    Losses: −1 + 0.1·0.306853/2 = −0.984657; 0.5 + 0.1·0.193147/3 = 0.506438.
    Gradient of the mean, (−A_i + β·(1 − e^d)) / (|y_i|·B): sequence 1 (−1 − 0.1)/4 = −0.275 and −1/4 = −0.25;
    sequence 2 0.5/6 = 0.083333, (0.5 + 0.1·0.5)/6 = 0.091667, 0.083333.
    """
    d = t(math.log(2), 0.0, 0.0, 0.0, -math.log(2), 0.0).view(2, 3)
    ref = torch.tensor(GRPO_POLICY).nan_to_num(-7.0) + d
    ref[0, 2] = math.inf  # padding, as the policy's
    logps, policy = _grpo_batch(ref=ref)
    out = grpo(logps, beta=0.1)
    assert_near(out.losses, [-0.984657, 0.506438])
    out.losses.mean().backward()
    assert_near(policy.grad, [[-0.275, -0.25, 0.0], [0.5 / 6, 0.55 / 6, 0.5 / 6]])
    with pytest.raises(ValueError, match="beta > 0 needs TokenLogps.ref"):
        grpo(_grpo_batch()[0], beta=0.1)


def test_grpo_clips_the_ratio_as_ppo():
    """Length-1 responses, logp −1 each, old = logp − ln 1.5 or logp + ln 2: ρ = 1.5 or 0.5; ε = 0.2.
    ρ = 1.5, A = 1: min(1.5, 1.2) = 1.2 -> loss −1.2, clipped: no gradient.
    ρ = 1.5, A = −1: min(−1.5, −1.2) = −1.5 -> loss 1.5, gradient −A·ρ = 1.5, over B = 4: 0.375.
    ρ = 0.5, A = 1: min(0.5, 0.8) = 0.5 -> loss −0.5, gradient −0.5/4 = −0.125.
    ρ = 0.5, A = −1: min(−0.5, −0.8) = −0.8 -> loss 0.8, clipped: no gradient.
    epsilon_high = 0.6 lifts the upper bound to 1.6: ρ = 1.5, A = 1 -> loss −1.5.
    """
    policy = t(-1.0, -1.0, -1.0, -1.0).view(4, 1).requires_grad_()
    old = policy.detach() - t(math.log(1.5), math.log(1.5), -math.log(2), -math.log(2)).view(4, 1)
    logps = TokenLogps(policy, torch.ones(4, 1), t(1.0, -1.0, 1.0, -1.0), old=old)
    out = grpo(logps)
    assert_near(out.losses, [-1.2, 1.5, -0.5, 0.8])
    out.losses.mean().backward()
    assert_near(policy.grad, [[0.0], [0.375], [-0.125], [0.0]])
    assert_near(grpo(logps, epsilon_high=0.6).losses, [-1.5, 1.5, -0.5, 0.8])


def test_grpo_shapes_are_checked():
    policy, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"policy and mask of one shape \[batch, tokens\]; got \(2, 3\) and \(2, 2\)"):
        grpo(TokenLogps(policy, torch.ones(2, 2), t(1.0, 0.0)))
    with pytest.raises(ValueError, match=r"advantages of shape \[batch\] = \(2,\), got \(3,\)"):
        grpo(TokenLogps(policy, mask, t(1.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="token_norm must be one of"):
        grpo(TokenLogps(policy, mask, t(1.0, 0.0)), token_norm="tokens")


# --- metrics, registry, interface --------------------------------------------------------------


def test_reward_metrics_hand_values():
    """Chosen (0.3, −0.1, 0.2), rejected (0.1, 0.0, 0.2): means 0.4/3 = 0.133333 and 0.3/3 = 0.1;
    chosen > rejected in the first only (the tie does not count) -> 1/3; margins (0.2, −0.1, 0) -> 0.1/3 = 0.033333.
    """
    out = LossOutput(t(0.0, 0.0, 0.0), t(0.3, -0.1, 0.2), t(0.1, 0.0, 0.2))
    metrics = reward_metrics(out)
    assert metrics == pytest.approx(
        {"rewards/chosen": 0.4 / 3, "rewards/rejected": 0.1, "rewards/accuracies": 1 / 3, "rewards/margins": 0.1 / 3},
        abs=1e-6,
    )


def test_registry():
    assert set(LOSSES) == {"sft", "dpo", "rpo", "orpo", "ipo"}
    assert {n for n in LOSSES if needs_reference(n)} == {"dpo", "rpo", "ipo"}
    assert {n for n in LOSSES if needs_rejected(n)} == {"dpo", "rpo", "orpo", "ipo"}
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        needs_reference("kto")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_declares_exactly_the_inputs_it_reads(name):
    """Given only the fields of its declared inputs (default hyperparameters) a loss works; with any one input
    declared off it fails, naming a field. So the worker, which computes only what is declared, never starves a
    loss, and never runs a forward pass (rejected responses, the reference) for nothing."""
    full, _, _ = _full_batch()

    def given(reads):
        return SequenceLogps(**{f: getattr(full, f) for f in reads.fields()})

    reads = INPUTS[name]
    LOSSES[name](given(reads))
    for flag in (f.name for f in dataclasses.fields(Inputs) if getattr(reads, f.name)):
        with pytest.raises(ValueError, match=rf"'{name}' needs SequenceLogps\."):
            LOSSES[name](given(dataclasses.replace(reads, **{flag: False})))


def test_declared_inputs_name_sequence_logps_fields():
    """Pairs read both responses' fields; the chosen response alone its own."""
    assert Inputs().fields() == ("policy_chosen",)
    assert Inputs(lengths=True).fields() == ("policy_chosen", "chosen_lengths")
    assert Inputs(rejected=True, reference=True, lengths=True).fields() == (
        "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths")


def test_missing_field_is_named():
    with pytest.raises(ValueError, match=r"'rpo' needs SequenceLogps.ref_chosen, ref_rejected"):
        rpo(SequenceLogps(t(-1.0), t(-2.0), chosen_lengths=t(1)))
    with pytest.raises(ValueError, match="one shape"):
        dpo(SequenceLogps(t(-1.0, -2.0), t(-2.0), t(-1.0), t(-1.0)))


def _full_batch(requires_grad=False, dtype=torch.float32):
    pc = torch.tensor([-10.0, -20.0], dtype=dtype, requires_grad=requires_grad)
    pr = torch.tensor([-12.0, -18.0], dtype=dtype, requires_grad=requires_grad)
    logps = SequenceLogps(pc, pr, t(-11.0, -19.0), t(-11.0, -19.0), chosen_lengths=t(5, 9), rejected_lengths=t(6, 8))
    return logps, pc, pr


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_uniform_interface(name):
    """Every loss takes the full batch with default hyperparameters; outputs are [batch], float32, rewards detached."""
    logps, _, _ = _full_batch(requires_grad=True, dtype=torch.bfloat16)
    out = LOSSES[name](logps)
    for x in out:
        assert x.shape == (2,) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_signs(name):
    """Raising the chosen log-prob lowers every loss; raising the rejected one raises the pairwise ones.

    (IPO pulls back once δ passes 1/(2β); here δ ≈ 0.3 ≪ 5.)
    """
    logps, pc, pr = _full_batch(requires_grad=True)
    LOSSES[name](logps).losses.sum().backward()
    assert (pc.grad < 0).all()
    if needs_rejected(name):
        assert (pr.grad > 0).all()
    else:
        assert pr.grad is None


# --- cross-checks against TRL 1.16's code -----------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo():
    return pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer


@pytest.fixture(scope="module")
def trl_orpo():
    return pytest.importorskip("trl.experimental.orpo.orpo_trainer")


def _trl_dpo_loss(trainer_cls, per_token, lengths, logps, loss_types, loss_weights, beta=0.1, eps=0.0):
    """Run DPOTrainer._compute_loss on given per-token log-probs, with stand-ins for the model and trainer.

    `per_token` is [2B, L] (chosen rows first), zero past each row's length; a one-token prompt precedes it;
    reference sums come from `logps`.
    Returns TRL's scalar loss and its logged metrics. Skips if TRL's internals moved.
    """
    rows, width = per_token.shape
    completion_mask = torch.zeros(rows, width + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1 : 1 + int(n)] = 1

    def model(**kwargs):
        zeros = torch.zeros(rows, width)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(rows, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": logps.ref_chosen,
        "ref_rejected_logps": logps.ref_rejected,
    }
    try:
        loss = trainer_cls._compute_loss(trainer, model, inputs, return_outputs=False)
    except (AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"TRL's DPOTrainer._compute_loss internals changed: {e!r}")
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _random_pairs(batch, lengths, seed=0):
    """Per-token log-probs in (−3, 0) for `batch` pairs, zero-padded; our SequenceLogps of the same numbers."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    per_token = -3 * torch.rand(2 * batch, int(lengths.max()), generator=g)
    per_token *= torch.arange(per_token.shape[1]) < lengths[:, None]
    sums = per_token.sum(dim=1)
    ref = sums + torch.randn(2 * batch, generator=g)
    logps = SequenceLogps(
        sums[:batch],
        sums[batch:],
        ref[:batch],
        ref[batch:],
        chosen_lengths=lengths[:batch],
        rejected_lengths=lengths[batch:],
    )
    return per_token, lengths, logps


def test_dpo_and_ipo_match_trl(trl_dpo):
    """TRL "sigmoid" is our dpo; TRL "ipo" is our ipo with length averaging; rewards and metrics agree."""
    per_token, lengths, logps = _random_pairs(3, [4, 7, 2, 6, 3, 5])
    for loss_types, ours in [(["sigmoid"], dpo(logps, beta=0.1)), (["ipo"], ipo(logps, beta=0.1))]:
        loss, metrics = _trl_dpo_loss(trl_dpo, per_token, lengths, logps, loss_types, [1.0])
        assert_near(loss, ours.losses.mean())
        assert reward_metrics(ours) == pytest.approx({k: metrics[k] for k in reward_metrics(ours)}, abs=1e-5)


def test_rpo_matches_trl_sigmoid_plus_sft(trl_dpo):
    """TRL's RPO, loss_type=["sigmoid", "sft"] with loss_weights=[1, α], is our rpo with nll_norm="batch_tokens".

    With winners of different lengths (4, 7, 2) the paper's per-sequence NLL gives another value.
    """
    per_token, lengths, logps = _random_pairs(3, [4, 7, 2, 6, 3, 5], seed=1)
    loss, _ = _trl_dpo_loss(trl_dpo, per_token, lengths, logps, ["sigmoid", "sft"], [1.0, 0.5])
    assert_near(loss, rpo(logps, alpha=0.5, nll_norm="batch_tokens").losses.mean())
    assert not torch.isclose(loss, rpo(logps, alpha=0.5).losses.mean(), atol=1e-3)


def test_rpo_equals_trl_when_winners_share_a_length(trl_dpo):
    per_token, lengths, logps = _random_pairs(2, [5, 5, 3, 8], seed=2)
    loss, _ = _trl_dpo_loss(trl_dpo, per_token, lengths, logps, ["sigmoid", "sft"], [1.0, 1.0])
    assert_near(loss, rpo(logps).losses.mean())


def test_label_smoothing_matches_trl_aot_for_one_pair(trl_dpo):
    """TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss keeps the cDPO form and, for one pair
    (its sort is then a no-op), is exactly our dpo with label_smoothing=ε."""
    per_token, lengths, logps = _random_pairs(1, [4, 6], seed=3)
    loss, _ = _trl_dpo_loss(trl_dpo, per_token, lengths, logps, ["aot"], [1.0], eps=0.2)
    assert_near(loss, dpo(logps, label_smoothing=0.2).losses.mean())


def test_orpo_matches_trl(trl_orpo):
    """TRL's odds_ratio_loss returns λ·log σ(log odds ratio) on mean log-probs; ours adds the NLL −m_c to its negative."""
    _, _, logps = _random_pairs(4, [4, 7, 2, 9, 6, 3, 5, 1], seed=4)
    mc, mr = logps.policy_chosen / logps.chosen_lengths, logps.policy_rejected / logps.rejected_lengths
    stand_in = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, chosen_rewards, rejected_rewards, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(stand_in, mc, mr)
    ours = orpo(logps, lam=0.1)
    assert_near(ours.losses, -mc - theirs)
    assert_near(ours.chosen_rewards, chosen_rewards)
    assert_near(ours.rejected_rewards, rejected_rewards)
    x = -torch.logspace(-7, math.log10(50), 200)
    assert_near(log1mexp(x), trl_orpo.log1mexp(x))


@pytest.fixture(scope="module")
def trl_grpo():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def _trl_grpo_loss(trainer_cls, per_token, mask, advantages, old, ref, loss_type, beta, eps_low, eps_high):
    """Run GRPOTrainer._compute_loss on given per-token log-probs, with stand-ins for the model and trainer (token
    importance sampling, no vLLM, no entropy mask or bonus, one accumulation step). Skips if TRL's internals moved."""
    rows, width = per_token.shape
    one = lambda x, **kwargs: x  # noqa: E731 (one process: gather and reduce are the identity)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (per_token, torch.zeros(rows, width), None),
        # The loss and its knobs; every other feature off.
        loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, importance_sampling_level="token",
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(gather=one, reduce=one), _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.ones(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    try:
        return trainer_cls._compute_loss(trainer, None, inputs)
    except (AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"TRL's GRPOTrainer._compute_loss internals changed: {e!r}")


@pytest.mark.parametrize("loss_type, token_norm", [("grpo", "sequence"), ("bnpo", "batch_tokens")])
def test_grpo_matches_trl_value_and_gradient(trl_grpo, loss_type, token_norm):
    """Four responses of 1 to 5 tokens, an old policy 0.4 nats away (so some ratios clip, asymmetrically with
    ε_high = 0.28), a reference, β = 0.04: TRL's "grpo" is token_norm="sequence", its "bnpo" "batch_tokens",
    in value and in gradient."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([3, 5, 1, 4])
    mask = (torch.arange(5) < lengths[:, None]).long()
    policy = -3 * torch.rand(4, 5, generator=g)
    old = policy + 0.4 * torch.randn(4, 5, generator=g)
    ref = policy + 0.3 * torch.randn(4, 5, generator=g)
    advantages = group_advantages(t(1, 0, 0, 1).view(2, 2)).flatten() + t(0.3, 0.0, -0.2, 0.1)
    theirs_in = policy.clone().requires_grad_()
    theirs = _trl_grpo_loss(trl_grpo, theirs_in, mask, advantages, old, ref, loss_type, 0.04, 0.2, 0.28)
    theirs.backward()
    ours_in = policy.clone().requires_grad_()
    logps = TokenLogps(ours_in, mask, advantages, old=old, ref=ref)
    ours = grpo(logps, epsilon=0.2, epsilon_high=0.28, beta=0.04, token_norm=token_norm).losses.mean()
    ours.backward()
    assert_near(ours, theirs)
    assert_near(ours_in.grad, theirs_in.grad)
    ratio = torch.exp(policy - old)[mask.bool()]
    assert ((ratio < 0.8) | (ratio > 1.28)).any() and ((ratio > 0.8) & (ratio < 1.28)).any()
