"""Batched generation: response masks, stop strings, seeded sampling, residuals captured during generate."""

from __future__ import annotations

import pytest
import torch

from saereward.model.capture import forward_residuals
from saereward.model.generate import (
    PATTERN_STOPS,
    SamplingConfig,
    _response_mask,
    end_positions,
    generate_batch,
    iter_generate,
)


def test_response_mask_stops_after_first_end_token() -> None:
    gen = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    m = _response_mask(gen, {2}, None)
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]


@pytest.fixture(scope="module", params=["char", "smollm2"])
def end_tokenizer(request: pytest.FixtureRequest) -> object:
    """The tiny models' character tokenizer, and the embedded SmolLM2's (a BPE tokenizer)."""
    if request.param == "char":
        from tiny_models import char_tokenizer

        return char_tokenizer()
    from saereward.model.lm import load_tokenizer

    return load_tokenizer()


def test_end_positions_marks_the_end_token_and_stop_strings(end_tokenizer: object) -> None:
    tok = end_tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id  # SmolLM2 pads with its end token
    ends = set(tok.all_special_ids) | {eos}

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    rows = {
        "eos": enc(" The answer is 7.") + [eos],
        "stop": enc(" The answer is 7.\nQ:"),
        "stop_eos": enc(" 3 + 4 = 7\nQuestion:") + [eos],
        "none": enc(" Q: 3 + 4 = 7, so A: 7"),  # "Q:" but not after a newline
        "short": enc("7"),
        "only_stop": enc("\nQ:"),
    }
    T = max(len(r) for r in rows.values()) + 2  # pads after every row
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows.values()):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    got = end_positions(ids, mask, tok, PATTERN_STOPS, ends)
    assert got.shape == mask.shape and not (got & ~mask).any()  # pads are never marked
    marked = {name: ids[i][got[i]].tolist() for i, name in enumerate(rows)}
    kept = {name: ids[i][mask[i] & ~got[i]].tolist() for i, name in enumerate(rows)}
    assert marked["eos"] == [eos] and kept["eos"] == enc(" The answer is 7.")
    # exactly the tokens that spell the stop string: the text before it keeps every token
    assert tok.decode(marked["stop"]) == "\nQ:" and tok.decode(kept["stop"]) == " The answer is 7."
    assert marked["stop_eos"][-1] == eos and tok.decode(marked["stop_eos"][:-1]) == "\nQuestion:"
    assert tok.decode(kept["stop_eos"]) == " 3 + 4 = 7"
    assert marked["none"] == [] and marked["short"] == []
    assert tok.decode(marked["only_stop"]) == "\nQ:" and kept["only_stop"] == []
    # no stop strings (chat): only the end token
    chat = end_positions(ids, mask, tok, (), ends)
    assert chat.sum() == 2 and chat[0, len(rows["eos"]) - 1] and chat[2, len(rows["stop_eos"]) - 1]
    # a row without response positions is left alone
    empty = end_positions(ids[:1], torch.zeros_like(mask[:1]), tok, PATTERN_STOPS, ends)
    assert not empty.any()


def test_sampling_config_validates() -> None:
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingConfig(do_sample=True, temperature=0)
    for m in (-1, 9):
        with pytest.raises(ValueError, match="min_new_tokens"):
            SamplingConfig(max_new_tokens=8, min_new_tokens=m)


PROMPTS = ["Q: What is 2 + 3?\nA:", "Q: Tom has 12 apples and gives away 5. How many are left?\nA:"]


