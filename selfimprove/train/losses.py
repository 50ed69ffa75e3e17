"""Training losses as pure functions of log-probabilities: per sequence, and per token for GRPO.

No model lives here: the trainer runs the forward passes, sums the response tokens'
log-probabilities (prompt tokens masked) and hands the sums over in a `SequenceLogps`.
Every loss is `LOSSES[name](logps, **hyperparameters) -> LossOutput`, so the trainer
never branches on the loss. GRPO's loss (`grpo`) reads per-token log-probs in a `TokenLogps`
instead, and the group-relative advantages it weighs them with (`group_advantages`); the
worker cannot feed it yet (it hands over sums, and rows carry no advantage), so it is not in `LOSSES`.

Choices:
1. One call shape. Every loss takes a `SequenceLogps` (policy and reference sums for
   chosen and rejected, plus response token counts) and keyword-only hyperparameters.
   Fields a loss does not use may be None; a missing field it does use raises a
   ValueError that names it. Each loss declares the fields it reads in
   `loss_names.INPUTS` (torch-free, for the recipes' checks at load); the worker computes
   those and no others: reference log-probs and rejected responses only for a loss that
   reads them.
2. Per-example output. A loss returns `LossOutput(losses, chosen_rewards,
   rejected_rewards)`, all shape [batch]; the trainer takes `losses.mean()`. Rewards
   are detached and only logged (`reward_metrics`).
3. float32 arithmetic: inputs are cast with `.float()`. That cannot restore digits lost
   earlier, so the trainer sums token log-probs in float32 too (bf16 keeps under three
   significant digits: −312.7 becomes −312). Lengths are clamped to >= 1, as TRL does.
4. sft: NLL per response token, `-logp_c / |c|`. Rewards are the summed policy
   log-probs (rejected ones are zero when no rejected response is given): SFT has no
   implicit reward, and the chosen log-prob is the number worth watching.
5. dpo: sigmoid DPO, `-log σ(β·((pc − rc) − (pr − rr)))`; rewards `β·(policy − ref)`.
   `label_smoothing` ε > 0 gives conservative DPO (cDPO): `-(1−ε)·log σ(z) − ε·log σ(−z)`,
   the form older TRL releases used for "sigmoid". TRL 1.16 ignores `label_smoothing`
   for "sigmoid" (it feeds "robust" and "exo_pair" only), so compare with TRL at ε = 0.
6. rpo: IRPO (Pang et al., 2024), `dpo + α·(−logp_c / |c|)`, β = 0.1 and α = 1 by
   default. The paper divides each winner's NLL by its own length. TRL expresses
   RPO as `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, α]`, and its "sft" term is
   one mean over all chosen tokens of the micro-batch, `−Σ_i logp_c,i / Σ_i |c_i|`,
   which weights long winners more. `nll_norm="batch_tokens"` reproduces that: each
   example's NLL becomes its share `−logp_c,i · B / Σ_j |c_j|`, so `losses.mean()` equals
   TRL's value (a share depends on the rest of the batch). The two agree when every
   winner in the batch has the same length.
7. orpo: `−logp_c/|c| + λ·(−log σ(log odds_c − log odds_l))`, where
   `log odds(y) = m − log(1 − e^m)` and `m = logp/|y|` is the mean token log-prob
   (Hong et al., 2024). `log(1 − e^m)` is computed without cancellation on both sides
   of m = −ln 2 (log1p(−exp) below, log(−expm1) above; Mächler 2012, as TRL's
   `log1mexp`), after clamping m to <= −1e-7: float32 cannot resolve a token log-prob
   closer to 0 than ~6e-8, and the clamp caps log odds at ~16.1 with finite gradients.
   Rewards `λ·m`, as TRL's ORPOTrainer. TRL's NLL term is a token mean over the batch
   that also covers prompt tokens; ours is the response only (`nll_norm` as in rpo).
8. ipo: `(δ − 1/(2β))²` with δ the difference of the length-averaged log-ratios,
   `(pc − rc)/|c| − (pr − rr)/|r|`, exactly TRL 1.16's "ipo" (the normalisation the IPO
   authors used). `length_normalize=False` uses the summed log-ratios instead.
   Rewards are `β·(policy − ref)` on the sums, as TRL logs them.
9. group_advantages: GRPO's baseline is the group (the samples of one prompt), not a value
   model (Shao et al., 2024, DeepSeekMath §4.1): `A = r − mean(group)`, divided by the group's
   standard deviation plus ε when `scale` (Bessel-corrected, ε = 1e-4: TRL 1.16's GRPOTrainer,
   `scale_rewards="group"`, in `_generate_and_score_completions`). A group whose rewards are
   all equal gets zeros, with or without scaling: it says nothing about which sample is better.
   A group of one sample likewise.
10. grpo: the clipped surrogate per token, as TRL 1.16's `GRPOTrainer._compute_loss` (token-level
   importance sampling): ratio `ρ = exp(logp − old_logp)`, token loss
   `−min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·KL`, with the k3 estimator
   `KL = e^(ref − logp) − (ref − logp) − 1` (Schulman 2020; unbiased, always >= 0). `old`
   absent means one optimizer step per sampled batch (TRL's num_iterations = 1): old_logp is
   logp detached, ρ = 1, and the gradient of a token's loss is `−A + β·(1 − e^(ref − logp))`
   per unit of its logp. `token_norm="sequence"` is TRL's loss_type "grpo" (the paper's):
   each sequence's token mean, then the mean over sequences; `"batch_tokens"` is TRL's "bnpo":
   one mean over all response tokens of the micro-batch, as a per-sequence share (as nll_norm,
   point 6). Padding (mask 0) may hold any value, NaN included: it is zeroed before any
   arithmetic, so it reaches neither the loss nor the gradient. Rewards: the advantages
   (rejected ones zero: GRPO has no rejected response).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# float32 resolves log p near 0 only to ~6e-8 (1 - p rounds to 0 below that): a mean
# token log-prob closer to 0 is noise, and log(1 - e^m) would run to -inf at m = 0.
MAX_MEAN_LOGP = -1e-7
NLL_NORMS = ("sequence", "batch_tokens")


@dataclass(frozen=True)
class TokenLogps:
    """Per-token log-probs of sampled responses, [batch, tokens] each, for `grpo`.

    Entry [i, j] is sequence i's j-th response token where `mask` is 1; padding (mask 0) may sit anywhere and
    hold anything. `advantages` is [batch], one per sequence (`group_advantages`, flattened).
    """

    policy: Tensor  # the policy's log-probs, with grad
    mask: Tensor  # 1 (or True) at response tokens, 0 at padding
    advantages: Tensor
    old: Tensor | None = None  # the sampling policy's log-probs; None: one optimizer step per batch (ρ = 1)
    ref: Tensor | None = None  # the reference model's log-probs, read when beta > 0


@dataclass(frozen=True)
class SequenceLogps:
    """Summed response log-probs, shape [batch] each; None where a loss does not need it."""

    policy_chosen: Tensor
    policy_rejected: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None  # response tokens counted in policy_chosen
    rejected_lengths: Tensor | None = None


class LossOutput(NamedTuple):
    losses: Tensor  # [batch], with grad; the trainer takes the mean
    chosen_rewards: Tensor  # [batch], detached
    rejected_rewards: Tensor  # [batch], detached


def _fields(logps: SequenceLogps, loss: str, *names: str) -> list[Tensor]:
    """The named fields as float32, or a ValueError naming every missing one."""
    missing = [n for n in names if getattr(logps, n) is None]
    if missing:
        raise ValueError(f"loss {loss!r} needs SequenceLogps.{', '.join(missing)}")
    out = [getattr(logps, n).float() for n in names]
    shape = out[0].shape
    if len(shape) != 1 or any(t.shape != shape for t in out):
        got = ", ".join(f"{n}={tuple(t.shape)}" for n, t in zip(names, out, strict=True))
        raise ValueError(f"loss {loss!r} needs 1-D tensors of one shape [batch]; got {got}")
    return out


def _lengths(lengths: Tensor) -> Tensor:
    return lengths.float().clamp(min=1.0)


def _token_mean(total: Tensor, lengths: Tensor, norm: str, knob: str = "nll_norm") -> Tensor:
    """Per-example token means of the per-sequence sums `total`: each over its own tokens ("sequence"), or its
    share of one mean over all tokens of the batch ("batch_tokens"), so that the batch mean of the shares is that
    mean. A count of 0 (a sequence's, or the batch's) divides as 1, as TRL's `clamp(min=1)`."""
    if norm == "sequence":
        return total / lengths.clamp(min=1.0)
    if norm == "batch_tokens":
        return total * (total.numel() / lengths.sum().clamp(min=1.0))
    raise ValueError(f"{knob} must be one of {NLL_NORMS}, got {norm!r}")


