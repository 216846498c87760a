"""Held-out SAE evaluation: FVU/MSE/L0/coverage on activations (streaming == one-shot, SAELens parity)
and CE/KL recovered with the SAE spliced into a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.sae.coder import SAEConfig, TopKSAE
from saereward.sae.evaluate import ce_kl_recovered, evaluate_sae
from saereward.sae.kernels import use_kernels
from tiny_models import BOS_ID, D_MODEL, PAD_ID, VOCAB, make_tiny


@pytest.fixture(autouse=True)
def _exact_kernels():  # noqa: ANN202
    """References below call ``sae(x)`` directly; use the exact path the evaluator uses by default."""
    with use_kernels("eager"):
        yield


def identity_sae(d: int = D_MODEL) -> TopKSAE:
    """An exact TopK autoencoder: latents ``[x, -x]``; the d nonnegative ones are the top-d, so recon == x."""
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=d_sae, k=k), seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_(0.0, 0.5)
    return sae


# --------------------------------------------------------------------------------------------------
# evaluate_sae
# --------------------------------------------------------------------------------------------------


def test_perfect_reconstruction_has_zero_fvu() -> None:
    x = 3.0 * torch.randn(200, D_MODEL) + 10.0
    m = evaluate_sae(identity_sae(), [x[:120], x[120:]])
    assert m["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert m["variance_explained"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(0.0, abs=1e-10) and m["nmse"] == pytest.approx(0.0, abs=1e-10)
    assert m["cos_sim"] == pytest.approx(1.0)
    assert m["n_tokens"] == 200 and m["l0"] <= D_MODEL


def test_reconstructing_the_mean_has_fvu_one() -> None:
    d = 8
    x = torch.randn(300, d, dtype=torch.float64) * 2 + 50.0  # large mean: the shifted sums must hold up
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=16, k=2), dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(0))
    m = evaluate_sae(sae, x.split(70))
    assert m["fvu"] == pytest.approx(1.0, abs=1e-9)
    assert m["variance_explained"] == pytest.approx(0.0, abs=1e-9)


def test_metrics_match_a_direct_computation() -> None:
    sae = random_sae()
    x = torch.randn(500, 16) * 2 + 1
    with torch.no_grad():
        out = sae(x)
    err = (x - out.recon).pow(2).sum(-1)
    fires = torch.zeros(64, dtype=torch.bool)
    fires[out.top_indices[out.top_acts > 0]] = True
    m = evaluate_sae(sae, [x], return_fire_counts=True)
    assert m["fvu"] == pytest.approx(float(err.sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert m["mse"] == pytest.approx(float(err.mean() / 16), rel=1e-5)
    assert m["mse_per_token"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert m["nmse"] == pytest.approx(float((err / x.pow(2).sum(-1)).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((out.top_acts > 0).sum(-1).float().mean()))
    assert m["coverage"] == pytest.approx(float(fires.float().mean()))
    assert m["fire_counts"].sum() == (out.top_acts > 0).sum()


def test_fvu_equals_one_minus_saelens_explained_variance() -> None:
    pytest.importorskip("sae_lens")
    from sae_lens.evals import ExplainedVarianceCalculator

    sae = random_sae(seed=3)
    batches = [torch.randn(n, 16) * 3 + 2 for n in (50, 13, 80)]
    calc = ExplainedVarianceCalculator()
    with torch.no_grad():
        for b in batches:
            calc.add_batch(sae_output=sae(b).recon, hidden_acts=b)
    assert evaluate_sae(sae, batches)["fvu"] == pytest.approx(1.0 - calc.compute(), rel=1e-6)


def test_streaming_equals_one_shot() -> None:
    sae = random_sae(seed=1)
    x = torch.randn(100, 16) + 3
    one = evaluate_sae(sae, [x], return_fire_counts=True)
    streamed = evaluate_sae(sae, (c for c in x.split([7, 1, 50, 42])), return_fire_counts=True)
    assert torch.equal(one.pop("fire_counts"), streamed.pop("fire_counts"))
    assert one.keys() == streamed.keys()
    # The accumulators are float64, but the SAE's fp32 GEMMs round differently for a 1-row and a
    # 100-row batch (different blocking), so per-token recon differs at fp32 precision (~1e-7).
    for key in one:
        assert streamed[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    # [B, T, d] batches are flattened
    assert evaluate_sae(sae, [x.reshape(10, 10, 16)])["fvu"] == pytest.approx(one["fvu"], rel=1e-6)


def test_dead_and_coverage_on_handcrafted_batches() -> None:
    # k=1 over latents [x, -x] fires the latent of the largest |x_i| with sign; x = 0 selects a zero.
    sae = TopKSAE(SAEConfig(d_in=4, d_sae=8, k=1))
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    batches = [torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]), torch.zeros(1, 4)]
    m = evaluate_sae(sae, batches, return_fire_counts=True)
    assert m["fire_counts"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]  # latents 0 and 4+2
    assert m["coverage"] == m["alive_frac"] == pytest.approx(0.25)
    assert m["dead_pct"] == pytest.approx(75.0)
    assert m["l0"] == pytest.approx(2 / 3)  # the all-zero token's top-1 pick is 0 after ReLU
    assert m["n_tokens"] == 3


def test_evaluate_errors() -> None:
    with pytest.raises(SaeRewardError, match="width 8 but the SAE's d_in is 16"):
        evaluate_sae(random_sae(), [torch.randn(4, 8)])
    with pytest.raises(SaeRewardError, match="no activations"):
        evaluate_sae(random_sae(), [])


# --------------------------------------------------------------------------------------------------
# ce_kl_recovered
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():  # noqa: ANN201
    model, _ = make_tiny("llama")
    model.requires_grad_(False)
    return model


def _ids(b: int, t: int, seed: int = 0, bos: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    if bos:
        ids[:, 0] = BOS_ID
    return ids


def test_identity_sae_recovers_everything(llama) -> None:  # noqa: ANN001
    m = ce_kl_recovered(llama, None, identity_sae(), 1, _ids(4, 12), batch_size=2)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_zero"] > 0.01 and m["ce_zero"] != m["ce_clean"]
    # BOS excluded: 11 scored positions per row for KL, 11 CE terms (position 0 predicts nothing scored)
    assert m["n_tokens_kl"] == 4 * 11 and m["n_tokens"] == 4 * 10 and m["n_sequences"] == 4


def test_random_sae_recovers_less(llama) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D_MODEL, d_sae=128, k=8), seed=0)
    m = ce_kl_recovered(llama, None, sae, -2, _ids(2, 10))
    assert m["kl_sae"] > 1e-4 and math.isfinite(m["ce_loss_recovered"]) and m["kl_recovered"] < 1.0
    assert m["kl_recovered"] == pytest.approx(1 - m["kl_sae"] / m["kl_zero"])
    assert m["ce_loss_recovered"] == pytest.approx(
        (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"])
    )


def test_exclude_bos_is_optional(llama) -> None:  # noqa: ANN001
    m = ce_kl_recovered(llama, None, identity_sae(), 0, _ids(2, 6), exclude_bos=False)
    assert m["n_tokens_kl"] == 12 and m["n_tokens"] == 10


def test_padding_is_excluded(llama) -> None:  # noqa: ANN001
    """A left-padded batch scores exactly the tokens of its rows run one at a time, without padding."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=D_MODEL, d_sae=128, k=16), seed=1)
    a, b = _ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0]
    ids = torch.full((2, 9), PAD_ID)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1
    padded = ce_kl_recovered(llama, None, sae, 2, [{"input_ids": ids, "attention_mask": mask}])
    separate = ce_kl_recovered(llama, None, sae, 2, [a[None], b[None]])
    assert padded["n_tokens"] == separate["n_tokens"] == 7 + 3
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert padded[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-5), key