@pytest.mark.slow
def test_generate_batch_with_capture_matches_reforward(smollm) -> None:
    g = generate_batch(smollm, PROMPTS, SamplingConfig(max_new_tokens=12), capture_layers=[4, 20])
    B, T = g.sequences.shape
    assert g.response_mask.shape == (B, T) and g.attention_mask.shape == (B, T)
    assert not g.response_mask[:, : g.prompt_len].any()
    assert all(0 < n <= 12 for n in g.num_new_tokens)
    ref = forward_residuals(smollm.model, g.sequences, g.attention_mask, [4, 20])
    for layer in (4, 20):
        got = g.residuals[layer]
        assert got.shape == (B, T, smollm.d_model)
        m = g.attention_mask.bool().clone()
        m[:, -1] = False  # the last sampled token is never fed through the model
        diff = (got - ref[layer])[m].abs().max()
        scale = ref[layer][m].abs().max()
        assert diff / scale < 1e-4, (layer, diff, scale)
    # decoded completions are the response tokens
    for row, mask, text in zip(g.sequences, g.response_mask, g.completions, strict=True):
        assert smollm.tokenizer.decode(row[mask], skip_special_tokens=True) == text


@pytest.mark.slow
def test_stop_strings_cut_generation(smollm) -> None:
    prompt = "Q: 1 + 1 =\nA: 2\n\nQ: 2 + 2 =\nA: 4\n\nQ: 3 + 3 =\nA:"
    free = generate_batch(smollm, [prompt], SamplingConfig(max_new_tokens=30))
    stopped = generate_batch(smollm, [prompt], SamplingConfig(max_new_tokens=30, stop=("\nQ:",)))
    assert stopped.num_new_tokens[0] <= free.num_new_tokens[0]
    if "\nQ:" in free.completions[0]:
        assert stopped.num_new_tokens[0] < free.num_new_tokens[0]
        assert stopped.completions[0].count("\nQ:") <= 1


@pytest.mark.slow
def test_seeded_sampling_reproducible_and_order_restored(smollm) -> None:
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True)
    prompts = PROMPTS + ["Q: Name a color.\nA:"]

    def run() -> list[str]:
        out = [""] * len(prompts)
        for idx, g in iter_generate(smollm, prompts, sampling, batch_size=2, seed=3, progress=False):
            for j, i in enumerate(idx):
                out[i] = g.completions[j]
        return out

    a, b = run(), run()
    assert a == b
    greedy = [""] * len(prompts)
    for idx, g in iter_generate(
        smollm, prompts, SamplingConfig(max_new_tokens=8), batch_size=2, progress=False
    ):
        for j, i in enumerate(idx):
            greedy[i] = g.completions[j]
    single = generate_batch(smollm, [prompts[2]], SamplingConfig(max_new_tokens=8)).completions[0]
    assert greedy[2] == single  # order restored after length bucketing


def _hf_nucleus(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' own warpers: the sampling distribution HF's ``do_sample`` draws from."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    s = TemperatureLogitsWarper(temperature)(None, scores.clone())
    return torch.softmax(TopPLogitsWarper(top_p)(None, s), -1)


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_nucleus_sampler_same_distribution_as_hf(top_p: float) -> None:
    from saereward.model.generate import NucleusSampler

    g = torch.Generator().manual_seed(0)
    V = 5000
    peaked = torch.randn(6, V, generator=g) * 4  # the top-k carries the nucleus
    flat = torch.randn(2, V, generator=g) * 0.05  # the top-k does not: full-sort fallback
    scores = torch.cat([peaked, flat])
    hf = _hf_nucleus(scores, 0.9, top_p)
    # k_first = k = 64; and a cascade 8 -> 512 -> full sort (the top 8 rarely reach top_p here)
    for sampler in (NucleusSampler(0.9, top_p, k=64), NucleusSampler(0.9, top_p, k=512, k_first=8)):
        vals, idx = sampler.nucleus(scores)
        ours = torch.zeros_like(scores).scatter_(1, idx, torch.softmax(vals, -1))
        assert torch.equal(ours > 0, hf > 0)  # the same kept set, row by row
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-7)
    # draws: only kept tokens, frequencies follow the nucleus (chi-square-free check on a peaked row)
    torch.manual_seed(1)
    draws = torch.stack([sampler(None, scores[:1]).argmax(-1) for _ in range(4000)]).squeeze(1)
    assert bool((hf[0, draws] > 0).all())
    top = int(hf[0].argmax())
    assert abs(float((draws == top).float().mean()) - float(hf[0, top])) < 0.03


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_nucleus_draws_follow_hf_frequencies(top_p: float) -> None:
    """20,000 draws from one row (one uniform each): every drawn token is in HF's nucleus, and the
    counts fit its renormalised probabilities (chi-square, tokens expected < 5 times pooled)."""
    from scipy.stats import chisquare

    from saereward.model.generate import NucleusSampler

    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, 500, generator=g) * 2.5
    hf = _hf_nucleus(row, 0.9, top_p)[0]
    torch.manual_seed(0)
    draws = NucleusSampler(0.9, top_p, k=64, k_first=8).sample(row.expand(20_000, -1))
    counts = torch.bincount(draws, minlength=500).double()
    assert bool((hf[draws] > 0).all())
    expected = hf.double() * 20_000
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    assert chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-4


