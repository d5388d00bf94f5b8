"""GRPO mathematics as small pure functions on tensors: group advantages, the clipped surrogate,
Schulman's k3 KL estimator and the three loss aggregations (docs/method.md §7). No model code, no I/O.

Departures and choices (the paper gives none of these details):
- std of a group is the sample std (Bessel, /(G-1)), as TRL and verl compute it; paper: "std"; here: sample.
- A group whose rewards are all equal gets advantage exactly 0 (no rounding residue amplified by 1/eps).
- All loss math runs in float32, whatever the dtype of the log-probs (bf16 ratios are too coarse to clip).
- The surrogate uses asymmetric clipping (DAPO's clip-higher): [1 - eps, 1 + eps_high].
- The KL penalty's estimator is a choice (`kl_penalty`), because the two in use pull towards different divergences.
  On tokens x sampled from pi_old, at pi = pi_old (one update per batch), with d = log ref(x) - log pi(x):
    k3       = e^d - d - 1:      E[grad k3] = sum_x (pi - ref) grad log pi = grad KL(ref || pi)
    k3-ratio = (pi / pi_old) k3: E[grad]    = sum_x pi (k3 + 1 - e^d) grad log pi = sum_x log(pi / ref) grad pi
                                            = grad KL(pi || ref)
  Both have the value of an unbiased estimate of KL(pi || ref) when pi = pi_old; only the gradient differs.
  k3 (the default) is the GRPO paper's and the usual recipes'; k3-ratio is DeepSeek-V3.2's importance-corrected
  estimator (TRL's GRPOTrainer: `use_bias_correction_kl`), whose gradient is that of the KL the penalty names.
"""
import torch

AGGREGATIONS = ("token-mean", "seq-mean", "constant")
KL_ESTIMATORS = ("k3", "k3-ratio")


def group_advantages(rewards, group_size, std_norm=True, eps=1e-6):
    """rewards (N,), rows of one group contiguous -> advantages (N,) float32.
    A_i = (r_i - mean_g) / (std_g + eps), std_g the sample std; r_i - mean_g when std_norm=False (Dr. GRPO)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}: with one rollout per prompt the "
                         "advantage r - mean is always 0, so there is no learning signal")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide the number of rewards {rewards.numel()}")
    r = rewards.float().view(-1, group_size)  # (prompts, G)
    centered = r - r.mean(dim=1, keepdim=True)  # (prompts, G)
    # all-equal groups: force exact zeros, the mean's rounding must not leak into the gradient
    all_equal = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # (prompts, 1)
    centered = torch.where(all_equal, torch.zeros_like(centered), centered)
    if std_norm:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)  # (N,)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1, >= 0.
    Its value is unbiased for KL(pi || ref) on samples of pi; as a loss its gradient is that of KL(ref || pi)."""
    log_ratio = ref_logp.float() - logp.float()  # (N, T)
    return torch.exp(log_ratio) - log_ratio - 1  # (N, T)


def kl_penalty(logp, old_logp, ref_logp, estimator="k3"):
    """The per-token KL term of the loss (N, T). k3: kl_k3, whose gradient is that of KL(ref || pi);
    k3-ratio: exp(logp - old_logp) * kl_k3 with old_logp constant, whose gradient is that of KL(pi || ref)
    (the module docstring derives both)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}, expected one of {KL_ESTIMATORS}")
    k3 = kl_k3(logp, ref_logp)  # (N, T)
    if estimator == "k3":
        return k3
    return torch.exp(logp.float() - old_logp.float().detach()) * k3  # (N, T)


def policy_loss(logp, old_logp, adv, eps=0.2, eps_high=0.28):
    """Per-token clipped surrogate -min(ratio*A, clip(ratio, 1-eps, 1+eps_high)*A), ratio = exp(logp - old_logp).
    logp, old_logp (N, T); adv (N,). Returns (per_token_loss (N, T), clipped (N, T) bool: clip active)."""
    if logp.shape != old_logp.shape or logp.dim() != 2 or adv.shape != logp.shape[:1]:
        raise ValueError(f"expected logp, old_logp (N, T) and adv (N,), got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(adv.shape)}")
    ratio = torch.exp(logp.float() - old_logp.float())  # (N, T)
    a = adv.float()[:, None]  # (N, 1)
    unclipped = ratio * a  # (N, T)
    clipped_obj = ratio.clamp(1 - eps, 1 + eps_high) * a  # (N, T)
    # the clip is active where it lowers the objective; there the gradient is zero
    clipped = clipped_obj < unclipped  # (N, T)
    return -torch.where(clipped, clipped_obj, unclipped), clipped


def aggregate(per_token, mask, how="token-mean", max_new=None, n_rows=None, n_tokens=None):
    """Reduce (N, T) per-token values to a scalar over the valid tokens of mask (N, T).
    token-mean (DAPO, default): sum / n_tokens; seq-mean (GRPO): sum of row means / n_rows;
    constant (Dr. GRPO): sum / (n_rows * max_new). n_rows / n_tokens default to this batch's counts;
    a caller splitting a batch into micro-batches passes the whole batch's totals so the losses add up."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}, expected one of {AGGREGATIONS}")
    if how == "constant" and not max_new:
        raise ValueError("aggregation 'constant' (Dr. GRPO) needs max_new, the rollout token limit")
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    masked = torch.where(mask, per_token.float(), 0.0)  # (N, T)
    n_rows = per_token.shape[0] if n_rows is None else n_rows
    if how == "token-mean":
        n_tokens = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
        return masked.sum() / n_tokens
    if how == "seq-mean":
        row_mean = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return row_mean.sum() / n_rows
    return masked.sum() / (n_rows * max_new)


def grpo_loss(logp, old_logp, adv, mask, ref_logp=None, beta=0.0, eps=0.2, eps_high=0.28,
              how="token-mean", max_new=None, n_rows=None, n_tokens=None, kl_estimator="k3"):
    """aggregate(policy_loss + beta * kl_penalty) -> (loss scalar, stats: clip_frac, kl (the penalty's value),
    ratio_mean over valid tokens)."""
    if beta and ref_logp is None:
        raise ValueError(f"beta = {beta} needs ref_logp, the reference policy's log-probs")
    per_token, clipped = policy_loss(logp, old_logp, adv, eps, eps_high)  # (N, T)
    kl = (kl_penalty(logp, old_logp, ref_logp, kl_estimator) if ref_logp is not None
          else torch.zeros_like(per_token))  # (N, T)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, how, max_new, n_rows, n_tokens)
    with torch.no_grad():  # stats are local to this (micro-)batch
        valid = mask.bool()
        n = valid.sum().clamp(min=1)
        ratio = torch.exp(logp.float() - old_logp.float())  # (N, T)
        stats = {"clip_frac": ((clipped & valid).sum() / n).item(),
                 "kl": (torch.where(valid, kl, 0.0).sum() / n).item(),
                 "ratio_mean": (torch.where(valid, ratio, 0.0).sum() / n).item()}
    return loss, stats