def _nll(logp: Tensor, lengths: Tensor, nll_norm: str) -> Tensor:
    """Per-example NLL of the winner: per sequence (paper) or its share of a batch token mean (TRL)."""
    return _token_mean(-logp, lengths, nll_norm)


def _dpo_losses(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    z = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(z)
    if label_smoothing > 0:  # cDPO: the label is wrong with probability ε
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -ln 2; x is first clamped to <= MAX_MEAN_LOGP.

    Each branch sees only inputs where it is finite, so torch.where passes no NaN
    gradient back from the branch it discards.
    """
    x = x.clamp(max=MAX_MEAN_LOGP)
    near_zero = x > -math.log(2)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x)),  # 1 - e^x is small: expm1 keeps its digits
        torch.log1p(-torch.exp(x)),  # e^x is small: log1p keeps the digits of 1 - e^x
    )


def sft(logps: SequenceLogps, *, nll_norm: str = "sequence") -> LossOutput:
    """Negative log-likelihood of the chosen response per token: `-policy_chosen / chosen_lengths`."""
    pc, lc = _fields(logps, "sft", "policy_chosen", "chosen_lengths")
    rejected = logps.policy_rejected.float().detach() if logps.policy_rejected is not None else torch.zeros_like(pc)
    return LossOutput(_nll(pc, _lengths(lc), nll_norm), pc.detach(), rejected)


def dpo(logps: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Sigmoid DPO (Rafailov et al., 2023); cDPO when label_smoothing > 0."""
    pc, pr, rc, rr = _fields(logps, "dpo", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    losses = _dpo_losses(pc, pr, rc, rr, beta, label_smoothing)
    return LossOutput(losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def rpo(
    logps: SequenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    nll_norm: str = "sequence",
) -> LossOutput:
    """IRPO's loss: DPO plus α times the winner's length-normalised NLL (see choice 6 for TRL's variant)."""
    pc, pr, rc, rr, lc = _fields(
        logps, "rpo", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths"
    )
    losses = _dpo_losses(pc, pr, rc, rr, beta, label_smoothing) + alpha * _nll(pc, _lengths(lc), nll_norm)
    return LossOutput(losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def orpo(logps: SequenceLogps, *, lam: float = 0.1, nll_norm: str = "sequence") -> LossOutput:
    """ORPO (Hong et al., 2024): winner NLL + λ·(−log σ(log odds ratio)) on mean token log-probs; no reference."""
    pc, pr, lc, lr = _fields(logps, "orpo", "policy_chosen", "policy_rejected", "chosen_lengths", "rejected_lengths")
    lc, lr = _lengths(lc), _lengths(lr)
    mc, mr = pc / lc, pr / lr
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    losses = _nll(pc, lc, nll_norm) - lam * F.logsigmoid(log_odds)
    return LossOutput(losses, (lam * mc).detach(), (lam * mr).detach())


def ipo(logps: SequenceLogps, *, beta: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """IPO (Azar et al., 2023) as TRL computes it: `(δ − 1/(2β))²` on length-averaged log-ratios."""
    names = ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"]
    if length_normalize:
        names += ["chosen_lengths", "rejected_lengths"]
    pc, pr, rc, rr, *lengths = _fields(logps, "ipo", *names)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if length_normalize:
        delta = chosen_ratio / _lengths(lengths[0]) - rejected_ratio / _lengths(lengths[1])
    else:
        delta = chosen_ratio - rejected_ratio
    losses = (delta - 1 / (2 * beta)) ** 2
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def group_advantages(rewards: Tensor, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages of `rewards` [groups, samples] (a row per prompt), same shape, float32:
    reward minus its group's mean, over the group's standard deviation + eps when `scale` (see point 9)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, samples], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale or rewards.shape[1] == 1:  # one sample: no spread, and its advantage is 0 already
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def grpo(
    logps: TokenLogps,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    token_norm: str = "sequence",
) -> LossOutput:
    """GRPO's clipped policy-gradient loss with an optional k3 KL to the reference, per token (see point 10).

    epsilon_high defaults to epsilon (DAPO's asymmetric clip sets it higher); beta = 0 (TRL's default) reads no
    reference.
    """
    mask = logps.mask.bool()
    if logps.policy.dim() != 2 or logps.policy.shape != mask.shape:
        raise ValueError(f"grpo needs TokenLogps.policy and mask of one shape [batch, tokens]; got "
                         f"{tuple(logps.policy.shape)} and {tuple(mask.shape)}")
    if logps.advantages.shape != mask.shape[:1]:
        raise ValueError(f"grpo needs TokenLogps.advantages of shape [batch] = {tuple(mask.shape[:1])}, got "
                         f"{tuple(logps.advantages.shape)}")
    if beta and logps.ref is None:
        raise ValueError("grpo with beta > 0 needs TokenLogps.ref")

    def tokens(x: Tensor) -> Tensor:  # float32, padding zeroed before any arithmetic touches it
        return x.float().masked_fill(~mask, 0.0)

    logp = tokens(logps.policy)
    old = logp.detach() if logps.old is None else tokens(logps.old)
    advantages = logps.advantages.float().unsqueeze(1)
    ratio = torch.exp(logp - old)
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + high) * advantages)
    if beta:
        log_ratio = tokens(logps.ref) - logp
        per_token = per_token + beta * (torch.exp(log_ratio) - log_ratio - 1)
    losses = _token_mean((per_token * mask).sum(-1), mask.sum(-1).float(), token_norm, "token_norm")
    return LossOutput(losses, advantages.squeeze(1).detach(), torch.zeros_like(losses))


LOSSES = {"sft": sft, "dpo": dpo, "rpo": rpo, "orpo": orpo, "ipo": ipo}


def reward_metrics(out: LossOutput) -> dict[str, float]:
    """Batch means of the rewards, their margin, and how often chosen beats rejected (strictly), under TRL's keys."""
    chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }
