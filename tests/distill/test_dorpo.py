"""The DORPO loss: each term against independent arithmetic, and the mixed-batch plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from garden.distill.dorpo import (
    DorpoConfig,
    dorpo_loss,
    log1mexp,
    odds_ratio_loss,
    sequence_logps,
    topk_kl,
)


def _orpo_by_hand(lp_c: float, lp_r: float) -> tuple[float, float]:
    log_odds = math.log(math.exp(lp_c) / (1 - math.exp(lp_c))) - math.log(math.exp(lp_r) / (1 - math.exp(lp_r)))
    return math.log(1 + math.exp(-log_odds)), log_odds


def test_odds_ratio_loss_matches_hand_computed_values() -> None:
    pairs = [(-0.5, -1.5), (-2.0, -0.3), (-0.05, -4.0), (-3.0, -3.5)]
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.float64)
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.float64)
    loss, log_odds = odds_ratio_loss(chosen, rejected)
    for i, (c, r) in enumerate(pairs):
        want_loss, want_odds = _orpo_by_hand(c, r)
        assert log_odds[i].item() == pytest.approx(want_odds, rel=1e-9)
        assert loss[i].item() == pytest.approx(want_loss, rel=1e-9)
    assert loss.shape == (4,)


def test_odds_ratio_loss_symmetries() -> None:
    lp = torch.tensor([-0.1, -1.0, -7.0])
    loss, log_odds = odds_ratio_loss(lp, lp.clone())
    assert torch.allclose(log_odds, torch.zeros(3))
    assert torch.allclose(loss, torch.full((3,), math.log(2)))
    a, b = torch.tensor([-0.2, -3.0]), torch.tensor([-1.0, -0.4])
    _, forward = odds_ratio_loss(a, b)
    _, backward = odds_ratio_loss(b, a)
    assert torch.allclose(forward, -backward)
    assert not torch.allclose(forward, torch.zeros(2))


def test_log1mexp_accuracy_and_extremes() -> None:
    x = torch.tensor([-0.01, -0.3, -0.6931, -0.7, -2.0, -10.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-10)
    extreme = log1mexp(torch.tensor([-1e-12, 0.0, -200.0, -1e4, -math.inf]))
    assert torch.isfinite(extreme).all()
    assert extreme[2].item() == pytest.approx(0.0, abs=1e-30)  # log(1 - e^-200) = -e^-200
    assert extreme[0].item() < -13  # clamped, still very negative
    lp = torch.tensor([-1e-12, 0.0, -1e-3, -50.0], requires_grad=True)
    log1mexp(lp).sum().backward()
    assert lp.grad is not None and torch.isfinite(lp.grad).all()


def test_log1mexp_float32_precision_at_both_ends() -> None:
    # where 1 - exp(x) cancels (x near 0) or exp(x) vanishes below float32's epsilon (x very negative)
    got = log1mexp(torch.tensor([-1e-5, -40.0]))
    assert got[0].item() == pytest.approx(math.log(-math.expm1(-1e-5)), rel=1e-6)
    assert got[1].item() == pytest.approx(-math.exp(-40.0), rel=1e-5)


def test_odds_ratio_gradients_finite_when_logps_reach_zero() -> None:
    chosen = torch.tensor([0.0, -1e-9, -0.5], requires_grad=True)
    rejected = torch.tensor([-1.0, 0.0, -1e-12], requires_grad=True)
    loss, log_odds = odds_ratio_loss(chosen, rejected)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(log_odds).all()
    assert chosen.grad is not None and torch.isfinite(chosen.grad).all()
    assert rejected.grad is not None and torch.isfinite(rejected.grad).all()


def test_sequence_logps_masks_prompt_and_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, -100], [-100, 0, 4, 4]])
    mask = labels != -100
    mask[0, 0] = False  # a prompt token
    mean, token = sequence_logps(logits, labels, mask)
    logp = torch.log_softmax(logits, -1)
    assert mean[0].item() == pytest.approx((logp[0, 1, 2] + logp[0, 2, 3]).item() / 2, rel=1e-6)
    assert mean[1].item() == pytest.approx((logp[1, 1, 0] + logp[1, 2, 4] + logp[1, 3, 4]).item() / 3, rel=1e-6)
    assert token[0, 0].item() == 0.0 and token[1, 0].item() == 0.0


def _full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_token = F.kl_div(
        torch.log_softmax(student_logits, -1),
        torch.log_softmax(teacher_logits, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return (per_token * mask).sum(-1) / mask.sum(-1)


def test_topk_kl_with_full_vocab_equals_kl_div() -> None:
    torch.manual_seed(1)
    b, t, v = 3, 6, 11
    student, teacher = torch.randn(b, t, v) * 2, torch.randn(b, t, v) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 4:] = False
    teacher_logps = torch.log_softmax(teacher, -1)
    ids = torch.stack([torch.randperm(v) for _ in range(b * t)]).view(b, t, v)  # any order of the k = V ids
    got = topk_kl(student, ids, teacher_logps.gather(-1, ids), mask)
    want = _full_kl(student, teacher, mask.float())
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert (want > 0.1).all()


def test_topk_kl_zero_when_student_is_teacher_with_rest_bucket() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 50)
    top = torch.log_softmax(logits, -1).topk(8, dim=-1)
    mask = torch.ones(2, 5)
    kl = topk_kl(logits, top.indices, top.values, mask)
    assert torch.allclose(kl, torch.zeros(2), atol=1e-6)
    # and the rest bucket matters: a student putting more mass outside the top-k is penalised
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top.indices, False)
    moved = torch.where(outside, logits + 3.0, logits)
    assert (topk_kl(moved, top.indices, top.values, mask) > 1e-3).all()


def test_topk_kl_rest_bucket_by_hand() -> None:
    # V = 4, k = 2: the student puts more mass on the teacher's top-2 than the teacher does, so the top-k
    # buckets alone would give a negative "KL"; the rest bucket makes it a proper divergence
    teacher = [0.5, 0.2, 0.2, 0.1]
    student = [0.6, 0.3, 0.05, 0.05]
    ids = torch.tensor([[[0, 1]]])
    teacher_lp = torch.tensor([[[math.log(0.5), math.log(0.2)]]])
    logits = torch.tensor([[[math.log(p) for p in student]]])
    buckets_t, buckets_s = [0.5, 0.2, 0.3], [0.6, 0.3, 0.1]
    want = sum(pt * math.log(pt / ps) for pt, ps in zip(buckets_t, buckets_s, strict=True))
    got = topk_kl(logits, ids, teacher_lp, torch.ones(1, 1))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert want > 0 > sum(pt * math.log(pt / ps) for pt, ps in zip(teacher[:2], student[:2], strict=True))


def test_topk_kl_padded_slots_are_no_bucket() -> None:
    """A row with k = 2 in a batch padded to k = 3 (id 0, log-prob -inf) gets the same KL as on its own:
    the student's mass at the padding id must not count into its top-k sum."""
    torch.manual_seed(5)
    logits = torch.randn(1, 2, 8, requires_grad=True)
    top = torch.log_softmax(torch.randn(1, 2, 8), -1).topk(2, dim=-1)
    alone = topk_kl(logits, top.indices, top.values, torch.ones(1, 2))
    ids = torch.cat([top.indices, torch.zeros(1, 2, 1, dtype=torch.long)], dim=-1)
    lps = torch.cat([top.values, torch.full((1, 2, 1), -math.inf)], dim=-1)
    padded = topk_kl(logits, ids, lps, torch.ones(1, 2))
    assert torch.allclose(padded, alone, atol=1e-6)
    padded.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_topk_kl_nonnegative_random_and_float16_teacher() -> None:
    torch.manual_seed(3)
    for _ in range(20):
        student, teacher = torch.randn(4, 7, 30) * 3, torch.randn(4, 7, 30) * 3
        top = torch.log_softmax(teacher, -1).topk(5, dim=-1)
        mask = torch.rand(4, 7) > 0.3
        kl = topk_kl(student, top.indices, top.values, mask)
        assert (kl >= -1e-6).all()
        half = topk_kl(student, top.indices, top.values.half(), mask)
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert torch.allclose(half, kl, atol=1e-2)


