"""Activation collection and the shard reader.

The tiny random models have no tokenizer, so these tests give them a character-level one (printable
ASCII + newline, ``<pad>``/``<s>``/``</s>``/``<unk>`` = the tiny models' 0/1/2/3, BOS added like a
Llama tokenizer). The whole path then runs as it does for a real model: task prompts formatted and
generated with residual capture, and text files cut into chunks and forwarded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import saereward.data.collect as act
from saereward.config import from_dict
from saereward.data.collect import (
    CollectConfig,
    chunk_document,
    heldout_start,
    iter_text_documents,
    run_collect,
    shard_name,
)
from saereward.data.store import ActivationStore, read_manifest
from saereward.errors import SaeRewardError
from saereward.model.capture import forward_residuals
from saereward.model.lm import LoadedModel, decoder_layers
from tiny_models import BOS_ID, PAD_ID, char_tokenizer, make_tiny, tiny_lm

CORPUS = (
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n\n"
    "Numbers: 12 + 30 = 42, and 7 * 6 = 42 as well.\n\n"
    "A much longer paragraph, so that it is cut into several chunks of context_len tokens each, "
    "with a tail that is shorter than the others and therefore left-padded in its batch.\n\n"
    "Short one.\n\n"
    "Last paragraph of the file: it ends without a blank line."
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(CORPUS + "\n")
    return p


def config(out: Path, corpus: Path | None = None, **kw: Any) -> CollectConfig:
    base: dict[str, Any] = {
        "model": "tiny",
        "layers": (1, 3),
        "task": "chain_sum",
        "n": 10,
        "shots": 0,  # keeps prompts short: the tiny models have 256 positions
        "max_new_tokens": 5,
        "batch_size": 4,
        "shard_tokens": 60,
        "context_len": 48,
        "held_out_fraction": 0.2,
        "text_paths": (str(corpus),) if corpus else (),
        "out": str(out),
        "progress": False,
    }
    base.update(kw)
    return CollectConfig(**base)


def shard_tensors(folder: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(folder / s["file"]) for s in read_manifest(folder)["shards"]]


def expected_corpus_rows(lm: LoadedModel, path: Path, cfg: CollectConfig) -> dict[str, Any]:
    """Residuals of every chunk forwarded alone (no padding), at positions >= skip_first."""
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
    ids_out: list[torch.Tensor] = []
    for doc in iter_text_documents(path, cfg.txt_unit):
        ids = lm.tokenizer(doc, add_special_tokens=False)["input_ids"]
        for chunk in chunk_document(ids, cfg.context_len, [BOS_ID]):
            x = torch.tensor([chunk])
            res = forward_residuals(lm.model, x, torch.ones_like(x), cfg.layers)
            for layer in cfg.layers:
                acts[layer].append(res[layer][0, cfg.skip_first :])
            ids_out.append(x[0, cfg.skip_first :])
    return {"acts": {k: torch.cat(v) for k, v in acts.items()}, "token_ids": torch.cat(ids_out)}


def assert_rows_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    assert actual.shape == expected.shape
    err = (actual.float() - expected.float()).norm(dim=-1)
    bound = rtol * expected.float().norm(dim=-1) + atol
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


# --------------------------------------------------------------------------------------------------
# Config and pure helpers
# --------------------------------------------------------------------------------------------------


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="layer"):
        CollectConfig(layers=())
    with pytest.raises(ValueError, match="no source"):
        CollectConfig(task=None)
    with pytest.raises(ValueError, match="held_out_fraction"):
        CollectConfig(held_out_fraction=1.0)
    with pytest.raises(ValueError, match="neither"):
        CollectConfig(text_paths=("a.csv",))
    with pytest.raises(ValueError, match="context_len"):
        CollectConfig(context_len=2, skip_first=1)
    cfg = from_dict(CollectConfig, {"layers": "1,3", "task": "none", "text_paths": "a.txt,b.jsonl"})
    assert cfg.layers == (1, 3) and cfg.task is None and cfg.text_paths == ("a.txt", "b.jsonl")


def test_chunk_document_and_heldout_start() -> None:
    assert chunk_document(list(range(7)), 4, [99]) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6]]
    assert chunk_document([5, 6], 4) == [[5, 6]]
    seq = torch.tensor([0] * 10 + [1] * 5 + [2] * 5)  # starts at 0, 10, 15; n = 20
    assert heldout_start(seq, 0.25) == 15
    assert heldout_start(seq, 0.4) == 10  # target 12: 10 is nearer than 15
    assert heldout_start(seq, 0.0) == 20
    assert heldout_start(torch.zeros(8, dtype=torch.long), 0.05) == 8  # one sequence: nothing held out


def test_text_documents(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n\n\nthree\n  \nfour")
    assert list(iter_text_documents(txt)) == ["one\ntwo", "three", "four"]
    assert list(iter_text_documents(txt, "line")) == ["one", "two", "three", "four"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "alpha"}\n\n{"text": "beta", "x": 1}\n{"body": "gamma"}\n')
    with pytest.raises(SaeRewardError, match=r"b\.jsonl:4: .*'text'"):
        list(iter_text_documents(jl))
    jl.write_text('{"text": "alpha"}\n{"text": "beta"\n')
    with pytest.raises(SaeRewardError, match=r"b\.jsonl:2: not valid JSON"):
        list(iter_text_documents(jl))


# --------------------------------------------------------------------------------------------------
# What is collected
# --------------------------------------------------------------------------------------------------


def test_corpus_rows_equal_unpadded_forward_all_layers_in_one_pass(tmp_path: Path, corpus: Path) -> None:
    lm = tiny_lm()
    cfg = config(tmp_path / "out", corpus, task=None, layers=(0, 2, 3), held_out_fraction=0.0)
    calls: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run_collect(cfg, lm)
    finally:
        handle.remove()
    man = read_manifest(cfg.out)
    exp = expected_corpus_rows(lm, corpus, cfg)
    n_chunks = sum(
        len(chunk_document(lm.tokenizer(d, add_special_tokens=False)["input_ids"], cfg.context_len, [BOS_ID]))
        for d in iter_text_documents(corpus)
    )
    assert len(calls) == -(-n_chunks // cfg.batch_size)  # one forward per batch, for all three layers
    assert man["complete"] and man["layers"] == [0, 2, 3] and man["d_model"] == 64
    shards = shard_tensors(Path(cfg.out))
    assert len(shards) > 1 and [s["n_tokens"] for s in man["shards"]] == [len(t["token_ids"]) for t in shards]
    got_ids = torch.cat([t["token_ids"] for t in shards]).long()
    assert torch.equal(got_ids, exp["token_ids"])  # pads and the BOS (skip_first) are not kept
    assert not (got_ids == PAD_ID).any() and not (got_ids == BOS_ID).any()
    assert man["n_tokens"] == len(got_ids)
    for layer in cfg.layers:
        got = torch.cat([t[f"layer_{layer}"] for t in shards])
        assert_rows_close(got, exp["acts"][layer])


def test_task_rows_are_the_generation_residuals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from saereward.tasks import format_prompt, load_task

    lm = tiny_lm()
    seen: list[Any] = []
    real_iter = act.iter_generate

    def recording(*args: Any, **kw: Any):  # noqa: ANN202
        for idx, g in real_iter(*args, **kw):
            seen.append(g)
            yield idx, g

    monkeypatch.setattr(act, "iter_generate", recording)
    cfg = config(tmp_path / "out", n=7, shots=1, sample=True, held_out_fraction=0.0, shard_tokens=10_000)
    run_collect(cfg, lm)
    src = read_manifest(cfg.out)["sources"][0]
    assert src["kind"] == "task" and src["n_units"] == 2 and len(seen) == 2  # batches of 4 and 3 items
    task = load_task("chain_sum", n=7, seed=0)
    prompts = [format_prompt(task, it, "fewshot", shots=1) for it in task.items()]
    prefix = src["shared_prefix_tokens"]
    assert prefix == len(os.path.commonprefix(prompts)) > 10  # one char = one token; the demo is shared
    (shard,) = shard_tensors(Path(cfg.out))

    exp: dict[str, list[torch.Tensor]] = {"token_ids": [], "seq_ids": [], "positions": []}
    exp.update({f"layer_{layer}": [] for layer in cfg.layers})
    for g in seen:
        ref = forward_residuals(lm.model, g.sequences, g.attention_mask, cfg.layers)
        P = g.prompt_len
        for j in range(g.sequences.shape[0]):
            real = g.attention_mask[j].bool()
            item = prompts.index(lm.tokenizer.decode(g.sequences[j, :P][real[:P]]))
            pos = real.long().cumsum(0) - 1
            keep = real & (g.sequences[j] != PAD_ID) & (pos >= cfg.skip_first)  # pads after a stop string
            keep[-1] = False  # the last sampled token is never fed through the model
            if item != 0:
                keep &= pos >= prefix
            for layer in cfg.layers:  # captured during generate() == a re-forward of the sequences
                assert_rows_close(g.residuals[layer][j][keep], ref[layer][j][keep])
                exp[f"layer_{layer}"].append(g.residuals[layer][j][keep])
            exp["token_ids"].append(g.sequences[j][keep].int())
            exp["positions"].append(pos[keep].int())
            exp["seq_ids"].append(torch.full((int(keep.sum()),), item))
    assert set(shard) == set(exp)
    for key, parts in exp.items():
        assert torch.equal(shard[key], torch.cat(parts)), key
    assert sorted(set(shard["seq_ids"].tolist())) == list(range(7))
    assert (shard["positions"][shard["seq_ids"] == 0] < prefix).any()  # item 0 keeps the shared prefix


# --------------------------------------------------------------------------------------------------
# Resume, refusal, damage
# --------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def assert_same_collection(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["shards"] == mb["shards"] and ma["complete"] and mb["complete"]
    for ta, tb in zip(shard_tensors(a), shard_tensors(b), strict=True):
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """An uninterrupted collection of both sources (sampled generations), several shards each."""
    out = tmp_path_factory.mktemp("ref") / "acts"
    run_collect(config(out, corpus, sample=True), tiny_lm())
    return out


@pytest.mark.parametrize("kill", ["writing_shard_2", "after_shard_3_before_manifest"])
def test_resume_after_kill_gives_identical_shards(
    tmp_path: Path, corpus: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, kill: str
) -> None:
    out = tmp_path / "acts"
    cfg = config(out, corpus, sample=True)
    real_shard, real_manifest = act._write_shard, act._write_manifest
    n_shards = 0

    def shard_then_die(path: Path, tensors: dict, meta: dict) -> None:
        nonlocal n_shards
        if kill == "writing_shard_2" and n_shards == 2:
            with act.atomic_path(path) as tmp:  # a kill mid-write leaves a temp file behind
                tmp.write_bytes(b"partial")
                os.link(tmp, tmp.with_name(".shard_stale.safetensors.x.tmp"))
                raise Killed
        real_shard(path, tensors, meta)
        n_shards += 1

    def manifest_then_die(folder: Path, manifest: dict) -> None:
        if kill == "after_shard_3_before_manifest" and len(manifest["shards"]) == 4:
            raise Killed
        real_manifest(folder, manifest)

    monkeypatch.setattr(act, "_write_shard", shard_then_die)
    monkeypatch.setattr(act, "_write_manifest", manifest_then_die)
    with pytest.raises(Killed):
        run_collect(cfg, tiny_lm())
    monkeypatch.undo()
    partial = read_manifest(out)
    assert not partial["complete"] and len(partial["shards"]) in (2, 3)
    with pytest.raises(SaeRewardError, match="incomplete"):
        ActivationStore(out, 1)
    run_collect(cfg, tiny_lm())
    assert not list(out.glob(".*.tmp"))
    assert_same_collection(reference, out)
    assert len(read_manifest(out)["shards"]) >= 5
    assert {s["source"] for s in read_manifest(out)["shards"]} == {0, 1}


def test_existing_folder_rules(tmp_path: Path, corpus: Path, reference: Path) -> None:
    cfg = config(reference, corpus, sample=True)
    mtimes = {p: p.stat().st_mtime_ns for p in reference.iterdir()}
    run_collect(cfg, tiny_lm())  # complete, same config: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in reference.iterdir()} == mtimes
    with pytest.raises(SaeRewardError, match=r"different config \(differs in: layers, seed\)"):
        run_collect(config(reference, corpus, sample=True, layers=(2,), seed=1), tiny_lm())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SaeRewardError, match="holds no activation collection"):
        run_collect(config(other, corpus), tiny_lm())


@pytest.mark.parametrize("damage", ["truncate_last", "truncate_middle", "empty_first"])
def test_damaged_shard_is_named_then_rewritten(
    tmp_path: Path, corpus: Path, reference: Path, damage: str
) -> None:
    import shutil

    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    shards = read_manifest(out)["shards"]
    index = {"truncate_last": len(shards) - 1, "truncate_middle": 2, "empty_first": 0}[damage]
    path = out / shards[index]["file"]
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty_first" else data[: len(data) // 2])
    what = "empty" if damage == "empty_first" else "truncated"
    with pytest.raises(SaeRewardError, match=rf"{path.name} is {what}.*re-run `saereward collect`"):
        ActivationStore(out, 1, "all")
    run_collect(config(out, corpus, sample=True), tiny_lm())
    assert_same_collection(reference, out)
    assert ActivationStore(out, 1, "all").n_tokens == read_manifest(out)["n_tokens"]


def test_unreadable_header_is_reported(tmp_path: Path, corpus: Path, reference: Path) -> None:
    import shutil

    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    path = out / shard_name(1)
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # same size, garbage header
    path.write_bytes(bytes(data))
    with pytest.raises(SaeRewardError, match=rf"{path.name} is unreadable.*re-run"):
        ActivationStore(out, 3, "train")


@pytest.mark.parametrize("store_dtype", ["fp32", "fp16"])
def test_non_finite_activations_are_refused(tmp_path: Path, corpus: Path, store_dtype: str) -> None:
    model, _ = make_tiny("llama", seed=1)
    lm = LoadedModel(model=model, tokenizer=char_tokenizer(), spec="tiny", source="hf", path="")

    def poison(_m: Any, _i: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        if store_dtype == "fp32":
            h[:, -1] = float("nan")
        else:
            h = h * 1e6  # finite in fp32, inf once stored as fp16
        return (h, *out[1:]) if isinstance(out, tuple) else h

    decoder_layers(model)[1].register_forward_hook(poison)
    cfg = config(tmp_path / "out", corpus, task=None, store_dtype=store_dtype)
    with pytest.raises(SaeRewardError, match=r"NaN/inf\) at layer 1 .*shard 0"):
        run_collect(cfg, lm)
    assert not (tmp_path / "out" / shard_name(0)).exists()


def test_hf_dataset_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path / "out", task=None, hf_dataset="wikitext", hf_config="wikitext-2-raw-v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaeRewardError, match="offline mode is set.*text_paths"):
        run_collect(cfg, tiny_lm())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for flag in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(act, "hub_reachable", lambda: (False, "https://huggingface.co"))
    with pytest.raises(SaeRewardError, match="cannot reach https://huggingface.co.*text_paths"):
        run_collect(cfg, tiny_lm())
    assert not (tmp_path / "out").exists()


def test_missing_text_file(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="not found"):
        run_collect(config(tmp_path / "out", task=None, text_paths=(str(tmp_path / "nope.txt"),)), tiny_lm())


def test_text_that_yields_no_tokens_is_an_error(tmp_path: Path) -> None:
    """An empty text file, or one with no document in it (blank lines), is refused before the model
    runs: no folder of 0 tokens that train-sae would reject later."""
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n\n   \n\n")
    with pytest.raises(SaeRewardError, match="empty.txt is empty"):
        run_collect(config(tmp_path / "a", task=None, text_paths=(str(empty),)), tiny_lm())
    with pytest.raises(SaeRewardError, match="blank.txt holds no text"):
        run_collect(config(tmp_path / "b", task=None, text_paths=(str(blank),)), tiny_lm())
    assert not (tmp_path / "b" / "manifest.json").exists()
    short = tmp_path / "short.txt"  # text, but no chunk longer than skip_first: an error after the run
    short.write_text("hi\n")
    with pytest.raises(SaeRewardError, match="collected no tokens"):
        run_collect(config(tmp_path / "c", task=None, text_paths=(str(short),), skip_first=8), tiny_lm())
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"] is False


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    a = x.float().numpy()
    return torch.from_numpy(a[np.lexsort(a.T[::-1])])


def test_reader_shuffle_is_a_deterministic_permutation(reference: Path) -> None:
    store = ActivationStore(reference, 3, "train")
    kw = {"seed": 7, "buffer_tokens": 64}
    a = list(store.iter_batches(50, **kw))
    b = list(store.iter_batches(50, **kw))
    c = list(store.iter_batches(50, seed=8, buffer_tokens=64))
    assert len(a) == store.num_batches(50) and all(x.shape == (50, 64) for x in a[:-1])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    ordered = store.read()
    assert not torch.equal(torch.cat(a), ordered)
    assert torch.equal(sort_rows(torch.cat(a)), sort_rows(ordered))  # every row exactly once
    assert torch.equal(torch.cat(list(store.iter_batches(50, shuffle=False))), ordered)
    windows = store.windows(0, shuffle=True, seed=7, buffer_tokens=64)
    assert max(sum(p.stop - p.start for p in w) for w in windows) <= 64 and len(windows) > 3
    bf = next(store.iter_batches(50, dtype=torch.bfloat16, **kw))
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, a[0].bfloat16())
    assert len(list(store.iter_batches(50, drop_last=True, **kw))) == store.n_tokens // 50


@pytest.mark.parametrize("loop", [False, True])
def test_reader_resume_by_start_batch(reference: Path, loop: bool) -> None:
    store = ActivationStore(reference, 1, "train")
    kw = {"seed": 3, "buffer_tokens": 80, "loop": loop}
    n_total = 3 * store.num_batches(37) if loop else store.num_batches(37)
    full = list(itertools.islice(store.iter_batches(37, **kw), n_total))
    for k in sorted({0, 1, 5, store.num_batches(37) - 1, store.num_batches(37) + 2, n_total - 1}):
        if k >= n_total:
            continue
        rest = list(itertools.islice(store.iter_batches(37, start_batch=k, **kw), n_total - k))
        assert len(rest) == n_total - k
        assert all(torch.equal(x, y) for x, y in zip(rest, full[k:], strict=True)), k
    if loop:  # epochs are reshuffled, and batches run across the epoch boundary
        n = store.n_tokens
        stream = torch.cat(full)
        assert not torch.equal(stream[:n], stream[n : 2 * n])
        assert torch.equal(sort_rows(stream[:n]), sort_rows(stream[n : 2 * n]))
    else:
        assert list(store.iter_batches(37, start_batch=n_total, **kw)) == []


def test_heldout_split_is_disjoint_from_train(reference: Path) -> None:
    man = read_manifest(reference)
    train, held, both = (ActivationStore(reference, 1, s) for s in ("train", "heldout", "all"))
    assert 0 < held.n_tokens < train.n_tokens and train.n_tokens + held.n_tokens == both.n_tokens
    assert man["n_heldout"] == held.n_tokens and man["n_train"] == train.n_tokens
    assert torch.equal(sort_rows(torch.cat([train.read(), held.read()])), sort_rows(both.read()))
    seen: dict[str, dict[int, set[int]]] = {"train": {}, "heldout": {}}
    for entry, t in zip(man["shards"], shard_tensors(reference), strict=True):
        h = entry["heldout_start"]
        seen["train"].setdefault(entry["source"], set()).update(t["seq_ids"][:h].tolist())
        seen["heldout"].setdefault(entry["source"], set()).update(t["seq_ids"][h:].tolist())
    for source, held_ids in seen["heldout"].items():
        if man["sources"][source]["kind"] == "task":  # items never straddle shards; documents may
            assert not held_ids & seen["train"][source]
    assert any(seen["heldout"].values())
    # the bootstrap's units: one code per (source, seq_id), rows in read() order
    pairs = [
        (entry["source"], i)
        for entry, t in zip(man["shards"], shard_tensors(reference), strict=True)
        for i in t["seq_ids"][entry["heldout_start"] :].tolist()
    ]
    codes = held.sequences()
    assert len(codes) == held.n_tokens == len(pairs)
    code_of: dict[tuple[str, int], set[int]] = {}
    for pair, code in zip(pairs, codes.tolist(), strict=True):
        code_of.setdefault(pair, set()).add(code)
    assert all(len(c) == 1 for c in code_of.values())  # one code per sequence ...
    assert len(set(codes.tolist())) == len(code_of)  # ... and one sequence per code
    assert torch.equal(held.sequences(7), codes[:7])


def test_reader_errors(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match=r"layer 2 was not collected.*\[1, 3\]"):
        ActivationStore(reference, 2)
    assert ActivationStore(reference, -1).layer == 3
    with pytest.raises(SaeRewardError, match="no manifest.json"):
        ActivationStore(tmp_path, 1)


# --------------------------------------------------------------------------------------------------
# MoE and hybrid models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5", "falcon_h1"])
def test_collect_on_moe_and_hybrid_models(tmp_path: Path, arch: str) -> None:
    lm = tiny_lm(arch)
    corpus = tmp_path / "short.txt"
    corpus.write_text(CORPUS.split("\n\n", 2)[2])  # one long paragraph (3 chunks, a padded tail) + two short
    cfg = config(
        tmp_path / "out", corpus, n=3, max_new_tokens=4, layers=(0, 3), shard_tokens=10_000, batch_size=8
    )
    run_collect(cfg, lm)
    man = read_manifest(cfg.out)
    assert man["complete"] and [s["kind"] for s in man["sources"]] == ["task", "corpus"]
    shards = shard_tensors(Path(cfg.out))
    corpus_rows = [t for s, t in zip(man["shards"], shards, strict=True) if s["source"] == 1]
    exp = expected_corpus_rows(lm, corpus, cfg)
    for layer in cfg.layers:
        assert all(torch.isfinite(t[f"layer_{layer}"]).all() for t in shards)
        # left-padded batches give the same residuals as each chunk alone (SSM/linear-attention too)
        assert_rows_close(
            torch.cat([t[f"layer_{layer}"] for t in corpus_rows]), exp["acts"][layer], 1e-3, 1e-4
        )
    store = ActivationStore(cfg.out, 3, "all")
    assert store.n_tokens == man["n_tokens"] and next(store.iter_batches(16)).shape == (16, 64)
    # and a short SAE training run on what was collected from this architecture
    from saereward.sae.formats import load_sae
    from saereward.sae.stages import TrainSAEStageConfig, run_train_sae
    from saereward.sae.train import SAETrainConfig

    train = SAETrainConfig(
        d_sae=128, k=4, batch_size=16, total_tokens=96, warmup_steps=1, init_tokens=32, progress=False
    )
    folder = run_train_sae(
        TrainSAEStageConfig(
            activations=str(cfg.out), layer=3, out=str(tmp_path / "sae"), eval_tokens=0, train=train
        )
    )
    sae = load_sae(folder)
    assert sae.cfg.d_in == 64 and sae.cfg.layer == 3
    x = next(store.iter_batches(16))
    assert torch.isfinite(sae.decode(sae.encode(x))).all()


# --------------------------------------------------------------------------------------------------
# The real embedded model
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_collect_smollm(smollm: LoadedModel, tmp_path: Path, corpus: Path) -> None:
    cfg = CollectConfig(
        layers=(3, 15),
        n=4,
        max_new_tokens=8,
        batch_size=4,
        text_paths=(str(corpus),),
        context_len=64,
        shard_tokens=400,
        max_tokens=200,  # the task gives ~150 tokens, so the budget cuts the corpus short
        out=str(tmp_path / "out"),
        progress=False,
    )
    run_collect(cfg, smollm)
    man = read_manifest(cfg.out)
    assert man["complete"] and man["n_tokens"] == 200 and man["d_model"] == 576
    assert [s["source"] for s in man["shards"]] == [0, 1]
    src = man["sources"]
    assert src[1]["prefix_ids"] == []  # SmolLM2's tokenizer adds no BOS
    assert src[0]["shared_prefix_tokens"] > 20  # the two few-shot demos
    store = ActivationStore(cfg.out, 15, "all")
    rows = store.read()
    assert rows.shape == (200, 576) and torch.isfinite(rows).all()
    # skip_first drops the attention sink (norm ~2e4 at layer 15); the other rows are ~1e2
    assert rows.norm(dim=-1).max() < 5_000
    json.dumps(man)  # the manifest is plain JSON


def test_nan_rows_in_a_shard_are_named_when_read(tmp_path: Path, reference: Path) -> None:
    """A shard whose bytes are sound but whose rows hold NaN is refused as it is read: the error names
    the shard and the rows, so no SAE is trained on it."""
    import shutil

    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    path = out / read_manifest(out)["shards"][1]["file"]
    raw = bytearray(path.read_bytes())  # overwrite rows 3..5 of layer_1 in place: same size, same header
    n_header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n_header])["layer_1"]
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[meta["dtype"]]
    nan = torch.full((3, meta["shape"][1]), float("nan"), dtype=dtype).view(torch.uint8).flatten()
    start = 8 + n_header + meta["data_offsets"][0] + nan.numel()  # row 3 = 3 rows' bytes in
    raw[start : start + nan.numel()] = nan.numpy().tobytes()
    path.write_bytes(bytes(raw))
    store = ActivationStore(out, 1, "all")  # header, size and shapes are still right
    with pytest.raises(SaeRewardError, match=rf"{path.name} has NaN/inf in layer_1 at 3 rows \(3..5\)"):
        store.read()
    assert ActivationStore(out, 3, "all").read().isfinite().all()  # the other layer is untouched


def test_train_sae_resumes_only_on_the_data_it_started_on(tmp_path: Path) -> None:
    """A train-sae run resumes only into its settings and onto its activations: another collect folder
    (or the same path re-collected) is refused, and a refused resume rewrites nothing."""
    from saereward.sae.stages import TrainSAEStageConfig, run_train_sae
    from saereward.sae.train import SAETrainConfig

    a, b = tmp_path / "a", tmp_path / "b"
    run_collect(config(a, seed=0), tiny_lm())
    run_collect(config(b, seed=1), tiny_lm())
    out = tmp_path / "sae"
    train = SAETrainConfig(
        d_sae=64,
        k=4,
        batch_size=16,
        total_tokens=64,
        warmup_steps=1,
        init_tokens=32,
        checkpoint_every=2,
        progress=False,
    )

    def stage(acts: Path, **kw: Any) -> TrainSAEStageConfig:
        return TrainSAEStageConfig(activations=str(acts), layer=3, out=str(out), eval_tokens=0, **kw)

    run_train_sae(stage(a, train=train))
    before = (out / "config.json").read_text()
    with pytest.raises(SaeRewardError, match=r"trained on other data \(differs in: activations\)"):
        run_train_sae(stage(b, train=train))
    with pytest.raises(SaeRewardError, match=r"other settings \(k 4 -> 8\)"):
        run_train_sae(stage(a, train=dataclasses.replace(train, k=8)))
    assert (out / "config.json").read_text() == before
    run_train_sae(stage(a, train=train))  # the same data and settings resume
