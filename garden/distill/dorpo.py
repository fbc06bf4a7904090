"""The DORPO loss: NLL on the chosen answer + ORPO odds-ratio term + top-k KL to the teacher.

For a row (x, y+, y-, q), q being the teacher's top-k distribution on each token of y+::

    L = NLL(y+ | x) + lambda_or * L_OR + lambda_kl * KL_topk(q || p_student on y+)

Pure functions on tensors (no model code, no I/O). Alignment convention used throughout: ``logits[:, t]``
is the student's prediction for ``labels[:, t]``; the caller has already shifted (for a causal LM,
``logits = model(ids).logits[:, :-1]`` and ``labels = ids[:, 1:]``). ``mask[:, t]`` is true for answer
tokens only, so prompt and padding positions never count; labels at masked positions may hold anything
in or out of range (e.g. -100). Log-softmaxes are taken in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# log1mexp clamps its input to at most this: log(1 - e^0) = -inf, and its gradient -e^x/(1 - e^x) blows up
# near 0. A mean log-prob above -1e-6 means probability 1 to float32 precision anyway.
LOG1MEXP_MAX = -1e-6
_LN2 = math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, stably (Maechler 2012): ``1 - exp(x)`` cancels catastrophically near 0 and
    ``log1p(-exp(x))`` loses precision there, so use log(-expm1(x)) for x > -ln2 and log1p(-exp(x)) below.
    x is clamped to at most ``LOG1MEXP_MAX`` so the result and its gradient stay finite (the gradient is 0
    past the clamp)."""
    x = x.clamp(max=LOG1MEXP_MAX)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_tokens(prefix: str, logits: Tensor, labels: Tensor, mask: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{prefix}logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"{prefix}labels {tuple(labels.shape)} and {prefix}mask {tuple(mask.shape)} must both be "
            f"[batch, seq] = {tuple(logits.shape[:2])} to match {prefix}logits (shift logits before calling)"
        )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``values`` [B, T] over ``mask``; 0 for a row with no unmasked token."""
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def _gather_logps(logps: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    safe = torch.where(mask, labels.long(), 0)  # masked labels may be -100: never index with them
    token = torch.where(mask, logps.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    return _masked_mean(token, mask), token


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs of ``labels`` under ``logits``: returns (mean over the mask per row [B], per-token [B, T]).

    ``logits`` [B, T, V] are aligned to ``labels`` [B, T] (``logits[:, t]`` predicts ``labels[:, t]``; the
    caller shifts). Masked positions get token log-prob 0; a row with an empty mask gets mean 0. The mean
    (not the sum) is what ORPO compares, so answers of different lengths are on one scale."""
    _check_tokens("", logits, labels, mask)
    return _gather_logps(F.log_softmax(logits.float(), dim=-1), labels, mask.bool())


def odds_ratio_loss(chosen_logps: Tensor, rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv 2403.07691), per row: returns (loss [B], log_odds [B]).

    Inputs are mean per-token log-probs lp+/lp- [B] (<= 0). With odds(p) = p / (1 - p),
    ``log_odds = log odds(e^lp+) - log odds(e^lp-) = (lp+ - lp-) - (log1mexp(lp+) - log1mexp(lp-))`` and
    ``loss = -log sigmoid(log_odds)``: ln 2 when the answers are equally likely, -> 0 as the chosen one
    wins. log1mexp keeps log(1 - p) finite when p -> 1, where a naive log(1 - exp(lp)) gives -inf/NaN."""
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(
            f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps {tuple(rejected_logps.shape)} "
            "must both be [batch] mean per-token log-probs"
        )
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    return -F.logsigmoid(log_odds), log_odds


def _token_kl_from_logps(student_logps: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B, T] per-token bucket KL, 0 at masked positions."""
    keep = mask.unsqueeze(-1)
    s_top = student_logps.gather(-1, torch.where(keep, topk_ids.long(), 0))  # [B, T, k]
    t_top = torch.where(keep, topk_logprobs.float(), -math.inf)  # padding at masked positions may be NaN
    # a top-k slot the teacher left empty (-inf: a row with a smaller k in a mixed batch) is no bucket: keep the
    # student's mass there out of its top-k sum (only at kept positions, which always have a real slot)
    padded_slot = keep & (t_top == -math.inf)
    s_rest = log1mexp(torch.logsumexp(s_top.masked_fill(padded_slot, -math.inf), dim=-1))  # log(1 - top-k mass)
    p_top = t_top.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp(min=0.0)
    # 0 * log 0 = 0: a teacher bucket with no mass (padded -inf top-k slot, or rest = 0) contributes nothing
    top = torch.where(p_top > 0, p_top * (t_top - s_top), 0.0).sum(-1)
    rest = torch.xlogy(p_rest, p_rest) - p_rest * s_rest
    return torch.where(mask, top + rest, 0.0)


def _check_topk(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> None:
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} must be [batch, seq, vocab] and mask "
            f"{tuple(mask.shape)} must be its [batch, seq]"
        )
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 3 or topk_ids.shape[:2] != mask.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both be "
            f"[batch, seq, k] with [batch, seq] = {tuple(mask.shape)}"
        )


