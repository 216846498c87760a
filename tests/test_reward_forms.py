"""The reward forms of saereward.rl.reward and the truncation audit: hand-computed values."""

from __future__ import annotations

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.features.baseline import RewardBaseline, fit_baseline
from saereward.rl.audit import truncation_gains
from saereward.rl.reward import (
    REWARD_FORMS,
    completion_mech_reward,
    group_advantages,
    mech_credit,
    shaping_credits,
    token_advantages,
    within_group_corr,
)
from saereward.stats import resample_indices

FIXED = ("decoupled", "position", "shaped")


def _baseline(pos: tuple[float, ...] = (2.0, 0.0), tail: float = 0.0, sd: float = 1.0) -> RewardBaseline:
    return RewardBaseline(
        pos_mean=pos, tail_mean=tail, mean=0.5, sd_raw=2.0, sd=sd, mean_len=2.0, n_completions=10, n_tokens=20
    )


def test_fit_baseline_by_hand() -> None:
    scores = [torch.tensor([1.0, 3.0, 5.0]), torch.tensor([3.0, 1.0]), torch.tensor([2.0])]
    b = fit_baseline(scores, min_count=2)
    # positions reached by >= 2 completions: 0 (3 of them) and 1 (2); position 2 is the tail
    assert b.pos_mean == pytest.approx((2.0, 2.0))
    assert b.tail_mean == pytest.approx(5.0)
    assert b.mean == pytest.approx(15 / 6)
    centred = torch.tensor([-1.0, 1.0, 0.0, 1.0, -1.0, 0.0])
    assert b.sd == pytest.approx(float(centred.std(unbiased=False)))
    assert b.mean_len == pytest.approx(2.0)
    assert b.position_means(4).tolist() == pytest.approx([2.0, 2.0, 5.0, 5.0])
    again = RewardBaseline.from_dict(b.to_dict())
    assert again == b