def test_skip_first_leaves_each_rows_first_positions_out(llama) -> None:  # noqa: ANN001
    """skip_first=1 treats each row's first real position as BOS is treated (neither spliced nor
    scored), padding included. skip_first counts real positions, a BOS among them."""
    sae = TopKSAE(SAEConfig(d_in=D_MODEL, d_sae=128, k=16), seed=1)
    ids = _ids(3, 8, seed=4)  # BOS first
    as_bos = ce_kl_recovered(llama, None, sae, 1, ids)
    as_first = ce_kl_recovered(llama, None, sae, 1, ids, exclude_bos=False, skip_first=1)
    for key in ("ce_sae", "kl_sae", "n_tokens", "n_tokens_kl"):
        assert as_first[key] == pytest.approx(as_bos[key], rel=1e-6, abs=1e-7), key
    both = ce_kl_recovered(llama, None, sae, 1, ids, skip_first=1)
    assert both["n_tokens_kl"] == as_bos["n_tokens_kl"] == 3 * 7 and both["n_tokens"] == 3 * 6
    two = ce_kl_recovered(llama, None, sae, 1, ids, skip_first=2)
    assert two["n_tokens_kl"] == 3 * 6 and two["n_tokens"] == 3 * 5
    a, b = _ids(1, 7, seed=5, bos=False)[0], _ids(1, 4, seed=6, bos=False)[0]
    padded_ids = torch.full((2, 7), PAD_ID)
    mask = torch.zeros(2, 7, dtype=torch.long)
    padded_ids[0], mask[0] = a, 1
    padded_ids[1, 3:], mask[1, 3:] = b, 1
    batch = [{"input_ids": padded_ids, "attention_mask": mask}]
    padded = ce_kl_recovered(llama, None, sae, 1, batch, exclude_bos=False, skip_first=1)
    separate = ce_kl_recovered(llama, None, sae, 1, [a[None], b[None]], exclude_bos=False, skip_first=1)
    assert padded["n_tokens_kl"] == separate["n_tokens_kl"] == 6 + 3
    for key in ("ce_sae", "kl_sae"):
        assert padded[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-5), key
    with pytest.raises(SaeRewardError, match="skip_first must be >= 0"):
        ce_kl_recovered(llama, None, sae, 1, ids, skip_first=-1)