def test_topk_kl_ignores_padding_at_masked_positions() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 10)
    top = torch.log_softmax(torch.randn(1, 3, 10), -1).topk(3, dim=-1)
    ids, lps = top.indices.clone(), top.values.clone()
    want = topk_kl(logits[:, :2], ids[:, :2], lps[:, :2], torch.ones(1, 2))
    ids[0, 2], lps[0, 2] = -1, math.nan
    logits.requires_grad_(True)
    got = topk_kl(logits, ids, lps, torch.tensor([[1, 1, 0]]))
    got.sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _batch(seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    b, t, tr, v, k = 4, 6, 5, 13, 4
    chosen_labels = torch.randint(0, v, (b, t))
    chosen_mask = torch.ones(b, t, dtype=torch.bool)
    chosen_mask[:, :2] = False  # prompt
    rejected_mask = torch.ones(b, tr, dtype=torch.bool)
    rejected_mask[:, :2] = False
    top = torch.log_softmax(torch.randn(b, t, v) * 2, -1).topk(k, dim=-1)
    return {
        "chosen_logits": torch.randn(b, t, v, requires_grad=True),
        "chosen_labels": chosen_labels,
        "chosen_mask": chosen_mask,
        "rejected_logits": torch.randn(b, tr, v, requires_grad=True),
        "rejected_labels": torch.randint(0, v, (b, tr)),
        "rejected_mask": rejected_mask,
        "has_rejected": torch.tensor([True, False, True, False]),
        "topk_ids": top.indices,
        "topk_logprobs": top.values.half(),
        "has_topk": torch.tensor([True, True, False, False]),
    }


def test_dorpo_loss_mixed_batch_equals_components_by_hand() -> None:
    x = _batch()
    config = DorpoConfig(lambda_or=0.3, lambda_kl=0.7)
    out = dorpo_loss(config=config, **x)
    lp_c, _ = sequence_logps(x["chosen_logits"], x["chosen_labels"], x["chosen_mask"])
    lp_r, _ = sequence_logps(x["rejected_logits"], x["rejected_labels"], x["rejected_mask"])
    nll = -lp_c.mean()
    or_rows, log_odds = odds_ratio_loss(lp_c, lp_r)
    or_loss = (or_rows[0] + or_rows[2]) / 2  # only the rows with a rejected answer
    kl_rows = topk_kl(x["chosen_logits"], x["topk_ids"], x["topk_logprobs"], x["chosen_mask"])
    kl = (kl_rows[0] + kl_rows[1]) / 2  # only the rows with teacher top-k
    want = nll + 0.3 * or_loss + 0.7 * kl
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.nll == pytest.approx(nll.item(), rel=1e-5)
    assert out.or_loss == pytest.approx(or_loss.item(), rel=1e-5)
    assert out.kl == pytest.approx(kl.item(), rel=1e-5)
    assert out.log_odds == pytest.approx(((log_odds[0] + log_odds[2]) / 2).item(), rel=1e-5)
    assert set(out.metrics()) == {"loss", "nll", "or_loss", "log_odds", "kl", "pref_acc"}
    assert out.metrics()["loss"] == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()
    grad_c, grad_r = x["chosen_logits"].grad, x["rejected_logits"].grad
    assert grad_c is not None and grad_r is not None
    assert torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    # rows without a rejected answer contribute no OR term: their rejected logits get no gradient
    assert grad_r[1].abs().max() == 0 and grad_r[3].abs().max() == 0
    assert grad_r[0].abs().max() > 0


def test_rows_without_rejected_do_not_change_the_loss() -> None:
    x = _batch()
    out = dorpo_loss(config=DorpoConfig(), **x)
    with torch.no_grad():
        x["rejected_logits"][1] += torch.randn_like(x["rejected_logits"][1]) * 10
        x["rejected_labels"][3] = 0
    again = dorpo_loss(config=DorpoConfig(), **x)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_no_topk_rows_gives_zero_kl() -> None:
    x = _batch()
    x["has_topk"] = torch.zeros(4, dtype=torch.bool)
    config = DorpoConfig(lambda_or=0.5, lambda_kl=2.0)
    out = dorpo_loss(config=config, **x)
    assert out.kl == 0.0
    assert out.loss.item() == pytest.approx(out.nll + 0.5 * out.or_loss, rel=1e-6)
    without = {key: val for key, val in x.items() if key not in ("topk_ids", "topk_logprobs", "has_topk")}
    assert dorpo_loss(config=config, **without).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_chosen_only_batch_is_plain_nll() -> None:
    x = _batch()
    out = dorpo_loss(x["chosen_logits"], x["chosen_labels"], x["chosen_mask"], DorpoConfig())
    lp_c, _ = sequence_logps(x["chosen_logits"], x["chosen_labels"], x["chosen_mask"])
    assert out.loss.item() == pytest.approx(-lp_c.mean().item(), rel=1e-6)
    assert out.or_loss == 0.0 and out.kl == 0.0
    assert math.isnan(out.pref_acc) and math.isnan(out.log_odds)
    out.loss.backward()
    assert torch.isfinite(x["chosen_logits"].grad).all()


def test_pref_acc_on_crafted_case() -> None:
    v = 4
    labels = torch.tensor([[0, 1], [2, 3], [1, 1]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    good = F.one_hot(labels, v).float() * 5.0  # confident on its labels
    flat = torch.zeros(3, 2, v)
    # row 0: chosen confident, rejected flat -> right; row 1: the reverse -> wrong; row 2: right, but no rejected
    chosen_logits = torch.stack([good[0], flat[1], good[2]])
    rejected_logits = torch.stack([flat[0], good[1], flat[2]])
    for has_rejected, expected in (([True, True, False], 0.5), ([True, False, True], 1.0)):
        out = dorpo_loss(
            chosen_logits,
            labels,
            mask,
            DorpoConfig(),
            rejected_logits,
            labels,
            mask,
            has_rejected=torch.tensor(has_rejected),
        )
        assert out.pref_acc == pytest.approx(expected)
    assert out.log_odds > 0


@pytest.mark.parametrize(
    "kwargs", [{"lambda_or": -1}, {"lambda_kl": -0.5}, {"lambda_or": math.nan}, {"lambda_kl": math.inf}]
)
def test_config_rejects_bad_weights(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="lambda_"):
        DorpoConfig(**kwargs)


def test_shape_mismatches_raise_value_error() -> None:
    x = _batch()
    with pytest.raises(ValueError, match="chosen_labels"):
        dorpo_loss(x["chosen_logits"], x["chosen_labels"][:, 1:], x["chosen_mask"], DorpoConfig())
    with pytest.raises(ValueError, match="topk_ids"):
        dorpo_loss(
            x["chosen_logits"],
            x["chosen_labels"],
            x["chosen_mask"],
            DorpoConfig(),
            topk_ids=x["topk_ids"][:, :, :2],
            topk_logprobs=x["topk_logprobs"],
        )
    with pytest.raises(ValueError, match="has_rejected"):
        dorpo_loss(
            x["chosen_logits"],
            x["chosen_labels"],
            x["chosen_mask"],
            DorpoConfig(),
            x["rejected_logits"],
            x["rejected_labels"],
            x["rejected_mask"],
            has_rejected=torch.ones(3),
        )
    with pytest.raises(ValueError, match="rejected batch"):
        dorpo_loss(
            x["chosen_logits"],
            x["chosen_labels"],
            x["chosen_mask"],
            DorpoConfig(),
            x["rejected_logits"][:2],
            x["rejected_labels"][:2],
            x["rejected_mask"][:2],
        )
    with pytest.raises(ValueError, match="chosen_logps"):
        odds_ratio_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="topk_ids"):
        topk_kl(x["chosen_logits"], x["topk_ids"][:, :3], x["topk_logprobs"], x["chosen_mask"])
    with pytest.raises(ValueError, match="has_topk"):
        dorpo_loss(
            x["chosen_logits"],
            x["chosen_labels"],
            x["chosen_mask"],
            DorpoConfig(),
            has_topk=torch.ones(4, dtype=torch.bool),
        )