def test_nucleus_draw_does_not_depend_on_the_sort_depth_or_other_rows() -> None:
    """One uniform per row, inverted on the nucleus' cumulative mass: the token a row gets is the same
    whether its candidates came from the top 8, the top 512 or the full sort, and whatever the other
    rows of the batch need (a flat row sends only itself to the full sort)."""
    from saereward.model.generate import NucleusSampler

    g = torch.Generator().manual_seed(0)
    V = 5000
    peaked = torch.randn(6, V, generator=g) * 4
    flat = torch.randn(2, V, generator=g) * 0.05
    mixed = torch.cat([peaked[:3], flat, peaked[3:]])
    for _ in range(20):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        outs = []
        for sampler in (
            NucleusSampler(0.9, 0.95, k=512, k_first=8),
            NucleusSampler(0.9, 0.95, k=V, k_first=V),
        ):
            torch.manual_seed(seed)
            outs.append(sampler.sample(mixed))
        assert torch.equal(outs[0], outs[1])
        torch.manual_seed(seed)
        alone = NucleusSampler(0.9, 0.95, k=512, k_first=8).sample(
            torch.cat([peaked[:3], peaked[:2], peaked[3:]])
        )
        assert torch.equal(outs[0][[0, 1, 2, 5, 6, 7]], alone[[0, 1, 2, 5, 6, 7]])


def test_topk_sampler_in_generate_is_seeded(smollm) -> None:
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, sampler="topk")
    a = generate_batch(smollm, PROMPTS, sampling, seed=5)
    b = generate_batch(smollm, PROMPTS, sampling, seed=5)
    c = generate_batch(smollm, PROMPTS, sampling, seed=6)
    assert a.completions == b.completions and torch.equal(a.sequences, b.sequences)
    assert a.completions != c.completions
    assert a.response_mask.any(1).all()
    with pytest.raises(ValueError, match="sampler"):
        SamplingConfig(sampler="beam")


@pytest.mark.slow
def test_shared_prompt_prefill_matches_per_row_prefill(smollm) -> None:
    """GRPO groups repeat a prompt: one prefill per distinct prompt, its cache gathered to the rows,
    gives the same tokens and the same captured residuals as prefilling every row."""
    from saereward.model.generate import _shared_prefix_cache

    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    sampling = SamplingConfig(max_new_tokens=10)
    enc = smollm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cache = _shared_prefix_cache(smollm.model, dict(enc))
    assert cache is not None and cache._rows.tolist() in ([0, 1, 0, 1, 0], [1, 0, 1, 0, 1])
    assert cache.get_seq_length() == enc["input_ids"].shape[1] - 1
    a = generate_batch(smollm, prompts, sampling, capture_layers=[15])
    b = generate_batch(smollm, prompts, sampling, capture_layers=[15], share_prompts=True)
    assert torch.equal(a.sequences, b.sequences) and a.completions == b.completions
    m = a.attention_mask.bool().clone()
    m[:, -1] = False
    ra, rb = a.residuals[15], b.residuals[15]
    assert ra.shape == rb.shape
    assert ((ra - rb)[m].abs().max() / ra[m].abs().max()) < 1e-4
    # no repeated prompt: nothing to share
    assert (
        _shared_prefix_cache(smollm.model, dict(smollm.tokenizer(PROMPTS, return_tensors="pt", padding=True)))
        is None
    )