class _ByteTokenizer:
    """Minimal tokenizer stand-in: bytes mod the tiny vocab, BOS first, left padding."""

    bos_token_id = BOS_ID

    def __call__(self, texts, return_tensors, padding, truncation, max_length):  # noqa: ANN001, ANN204
        rows = [[BOS_ID] + [3 + c % (VOCAB - 3) for c in t.encode()][: max_length - 1] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD_ID)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_texts_with_a_tokenizer(llama) -> None:  # noqa: ANN001
    texts = ["two plus two is four", "hi", "the quick brown fox jumps"]
    m = ce_kl_recovered(llama, _ByteTokenizer(), identity_sae(), 1, texts, batch_size=2, max_length=16)
    assert m["n_sequences"] == 3 and m["n_tokens_kl"] == 15 + 2 + 15
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(SaeRewardError, match="no tokenizer"):
        ce_kl_recovered(llama, None, identity_sae(), 1, texts)


def test_hook_is_removed_even_on_error(llama) -> None:  # noqa: ANN001
    ids = _ids(1, 6)
    before = llama(ids).logits
    with pytest.raises(SaeRewardError, match="SAE d_in 16 does not match model width 64 at layer 1"):
        ce_kl_recovered(llama, None, random_sae(), 1, ids)
    ce_kl_recovered(llama, None, identity_sae(), 1, ids)
    assert torch.equal(llama(ids).logits, before)
    assert all(not blk._forward_hooks for blk in llama.model.layers)


def test_recovered_cis_resample_whole_sequences(llama) -> None:  # noqa: ANN001
    """The CE/KL CIs bracket the pooled scores, follow their seed, and draw sequences, not tokens:
    copies of one sequence give every resample the same pooled ratio, a CI of zero width."""
    sae = TopKSAE(SAEConfig(d_in=D_MODEL, d_sae=128, k=8), seed=0)
    m = ce_kl_recovered(llama, None, sae, 1, _ids(6, 10, seed=3), n_boot=300, seed=5)
    assert (m["n_boot"], m["seed"], m["confidence"], m["bootstrap_unit"]) == (300, 5, 0.95, "sequence")
    for key in ("ce_loss_recovered", "kl_recovered"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and lo < hi, key
    again = ce_kl_recovered(llama, None, sae, 1, _ids(6, 10, seed=3), n_boot=300, seed=5)
    other = ce_kl_recovered(llama, None, sae, 1, _ids(6, 10, seed=3), n_boot=300, seed=6)
    assert again["kl_recovered_ci"] == m["kl_recovered_ci"] != other["kl_recovered_ci"]
    copies = ce_kl_recovered(llama, None, sae, 1, _ids(1, 10, seed=3).repeat(5, 1), n_boot=200)
    lo, hi = copies["kl_recovered_ci"]
    assert lo == pytest.approx(copies["kl_recovered"], abs=1e-9) and hi == pytest.approx(lo, abs=1e-9)
    assert "kl_recovered_ci" not in ce_kl_recovered(llama, None, sae, 1, _ids(2, 10), n_boot=0)


def test_fvu_ci_resamples_whole_batches() -> None:
    """The held-out FVU's CI draws whole batches; identical batches give a CI of zero width, one batch none."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=32, k=4), seed=0)
    x = torch.randn(400, 16)
    m = evaluate_sae(sae, x.split(50), n_boot=300, seed=2)
    lo, hi = m["fvu_ci"]
    assert lo <= m["fvu"] <= hi and lo < hi and m["n_blocks"] == 8 and m["seed"] == 2
    same = evaluate_sae(sae, [x[:50]] * 4, n_boot=100)
    assert same["fvu_ci"][0] == pytest.approx(same["fvu"], rel=1e-9) == same["fvu_ci"][1]
    assert math.isnan(evaluate_sae(sae, [x], n_boot=100)["fvu_ci"][0])
    assert "fvu_ci" not in evaluate_sae(sae, [x])
    assert m["bootstrap_unit"] == "batch"


def test_fvu_ci_resamples_whole_sequences_across_batches() -> None:
    """With row labels, a sequence is one unit wherever the batches cut it: one batch of 8 sequences
    gets a CI, and copies of one sequence a CI of zero width, whatever the batch size."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=32, k=4), seed=0)
    x = torch.randn(400, 16)
    seq = torch.arange(400) // 50  # 8 sequences of 50 rows
    one = evaluate_sae(sae, [x], n_boot=300, seed=2, groups=[seq])
    lo, hi = one["fvu_ci"]
    assert lo <= one["fvu"] <= hi and lo < hi and one["n_blocks"] == 8
    assert one["bootstrap_unit"] == "sequence"
    cut = evaluate_sae(sae, x.split(64), n_boot=300, seed=2, groups=seq.split(64))  # batches cut sequences
    assert cut["n_blocks"] == 8 and cut["fvu_ci"] == pytest.approx(one["fvu_ci"], rel=1e-9)
    copies = evaluate_sae(sae, [x[:50].repeat(4, 1)], n_boot=100, groups=[torch.arange(200) // 50])
    assert copies["fvu_ci"][0] == pytest.approx(copies["fvu"], rel=1e-9) == copies["fvu_ci"][1]