def test_position_form_by_hand() -> None:
    outcome = torch.tensor([1.0, 0.0])
    mech = torch.tensor([[3.0, 1.0, 0.0], [2.0, 9.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    lm = torch.tensor([[True, True, True], [True, True, True]])  # row 0 ends with an unscored end token
    adv, total = token_advantages(
        outcome, mech, mask, 2, 0.1, loss_mask=lm, form="position", baseline=_baseline(), clip=3.0
    )
    # s = mech - pos_mean (2, 0, tail 0), / sd 1, clipped to ±3: row 0 (1, 1, -), row 1 (0, 3, -1)
    A = torch.tensor([1.0, -1.0]) / (0.5 + 1e-4) * 0.5
    u = torch.tensor([[0.1, 0.1, 0.0], [0.0, 0.3, -0.1]])
    torch.testing.assert_close(adv, A[:, None] + u)
    torch.testing.assert_close(total, outcome + u.sum(1) / 2.0)  # fixed denominator L_ref = 2


def test_decoupled_form_uses_the_overall_reference() -> None:
    mech = torch.tensor([[4.5, 0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    u = mech_credit("decoupled", mech, mask, 0.2, _baseline(), clip=1.5)
    # (4.5 - 0.5) / 2 = 2 -> clipped to 1.5; (0.5 - 0.5) / 2 = 0
    torch.testing.assert_close(u, torch.tensor([[0.3, 0.0]]))


def test_shaped_credits_by_hand_and_sum_to_zero() -> None:
    phi = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, -1.0, 4.0, 0.0]])
    lm = torch.tensor([[True, True, True, False], [True, True, True, False]])
    c = shaping_credits(phi, lm)
    # row 0: 1, 3-1, 0-3 (end token, terminal 0); row 1: 2, -3, 5, and the last token also pays -4
    torch.testing.assert_close(c, torch.tensor([[1.0, 2.0, -3.0, 0.0], [2.0, -3.0, 1.0, 0.0]]))
    torch.manual_seed(0)
    mech = torch.randn(6, 9) * 5
    lengths = torch.tensor([1, 2, 5, 9, 3, 7])
    lm = torch.arange(9)[None] < lengths[:, None]
    scored = lm & (torch.arange(9)[None] < (lengths - 1).clamp_min(1)[:, None])
    u = mech_credit("shaped", mech, scored, 0.3, _baseline(), loss_mask=lm)
    torch.testing.assert_close(u.sum(1), torch.zeros(6), atol=1e-6, rtol=0)
    assert completion_mech_reward("shaped", mech, scored, 0.3, _baseline(), loss_mask=lm).abs().max() < 1e-6


@pytest.mark.parametrize("form", FIXED)
def test_all_wrong_group_keeps_the_mech_term_at_order_lambda(form: str) -> None:
    torch.manual_seed(1)
    lam, clip = 0.1, 3.0
    outcome = torch.zeros(8)  # two groups of 4, every completion wrong: outcomes tie
    mech = torch.randn(8, 12) * 20
    mask = torch.ones(8, 12, dtype=torch.bool)
    adv, _ = token_advantages(outcome, mech, mask, 4, lam, form=form, baseline=_baseline(), clip=clip)  # type: ignore[arg-type]
    bound = lam * clip * (2 if form == "shaped" else 1)
    assert adv.abs().max() <= bound + 1e-6
    # mechreward's form: λ divides out, the mech mean becomes a unit-variance advantage
    old, _ = token_advantages(outcome, mech, mask, 4, lam, form="mechreward")
    per_completion = old[:, 0] - lam * 0  # the trajectory part dominates
    assert per_completion.view(2, 4).std(1, unbiased=False).min() > 0.9


def test_mechreward_form_pays_the_one_token_completion() -> None:
    """The collapse mechanism: an all-wrong group of lengths (36, 30, 12, 1) under a score that is high
    on the first tokens. mechreward's form ranks the 1-token completion first; the position form
    gives every completion the same expected credit."""
    profile = torch.full((36,), -0.5)
    profile[0], profile[1], profile[2] = 2.8, 8.3, -10.0
    lengths = torch.tensor([36, 30, 12, 1])
    mask = torch.arange(36)[None] < lengths[:, None]
    mech = profile.expand(4, 36).where(mask, torch.zeros(()))
    outcome = torch.zeros(4)
    for lam in (0.1, 0.01):
        adv, _ = token_advantages(outcome, mech, mask, 4, lam, form="mechreward")
        assert int(adv[:, 0].argmax()) == 3 and adv[3, 0] > 1.5
    g = torch.Generator().manual_seed(0)
    base = [profile[: int(n)] + 0.1 * torch.randn(int(n), generator=g) for n in lengths for _ in range(10)]
    M = completion_mech_reward("position", mech, mask, 0.1, fit_baseline(base, min_count=5))
    assert M.abs().max() < 0.02  # every completion sits on the base profile: no credit either way


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completions whose score is high at the first positions (as SmolLM2's pack is)."""
    g = torch.Generator().manual_seed(seed)
    T = 40
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    full = torch.arange(T)[None] < lengths[:, None]
    scored = full & (torch.arange(T)[None] < (lengths - 1)[:, None])  # the last token is the end token
    profile = torch.full((T,), -0.5)
    profile[:3] = torch.tensor([2.8, 8.3, -10.0])
    correct = (torch.rand(n, generator=g) < 0.3).float()
    mech = profile + torch.randn(n, T, generator=g) * 2 + correct[:, None] * 0.8
    return mech.where(full, torch.zeros(())), full, scored, correct


def test_position_form_gains_nothing_from_cutting_where_early_positions_score_high() -> None:
    mech, full, scored, correct = _synthetic(2000, 0)
    fit = [mech[i][scored[i]] for i in range(1000)]
    b = fit_baseline(fit)
    half = slice(1000, 2000)
    args = (mech[half], full[half], scored[half], correct[half], 0.1, b)
    for form in ("position", "shaped"):
        r = truncation_gains(form, *args, cuts=(1, 2, 5, 10))
        for k in ("1", "2", "5", "10"):
            assert abs(r["cut"][k]["gain_sigma"]) <= 0.1, (form, k, r["cut"][k])
        assert abs(r["pad"]["gain_sigma"]) < 1e-6
    old = truncation_gains("mechreward", *args, cuts=(1, 2, 5))
    assert old["cut"]["2"]["gain_sigma"] > 0.1  # cutting after the high second token pays
    assert old["max_cut_gain_sigma"] > 0.1


def test_truncation_gain_cis_resample_whole_questions() -> None:
    """Each gain's CI brackets it; copies of one question's completion add no evidence under the
    question bootstrap, so its CI is as wide as the single completions', unlike a per-row bootstrap."""
    mech, full, scored, correct = _synthetic(300, 1)
    b = fit_baseline([mech[i][scored[i]] for i in range(150)])
    rep = torch.arange(150, 300).repeat_interleave(4)  # each validation completion four times
    args = (mech[rep], full[rep], scored[rep], correct[rep], 0.1, b)
    by_q = resample_indices(len(rep), rep.tolist(), 500, 0)
    by_row = resample_indices(len(rep), None, 500, 0)
    one = resample_indices(150, None, 500, 0)
    clustered = truncation_gains("mechreward", *args, cuts=(2,), resamples=by_q)["cut"]["2"]
    rowwise = truncation_gains("mechreward", *args, cuts=(2,), resamples=by_row)["cut"]["2"]
    val = slice(150, 300)
    single_args = (mech[val], full[val], scored[val], correct[val], 0.1, b)
    single = truncation_gains("mechreward", *single_args, cuts=(2,), resamples=one)["cut"]["2"]
    lo, hi = clustered["gain_sigma_ci"]
    assert lo <= clustered["gain_sigma"] <= hi
    width = hi - lo
    assert width > 1.5 * (rowwise["gain_sigma_ci"][1] - rowwise["gain_sigma_ci"][0])
    assert width == pytest.approx(single["gain_sigma_ci"][1] - single["gain_sigma_ci"][0], rel=0.35)
    assert truncation_gains("mechreward", *args, cuts=(2,))["cut"]["2"]["gain_sigma_ci"] is None
    again = truncation_gains("mechreward", *args, cuts=(2,), resamples=by_q)["cut"]["2"]["gain_sigma_ci"]
    assert again == clustered["gain_sigma_ci"]


def test_forms_registry_and_errors() -> None:
    assert set(REWARD_FORMS) == {"mechreward", "decoupled", "position", "shaped"}
    mech = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(SaeRewardError, match="needs a reward baseline"):
        token_advantages(torch.tensor([0.0, 1.0]), mech, mask, 2, 0.1, form="position")
    with pytest.raises(SaeRewardError, match="unknown reward form"):
        token_advantages(torch.tensor([0.0, 1.0]), mech, mask, 2, 0.1, form="nope")  # type: ignore[arg-type]
    bad = RewardBaseline((0.0,), 0.0, 0.0, 1.0, 0.0, 2.0, 1, 1)
    with pytest.raises(SaeRewardError, match="sd = 0"):
        mech_credit("position", mech, mask, 0.1, bad)


def test_within_group_corr() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    assert within_group_corr(x, 2 * x + 5, 4) == pytest.approx(1.0)
    assert within_group_corr(x, -x, 4) == pytest.approx(-1.0)
    assert within_group_corr(x, torch.zeros(8), 4) != within_group_corr(x, torch.zeros(8), 4)  # NaN
    assert group_advantages(torch.zeros(4), 4).abs().max() == 0


def test_shaped_credits_telescope_over_a_mask_with_gaps() -> None:
    phi = torch.tensor([[1.0, 5.0, 2.0, 4.0]])
    lm = torch.tensor([[True, False, True, True]])
    c = shaping_credits(phi, lm)
    # loss positions 0, 2, 3: credits 1, 2 - 1, (4 - 2) - 4; position 1 carries nothing
    torch.testing.assert_close(c, torch.tensor([[1.0, 0.0, 1.0, -2.0]]))
    assert float(c.sum()) == 0.0


def test_one_channel_encoding_round_trips_and_keyed_groups_match_contiguous() -> None:
    """The verl channel (credits before the last token, outcome on it) splits back exactly; groups named
    by key give :func:`group_advantages` of contiguous groups, in any row order."""
    from saereward.rl.reward import (
        group_advantages,
        keyed_group_advantages,
        outcome_last_token_rewards,
        split_last_token_rewards,
    )

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 1, 4])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    credits = torch.randn(4, 6, generator=g) * (torch.arange(6)[None, :] < (lengths - 1)[:, None])
    outcome = torch.tensor([1.0, 0.0, 0.5, 1.0])
    r = outcome_last_token_rewards(outcome, credits, lengths)
    o2, u2 = split_last_token_rewards(r, mask)
    assert torch.equal(o2, outcome) and torch.equal(u2, credits)
    with pytest.raises(ValueError, match="last token carries a credit"):
        outcome_last_token_rewards(outcome, credits + mask.float(), lengths)
    x = torch.randn(6, generator=g)
    want = group_advantages(x, 3)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    got = keyed_group_advantages(x[perm], [int(i) // 3 for i in perm])
    assert torch.allclose(got, want[perm], atol=1e-6)
    assert keyed_group_advantages(torch.tensor([2.0]), ["solo"]).item() == 0.0
