"""Batched generation, optionally capturing residuals during ``generate()`` (no second forward).

Prompts are tokenized with left padding and bucketed by length (longest first) so that a batch wastes
little compute on pads; results come back in the caller's order. Each batch is seeded from
``(seed, smallest item index in the batch)``, so a re-run with the same settings reproduces every
sampled output (batched sampling cannot be made independent of the batch size itself).

The returned :class:`Generation` carries everything later stages need: the full sequences, a mask of
real tokens, a mask of *response* tokens (generated, up to and including the end token), and, if asked,
the residual stream at chosen layers aligned with sequence positions (see :mod:`saereward.model.capture`;
the last generated token has no residual and is excluded from ``residual_mask``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saereward.config import check_new_tokens, check_sampling
from saereward.errors import SaeRewardError
from saereward.model import fastdecode
from saereward.model.capture import ResidualCapture, position_ids_from_mask
from saereward.model.lm import LoadedModel, unwrap

#: Raw and few-shot prompts make the model continue the ``Q:/A:`` pattern; generation stops there.
PATTERN_STOPS: tuple[str, ...] = ("\nQ:", "\n\nQ", "\nProblem:", "\nQuestion:")


def stop_strings_for(prompt_format: str) -> tuple[str, ...]:
    """Stop strings for a prompt format: none for ``chat`` (the end-of-turn token ends it)."""
    return () if prompt_format == "chat" else PATTERN_STOPS


def end_positions(
    ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any, stops: Sequence[str], end_ids: set[int]
) -> torch.Tensor:
    """``[B, N]`` True on each response's end token and on the trailing tokens that spell a stop string.

    ``ids``/``mask`` are response token ids and the positions that belong to the response. A row
    that stopped on a stop string (e.g. ``"\\nQ:"``) has it in its last few tokens: the shortest
    tail whose text contains it is marked. These positions say that the response ended; rewards
    that score content leave them out.
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(ids.shape[0]):
        pos = torch.nonzero(mask[b]).flatten().tolist()
        if not pos:
            continue
        n = len(pos)
        if int(ids[b, pos[-1]]) in end_ids:
            out[b, pos[-1]] = True
            n -= 1
        if not stops or n == 0:
            continue
        toks = ids[b, pos[:n]].tolist()
        span = 4 * max(len(s) for s in stops)  # a character is at most 4 (byte-level) tokens
        if not any(s in tokenizer.decode(toks[-span:], skip_special_tokens=True) for s in stops):
            continue
        for j in range(n - 1, -1, -1):
            if any(s in tokenizer.decode(toks[j:], skip_special_tokens=True) for s in stops):
                out[b, pos[j:n]] = True
                break
    return out


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode."""

    max_new_tokens: int = 128
    #: no end token before this many new tokens (its logits masked, as ``generate(min_new_tokens=)``);
    #: stop strings still end a row
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.9
    top_p: float = 0.95
    stop: tuple[str, ...] = ()  #: stop strings (e.g. ``"\nQ:"`` for few-shot prompts)
    #: ``hf``: transformers' own temperature/top-p warpers and multinomial; ``topk``: the same
    #: distribution drawn by :class:`NucleusSampler` (partial sort, see there). Different random draws.
    sampler: str = "hf"

    def __post_init__(self) -> None:
        if self.sampler not in ("hf", "topk"):
            raise ValueError(f"sampler must be 'hf' or 'topk', got {self.sampler!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_new_tokens(self.min_new_tokens, self.max_new_tokens)
        if self.do_sample:
            check_sampling(self.temperature, self.top_p)


@dataclass
class Generation:
    """One generated batch. Shapes: ``B`` items, ``P`` padded prompt length, ``T = P + N`` total."""

    prompt_len: int  #: P
    sequences: torch.Tensor  #: [B, T] token ids (left-padded prompt + generated, pads after the end)
    attention_mask: torch.Tensor  #: [B, T] 1 on real tokens (prompt and response)
    response_mask: torch.Tensor  #: [B, T] bool, generated tokens up to and including the end token
    completions: list[str]  #: decoded response text (special tokens skipped)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)  #: layer -> [B, T, d]
    seconds: float = 0.0

    @property
    def num_new_tokens(self) -> list[int]:
        return self.response_mask.sum(1).tolist()

    @property
    def residual_mask(self) -> torch.Tensor:
        """[B, T] response positions that have a captured residual (all but the very last position)."""
        m = self.response_mask.clone()
        m[:, -1] = False
        return m


def _response_mask(gen_ids: torch.Tensor, stop_ids: set[int], pad_id: int | None) -> torch.Tensor:
    """[B, N] True up to and including the first stop/eos token of each row."""
    is_end = torch.zeros_like(gen_ids, dtype=torch.bool)
    for t in stop_ids:
        is_end |= gen_ids == t
    # positions strictly after the first end token are excluded
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    mask = ~after_end
    if pad_id is not None and pad_id not in stop_ids:
        mask &= gen_ids != pad_id
    return mask


class _TailStop:
    """Stopping criterion: a row is done once its generated tail contains a stop string.

    Decodes only the last few generated tokens of each row per step, which is cheaper here than
    transformers' ``StopStringCriteria`` (its per-step cost was ~35 % of a SmolLM2 decode step on CPU).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int, window: int = 8) -> None:
        self.tokenizer, self.stops, self.prompt_len, self.window = tokenizer, tuple(stops), prompt_len, window

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len :]
        tails = self.tokenizer.batch_decode(gen[:, -self.window :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


class NucleusSampler:
    """Temperature + top-p (nucleus) sampling inside a logits processor, for a *greedy* ``generate``.

    transformers' ``TopPLogitsWarper`` sorts the whole vocabulary at every decoding step and its
    sampler draws an exponential variate per vocabulary entry: on SmolLM2's 49k vocabulary that
    was ~60 ms + ~17 ms of a ~170 ms decoding step for 16 sequences on the 2-core CPU (profiled
    GRPO rollouts, one thread). Here the nucleus comes from a partial sort, row by row: the ``k_first``
    most likely tokens; for the rows where they carry less than ``top_p`` of the mass, the ``k`` most
    likely; for the rows where those do not either (a flat distribution), the full sort. The kept set
    is always HF's: the smallest prefix of tokens by probability whose mass reaches ``top_p`` (the
    token that crosses it included). The token is drawn from the renormalised nucleus by inverting its
    cumulative mass at one uniform variate per row, so a row's draw does not depend on how far its
    sort went nor on the other rows. Same distribution as HF's sampler, different random draws.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 1024, k_first: int = 64) -> None:
        self.temperature, self.top_p, self.k = float(temperature), float(top_p), int(k)
        self.k_first = min(int(k_first), self.k)

    def _candidates(self, scores: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Groups of rows ``(rows, logits, token ids, cumulative mass, kept)``, ``[r, k']`` each, most
        likely first: each row in the first group of the cascade whose candidates reach ``top_p``."""
        s = scores.float() / self.temperature
        V = s.shape[-1]
        if self.top_p >= 1.0:  # the whole vocabulary (a cumulative sum can round to 1 early)
            vals, idx = s.sort(-1, descending=True)
            mass = torch.softmax(vals, -1).cumsum(-1)
            rows = torch.arange(s.shape[0], device=s.device)
            return [(rows, vals, idx, mass, torch.ones_like(vals, dtype=torch.bool))]
        lse = torch.logsumexp(s, -1, keepdim=True)
        rows = torch.arange(s.shape[0], device=s.device)
        groups: list[tuple[torch.Tensor, ...]] = []
        for k in sorted({min(self.k_first, V), min(self.k, V), V}):
            sub = s if len(rows) == s.shape[0] else s[rows]
            vals, idx = sub.topk(k, dim=-1)  # sorted, descending
            mass = (vals - lse[rows]).exp().cumsum(-1)
            done = mass[:, -1] >= self.top_p if k < V else torch.ones_like(rows, dtype=torch.bool)
            if bool(done.any()):
                m = mass[done]
                kept = torch.cat([torch.ones_like(m[:, :1], dtype=torch.bool), m[:, :-1] < self.top_p], 1)
                groups.append((rows[done], vals[done], idx[done], m, kept))
            rows = rows[~done]
            if not len(rows):
                break
        return groups

    def nucleus(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, token ids)`` of the candidates, ``[B, k']``: most likely first, ``-inf`` outside
        the nucleus (and in the padding of rows whose sort stopped earlier)."""
        groups = self._candidates(scores)
        width = max(g[1].shape[1] for g in groups)
        vals = scores.new_full((scores.shape[0], width), float("-inf"), dtype=torch.float32)
        idx = torch.zeros(scores.shape[0], width, dtype=torch.long, device=scores.device)
        for rows, v, i, _, kept in groups:
            vals[rows, : v.shape[1]] = v.masked_fill(~kept, float("-inf"))
            idx[rows, : i.shape[1]] = i
        return vals, idx

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row, ``[B]``, drawn from the nucleus of ``scores`` ``[B, V]``: the first candidate
        whose cumulative mass exceeds ``u ·`` (the nucleus mass), ``u ~ U[0, 1)`` per row."""
        u = torch.rand(scores.shape[0], device=scores.device)
        out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for rows, _, idx, mass, kept in self._candidates(scores):
            last = kept.sum(1, keepdim=True) - 1  # the token that crosses top_p
            target = u[rows].unsqueeze(1) * mass.gather(1, last)
            j = torch.searchsorted(mass, target, right=True).minimum(last)
            out[rows] = idx.gather(1, j).squeeze(1)
        return out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.sample(scores).unsqueeze(1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _generation_config(lm: LoadedModel, sampling: SamplingConfig):  # noqa: ANN202
    from transformers import GenerationConfig

    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(int(tok.eos_token_id))
    kw: dict = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": sorted(eos_ids),
    }
    if sampling.min_new_tokens:
        kw["min_new_tokens"] = sampling.min_new_tokens
    if sampling.do_sample and sampling.sampler == "topk":
        kw["do_sample"] = False  # NucleusSampler draws the token; greedy then takes it
    elif sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    return GenerationConfig(**kw), eos_ids


def gatherable_cache(cache: Any) -> bool:
    """A cache made only of key/value layers (full or sliding window), whose rows
    ``batch_select_indices`` can gather (linear-attention layers also keep recurrent states, which it
    leaves alone)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(x) in (DynamicLayer, DynamicSlidingWindowLayer) for x in layers)


def distinct_prefix_cache(
    model: Any, ids: torch.Tensor, am: torch.Tensor, pos: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """Run each distinct row of ``ids``/``am`` once with ``use_cache``: ``(cache, inv)``, where row
    ``i`` of the batch is row ``inv[i]`` of the cache (gather it with ``batch_select_indices(inv)``)."""
    uniq, inv = torch.unique(torch.cat([ids, am], 1), dim=0, return_inverse=True)
    first: dict[int, int] = {}
    for row, u in enumerate(inv.tolist()):
        first.setdefault(u, row)
    reps = torch.tensor([first[u] for u in range(len(uniq))], device=ids.device)
    cache = model(
        input_ids=ids[reps], attention_mask=am[reps], position_ids=pos[reps], use_cache=True, logits_to_keep=1
    ).past_key_values
    return cache, inv


def _shared_prefix_cache(model: Any, enc: dict[str, torch.Tensor]) -> Any | None:
    """Prefill each distinct prompt once (all but its last token) and gather the cache to every row.

    Returns the cache for ``generate(past_key_values=...)``, which then feeds only each row's last
    prompt token before decoding; ``None`` when no two rows share a prompt or the cache's rows cannot
    be gathered. The prefix forward's captured residuals are ``[U, P - 1, d]``: the caller expands
    them with the returned cache's ``_rows`` index.
    """
    ids, am = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] < 2:
        return None
    pos = position_ids_from_mask(am)
    if len(torch.unique(torch.cat([ids[:, :-1], am[:, :-1]], 1), dim=0)) == len(ids):
        return None
    cache, inv = distinct_prefix_cache(model, ids[:, :-1], am[:, :-1], pos[:, :-1])
    if not gatherable_cache(cache):
        return None
    cache.batch_select_indices(inv)
    cache._rows = inv  # noqa: SLF001 - read back by generate_batch for the captured prefill
    return cache


def _fast_generate(
    lm: LoadedModel,
    enc: dict[str, torch.Tensor],
    sampling: SamplingConfig,
    eos_ids: set[int],
    cache: Any | None,
    cap: ResidualCapture | None,
    capture_dtype: torch.dtype | None,
    skinny: bool,
    packed: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``generate_batch``'s ``fast_decode`` path: an HF prefill (on the shared prompt cache if any),
    then :func:`saereward.model.fastdecode.decode`. Returns ``(sequences, residuals)`` as ``generate()``
    and ``ResidualCapture.sequence`` would."""
    model, tok = lm.model, lm.tokenizer
    ids, am = enc["input_ids"], enc["attention_mask"]
    pos = position_ids_from_mask(am)
    if cache is not None:  # the prompts minus their last token are cached: feed the last one
        ids_in, pos_in = ids[:, -1:], pos[:, -1:]
    else:
        ids_in, pos_in = ids, pos
    pre = model(
        input_ids=ids_in,
        attention_mask=am,
        position_ids=pos_in,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    layers = list(cap.layers) if cap is not None else []
    prefill_res = {layer: cap.sequence(layer) for layer in layers} if cap is not None else {}
    if cap is not None:
        cap.remove()  # the decode steps record their own residuals
    if sampling.do_sample:
        pick = NucleusSampler(sampling.temperature, sampling.top_p).sample
    else:

        def pick(scores: torch.Tensor) -> torch.Tensor:
            return scores.argmax(-1)

    stop = None
    if sampling.stop:
        tail = _TailStop(tok, sampling.stop, 0)

        def stop(gen: torch.Tensor) -> torch.Tensor:
            return tail(gen, None)

    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)
    new, res = fastdecode.decode(
        model,
        pre.past_key_values,
        am,
        pre.logits[:, -1],
        max_new_tokens=sampling.max_new_tokens,
        pick=pick,
        end_ids=eos_ids,
        pad_id=pad,
        min_new_tokens=sampling.min_new_tokens,
        stop=stop,
        capture_layers=layers,
        capture_dtype=capture_dtype,
        skinny=skinny,
        packed=packed,
        in_place=in_place,
    )
    residuals = {layer: torch.cat([prefill_res[layer], res[layer]], 1) for layer in layers}
    return torch.cat([ids, new], 1), residuals


def _generate_kwargs(
    tok: Any, sampling: SamplingConfig, gcfg: Any, prompt_len: int, fast: bool
) -> dict[str, Any]:
    """``generate()``'s keyword arguments besides the inputs: the generation config and, off the fast
    path, the sampler and stop criterion (the fast loop has its own)."""
    kwargs: dict[str, Any] = {"generation_config": gcfg}
    if not fast:
        if sampling.do_sample and sampling.sampler == "topk":
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(
                [NucleusSampler(sampling.temperature, sampling.top_p)]
            )
        if sampling.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_TailStop(tok, sampling.stop, prompt_len)])
    return kwargs


def _generation(
    tok: Any,
    enc: dict[str, torch.Tensor],
    out: torch.Tensor,
    eos_ids: set[int],
    residuals: dict[int, torch.Tensor],
    seconds: float,
) -> Generation:
    """The :class:`Generation` of sequences ``out`` generated from the prompts ``enc``: masks and texts."""
    P = enc["input_ids"].shape[1]
    gen = out[:, P:]
    resp = _response_mask(gen, eos_ids, tok.pad_token_id)
    response_mask = torch.cat([torch.zeros_like(enc["input_ids"], dtype=torch.bool), resp], dim=1)
    attention_mask = torch.cat([enc["attention_mask"].bool(), resp], dim=1).long()
    texts = [tok.decode(row[m], skip_special_tokens=True) for row, m in zip(gen, resp, strict=True)]
    return Generation(
        prompt_len=P,
        sequences=out,
        attention_mask=attention_mask,
        response_mask=response_mask,
        completions=texts,
        residuals=residuals,
        seconds=seconds,
    )


@torch.no_grad()
def uses_fast_decode(model: Any, sampling: SamplingConfig, fast_decode: bool) -> bool:
    """Whether :func:`generate_batch` decodes ``model`` with its own loop (``fast_decode`` asked, a
    sampler the loop has, and a model it runs; active LoRA adapters included)."""
    if not fast_decode or not (sampling.sampler == "topk" or not sampling.do_sample):
        return False
    return fastdecode.unsupported(model) is None


def packs_weights(
    model: Any, sampling: SamplingConfig, fast_decode: bool, skinny: bool, packed: bool
) -> bool:
    """Whether :func:`generate_batch` with these settings decodes on oneDNN packed weights with the
    adapters folded in (then the caller need not merge LoRA adapters for sampling): the fast loop's
    skinny path on a CPU fp32 model, ``packed`` asked and available."""
    if not (packed and skinny and uses_fast_decode(model, sampling, fast_decode)):
        return False
    weight = unwrap(model).get_input_embeddings().weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and fastdecode.packing_available()


def check_context(model: Any, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (``max_position_embeddings``): past it the
    positions are ones the model never saw, and the prefill alone can take many minutes on a CPU."""
    limit = getattr(getattr(unwrap(model), "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise SaeRewardError(
            f"the longest prompt has {prompt_tokens} tokens and max_new_tokens is {new_tokens}: together more "
            f"than the model's context of {limit} tokens; use fewer --shots, shorter prompts or a smaller "
            "--max-new-tokens"
        )


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    capture_layers: Sequence[int] = (),
    capture_dtype: torch.dtype | None = None,
    seed: int | None = None,
    add_special_tokens: bool = False,
    share_prompts: bool = False,
    fast_decode: bool = False,
    skinny: bool = False,
    packed: bool = False,
    packed_in_place: bool = False,
) -> Generation:
    """Generate for one batch of prompt strings; capture residuals at ``capture_layers`` if given.

    Prompts are used verbatim (``add_special_tokens=False``): chat prompts already carry their special
    tokens from the template. ``share_prompts``: prefill each distinct prompt once and reuse its KV
    cache for every row that repeats it (GRPO groups); the same samples up to float rounding.
    ``fast_decode``: decode with :func:`saereward.model.fastdecode.decode` (preallocated KV cache, ended
    rows leave the batch) after an HF prefill, where the model and sampler allow it (greedy or
    ``sampler="topk"``; see :func:`saereward.model.fastdecode.unsupported`), else ``generate()``; ``skinny``
    is its ``(W xᵀ)ᵀ`` products, ``packed`` those products on oneDNN packed weights (:func:`packs_weights`;
    weights in a file mapping have their pages dropped meanwhile), ``packed_in_place`` with the packed
    copy standing in for the weights also when they are the process's own, and the lowest peak memory
    (``in_place`` of :func:`saereward.model.fastdecode.decode`).
    Same distribution, different random draws once a row has ended.
    """
    tok, model = lm.tokenizer, lm.model
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    check_context(model, int(enc["input_ids"].shape[1]), sampling.max_new_tokens)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    gcfg, eos_ids = _generation_config(lm, sampling)
    if seed is not None:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    fast = uses_fast_decode(model, sampling, fast_decode)
    kwargs = _generate_kwargs(tok, sampling, gcfg, enc["input_ids"].shape[1], fast)
    with (
        ResidualCapture(model, capture_layers, store_dtype=capture_dtype)
        if capture_layers
        else contextlib.nullcontext()
    ) as cap:
        cache = _shared_prefix_cache(model, enc) if share_prompts else None
        if cache is not None:
            kwargs["past_key_values"] = cache
            if cap is not None:  # the prefix forward ran once per distinct prompt: expand to the rows
                for layer in cap.layers:
                    chunks = cap.chunks(layer)
                    chunks[0] = chunks[0][cache._rows]  # noqa: SLF001
        if fast:
            out, residuals = _fast_generate(
                lm, enc, sampling, eos_ids, cache, cap, capture_dtype, skinny, packed, packed_in_place
            )
        else:
            out = model.generate(**enc, **kwargs)
            residuals = {layer: cap.sequence(layer, out.shape[1]) for layer in cap.layers} if cap else {}
    seconds = time.perf_counter() - t0
    return _generation(tok, enc, out, eos_ids, residuals, seconds)


def iter_generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    batch_size: int = 16,
    seed: int = 0,
    capture_layers: Sequence[int] = (),
    capture_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "generate",
    fast_decode: bool = False,
) -> Iterator[tuple[list[int], Generation]]:
    """Yield ``(original indices, Generation)`` per length-bucketed batch, with a progress bar.

    ``fast_decode``: as in :func:`generate_batch`."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lengths = [len(ids) for ids in lm.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    bar = tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    n_tokens, seconds = 0, 0.0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            g = generate_batch(
                lm,
                [prompts[i] for i in idx],
                sampling,
                capture_layers=capture_layers,
                capture_dtype=capture_dtype,
                seed=seed * 1_000_003 + min(idx),
                fast_decode=fast_decode,
            )
            n_tokens += int(g.response_mask.sum())
            seconds += g.seconds
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{n_tokens / max(seconds, 1e-9):.0f}")
            yield idx, g
    finally:
        bar.close()