def topk_kl_per_token(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The bucket KL of :func:`topk_kl` at every token: [B, T], 0 at masked positions (for token-weighted
    means, as evaluation reports)."""
    _check_topk(student_logits, topk_ids, topk_logprobs, mask)
    logps = F.log_softmax(student_logits.float(), dim=-1)
    return _token_kl_from_logps(logps, topk_ids, topk_logprobs, mask.bool())


def topk_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over masked tokens of KL(teacher || student) on k+1 buckets: returns [B].

    The teacher stores only its top-k log-probs per token (``topk_ids``/``topk_logprobs`` [B, T, k], any
    float dtype, float16 included). The k buckets plus a "rest" bucket holding the missing mass
    1 - sum(top-k) make a proper distribution, so the KL stays a true divergence (>= 0, 0 iff the student
    matches on the buckets) with only k stored numbers; the student is bucketed the same way, its rest
    being log1mexp(logsumexp of its log-probs at the k ids). With k = V the rest is 0 and this is the exact
    full-vocabulary KL. ``student_logits`` [B, T, V] are aligned as in :func:`sequence_logps`."""
    return _masked_mean(topk_kl_per_token(student_logits, topk_ids, topk_logprobs, mask), mask.bool())


@dataclass
class DorpoConfig:
    """Weights of the DORPO terms; 0 turns a term off (it is still computed for the metrics)."""

    lambda_or: float = 0.1
    lambda_kl: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lambda_or", "lambda_kl"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 disables the term), got {value!r}")


@dataclass
class DorpoOutput:
    """``loss`` to backprop, and detached metrics. ``or_loss``/``kl`` are what was added to the loss (0.0 when
    no row in the batch has the term); ``log_odds``/``pref_acc`` are NaN when no row has a rejected answer."""

    loss: Tensor
    nll: float
    or_loss: float
    log_odds: float
    kl: float
    pref_acc: float

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "nll": self.nll,
            "or_loss": self.or_loss,
            "log_odds": self.log_odds,
            "kl": self.kl,
            "pref_acc": self.pref_acc,
        }


def _row_flags(name: str, flags: Tensor | None, batch: int, device: torch.device) -> Tensor:
    if flags is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if flags.shape != (batch,):
        raise ValueError(f"{name} must be [batch] = ({batch},) booleans, got shape {tuple(flags.shape)}")
    return flags.to(device=device, dtype=torch.bool)


def _rows_mean(values: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``values`` [B] over the selected rows; 0 (still differentiable) when none is selected."""
    return torch.where(rows, values, 0.0).sum() / rows.sum().clamp(min=1)


def dorpo_loss(
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    chosen_mask: Tensor,
    config: DorpoConfig,
    rejected_logits: Tensor | None = None,
    rejected_labels: Tensor | None = None,
    rejected_mask: Tensor | None = None,
    has_rejected: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    has_topk: Tensor | None = None,
) -> DorpoOutput:
    """DORPO on a batch that may mix rows with and without y- and with and without teacher top-k.

    Row i of the rejected / top-k tensors belongs to row i of the chosen ones (rows lacking it hold padding,
    which is never read into the loss); ``has_rejected``/``has_topk`` [B] say which rows have them (default:
    all, when the tensors are given; none otherwise). The rejected sequence length may differ from the
    chosen one. NLL = -mean over rows of the mean per-token chosen log-prob; the OR and KL terms are each
    averaged over the rows that have them. Rows without top-k (a teacher with another tokenizer) train on
    hard labels only."""
    _check_tokens("chosen_", chosen_logits, chosen_labels, chosen_mask)
    batch, device = chosen_logits.shape[0], chosen_logits.device
    mask = chosen_mask.bool()
    chosen_logps_full = F.log_softmax(chosen_logits.float(), dim=-1)
    chosen_lp, _ = _gather_logps(chosen_logps_full, chosen_labels, mask)
    nll = -chosen_lp.mean()
    zero = chosen_lp.sum() * 0.0
    or_loss, or_metric, log_odds_metric, pref_acc = zero, 0.0, math.nan, math.nan
    kl, kl_metric = zero, 0.0

    rej_rows = _row_flags("has_rejected", has_rejected, batch, device)
    if rejected_logits is None or rejected_labels is None or rejected_mask is None:
        if (has_rejected is not None and bool(rej_rows.any())) or rejected_logits is not None:
            raise ValueError("has_rejected rows need rejected_logits, rejected_labels and rejected_mask all given")
    else:
        _check_tokens("rejected_", rejected_logits, rejected_labels, rejected_mask)
        if rejected_logits.shape[0] != batch:
            raise ValueError(f"rejected batch {rejected_logits.shape[0]} != chosen batch {batch}: pad missing rows")
        rejected_lp, _ = sequence_logps(rejected_logits, rejected_labels, rejected_mask)
        or_rows, log_odds = odds_ratio_loss(chosen_lp, rejected_lp)
        if bool(rej_rows.any()):
            or_loss = _rows_mean(or_rows, rej_rows)
            or_metric = float(or_loss.detach())
            log_odds_metric = float(_rows_mean(log_odds.detach(), rej_rows))
            pref_acc = float(_rows_mean((chosen_lp > rejected_lp).float().detach(), rej_rows))

    topk_rows = _row_flags("has_topk", has_topk, batch, device)
    if topk_ids is None or topk_logprobs is None:
        if (has_topk is not None and bool(topk_rows.any())) or (topk_ids is None) != (topk_logprobs is None):
            raise ValueError("has_topk rows need both topk_ids and topk_logprobs given")
    else:
        if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 3 or topk_ids.shape[:2] != mask.shape:
            raise ValueError(
                f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both be "
                f"[batch, seq, k] with [batch, seq] = {tuple(mask.shape)} as the chosen labels"
            )
        if bool(topk_rows.any()):
            kl_mask = mask & topk_rows[:, None]
            kl_rows = _masked_mean(_token_kl_from_logps(chosen_logps_full, topk_ids, topk_logprobs, kl_mask), kl_mask)
            kl = _rows_mean(kl_rows, topk_rows)
            kl_metric = float(kl.detach())

    loss = nll + config.lambda_or * or_loss + config.lambda_kl * kl
    return DorpoOutput(
        loss=loss, nll=float(nll.detach()), or_loss=or_metric, log_odds=log_odds_metric, kl=kl_metric, pref_acc=pref_acc
    )
