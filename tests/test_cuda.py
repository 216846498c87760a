"""The CUDA paths: SAE training, the pack scorer, the own decode loop, the GRPO trainers, steering.

Each test runs on ``cuda`` where torch sees a GPU (skipped elsewhere, e.g. in CI), and the TRL test also
runs on ``cpu``, so its logic is checked on every machine. Tiny random models only: no download, no
embedded model (the GPU machine of this project receives at most 64 MiB of files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_models import char_tokenizer, make_tiny, random_sae

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def cuda_only(fn: Any) -> Any:
    for mark in CUDA:
        fn = mark(fn)
    return fn


@cuda_only
def test_sae_trainer_fits_on_cuda(tmp_path: Path) -> None:
    """Training on CUDA (bf16 selection through cuBLAS, the sparse kernels without the worker pool)
    learns like the CPU path, and its saved SAE loads on the CPU with the same reconstructions."""
    from saereward.sae.formats import load_sae
    from saereward.sae.train import SAETrainer
    from test_sae_train import D, _cfg, synthetic

    cfg = _cfg(total_tokens=64 * 80, dead_tokens=64 * 10, lr=3e-3)  # test_sae_train's learning setting
    gpu = SAETrainer(cfg, D, device="cuda", run_dir=tmp_path).fit(synthetic)
    cpu = SAETrainer(cfg, D).fit(synthetic)
    assert gpu.W_enc.is_cuda and gpu.W_dec.is_cuda
    x = next(synthetic(500))
    with torch.no_grad():
        fvu_gpu, fvu_cpu = float(gpu(x.cuda()).fvu), float(cpu(x).fvu)
        assert fvu_gpu < 0.25 and abs(fvu_gpu - fvu_cpu) < 0.03, (fvu_gpu, fvu_cpu)
        loaded = load_sae(tmp_path / "sae")
        torch.testing.assert_close(loaded(x).recon, gpu(x.cuda()).recon.cpu(), rtol=1e-4, atol=1e-4)


@cuda_only
def test_pack_scorer_on_cuda_matches_cpu() -> None:
    from saereward.features.pack import Feature, FeaturePack
    from saereward.features.scoring import PackScorer

    pack = FeaturePack("t", [Feature(i, 1.0) for i in range(0, 8)], [Feature(i, -0.5) for i in range(8, 16)])
    x = torch.randn(3, 7, 64) * 3
    cpu = PackScorer(random_sae(d_in=64, d_sae=256, k=8), pack)
    gpu = PackScorer(random_sae(d_in=64, d_sae=256, k=8), pack).to("cuda")
    assert gpu.ids.is_cuda and gpu.weights.is_cuda
    want = cpu.token_scores(x)
    torch.testing.assert_close(gpu.token_scores(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.token_scores(x).cpu(), want, rtol=1e-4, atol=1e-4)  # moved for you


@cuda_only
def test_fast_decode_on_cuda_matches_generate() -> None:
    """Greedy tokens and captured residuals of the own decode loop equal ``generate()``'s on CUDA."""
    from saereward.model.generate import SamplingConfig, generate_batch
    from saereward.model.lm import LoadedModel

    model, _ = make_tiny("llama")
    lm = LoadedModel(model=model.cuda(), tokenizer=char_tokenizer(), spec="tiny:llama", source="hf", path="")
    prompts = [f"{a}+{b}=" for a, b in zip(range(3, 23), range(40, 60))]
    prompts[::3] = [p * 2 for p in prompts[::3]]  # ragged left padding
    sampling = SamplingConfig(max_new_tokens=16)
    ref = generate_batch(lm, prompts, sampling, capture_layers=[1])
    fast = generate_batch(lm, prompts, sampling, capture_layers=[1], fast_decode=True)
    assert ref.sequences.is_cuda and fast.sequences.is_cuda
    assert torch.equal(fast.sequences, ref.sequences)
    assert fast.completions == ref.completions
    m = ref.residual_mask
    torch.testing.assert_close(fast.residuals[1][m], ref.residuals[1][m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sae_grpo_trainer_runs_on_the_models_device(tmp_path: Path, device: str) -> None:
    """SAEGRPOTrainer on a tiny model: the scorer follows the model to TRL's device, the per-token
    advantages reach the loss, and the LoRA weights move."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from saereward.features.baseline import fit_baseline
    from saereward.features.pack import Feature, FeaturePack
    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer

    gen = torch.Generator().manual_seed(0)
    model, _ = make_tiny("llama")
    tok = char_tokenizer()
    ds = Dataset.from_list([{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(10, 18)])

    def reward(completions: list[Any], answer: list[int], **_: Any) -> list[float]:
        return [float(str(a)[:1] in c) for c, a in zip(completions, answer)]

    pack = FeaturePack(
        "t", [Feature(i, 1.0) for i in range(16)], [Feature(i, -1.0) for i in range(16, 32)], layer=2
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        beta=0.05,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = SAEGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        scorer=PackScorer(random_sae(d_in=64, d_sae=256, k=8, layer=2), pack),
        lam=0.5,
        # the default (position) form's fixed scale: a baseline fitted on seeded synthetic scores
        baseline=fit_baseline([torch.randn(6, generator=gen) for _ in range(24)], min_count=4),
    )
    assert trainer.sae_scorer.weights.device.type == device
    assert next(trainer.model.parameters()).device.type == device
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    seen: list[torch.Tensor] = []
    orig = trainer._compute_loss

    def spy(model: Any, inputs: dict[str, Any]) -> Any:
        seen.append(inputs["advantages"].detach())
        return orig(model, inputs)

    trainer._compute_loss = spy  # type: ignore[method-assign]
    trainer.train()
    assert seen and all(a.dim() == 2 and a.device.type == device for a in seen)
    assert any((a[:, 1:] - a[:, :-1]).abs().sum() > 0 for a in seen)  # varies along the tokens
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    assert any("sae/mech_mean" in h for h in trainer.state.log_history)


@cuda_only
@pytest.mark.parametrize("source", ["policy", "reference"])
def test_lean_grpo_trainer_on_cuda(tmp_path: Path, source: str) -> None:
    """``saereward train-rl --device cuda``'s trainer: two steps with the per-token SAE reward on a tiny
    model on the GPU; the LoRA weights move, the logged numbers are finite, the checkpoint is written."""
    import math

    from saereward.rl.grpo import GRPOTrainer
    from test_rl import fresh_tiny, rl_cfg, tiny_pack

    lm = fresh_tiny()
    lm.model.cuda()
    cfg = rl_cfg(
        tmp_path / "run",
        reward="sae",
        pack=str(tiny_pack(tmp_path)),
        reward_source=source,
        lam=0.5,
        device="cuda",
    )
    tr = GRPOTrainer(cfg, lm=lm)
    assert tr.device.type == "cuda" and tr.scorer is not None and tr.scorer.weights.is_cuda
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    summary = tr.fit()
    after = dict(tr.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    assert summary["eval_last"]["eval_n"] == 6
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "sec_step" in r]
    assert len(steps) == 2
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("outcome", "mech", "kl", "grad_norm"))
    assert (tmp_path / "run" / "checkpoint" / "adapter.safetensors").is_file()


@cuda_only
def test_steer_and_logit_lens_on_cuda_match_cpu(tmp_path: Path) -> None:
    """``steer --device cuda`` (vector and SAE-feature clamp conditions, the prompt residual norm) and the
    logit lens of ``layers`` on a tiny model on the GPU: they run, and their numbers match the CPU's."""
    import math

    import test_stage1  # noqa: F401  (registers the hash_test task)
    from saereward.analysis.steer import SteerConfig, run_steer
    from saereward.features.layers import logit_lens
    from test_steer import tiny_pack, write_rollouts
    from tiny_models import tiny_lm

    ro = write_rollouts(tmp_path / "ro", layer=1)
    pack = tiny_pack(tmp_path / "p")
    res = {}
    for device in ("cpu", "cuda"):
        lm = tiny_lm("llama")
        lm.model.to(device)
        cfg = SteerConfig(model="tiny", task="hash_test", n=6, max_new_tokens=4, batch_size=6, rollouts=str(ro),
                          pack=str(pack), scales=(0.5, -0.5), feature=3, feature_mode="clamp",
                          feature_values=(0.0, 20.0), device=device, out=str(tmp_path / device), progress=False)  # fmt: skip
        res[device] = run_steer(cfg, lm=lm)
        ex = [("Q: 1+2\nA:", " it is 3", "3")]
        res[device]["lens"] = logit_lens(lm, ex, norm=True)["answer_prob"]
    cpu, gpu = res["cpu"], res["cuda"]
    assert gpu["residual_norm"]["value"] == pytest.approx(cpu["residual_norm"]["value"], rel=1e-4)
    assert [r["label"] for r in gpu["rows"]] == [r["label"] for r in cpu["rows"]]
    rows = {r["label"]: r for r in gpu["rows"]}
    # a constant shift: exactly scale * the mean norm, whatever is generated
    for lab in ("vec+0.5", "vec-0.5"):
        assert rows[lab]["perturbation_frac"] == pytest.approx(0.5, rel=1e-4)
    # the clamp's top-k is chosen in bf16 on CUDA (fp32 on AVX2 CPUs) and greedy near-ties of a random model
    # may pick other tokens: the clamp rows must run and be finite, not equal the CPU's
    assert all(math.isfinite(rows[lab]["perturbation_norm"]) for lab in ("f3_clamp+0", "f3_clamp+20"))
    assert gpu["lens"] == pytest.approx(cpu["lens"], rel=1e-3, abs=1e-6)


def test_device_settings_are_checked_shared_and_ignored_by_resume(tmp_path: Path) -> None:
    """``device``: its form is checked when a config is built; a GPU that is not there is one clear error
    before any model loads; the pipeline shares it with the stages that take it; and where a run ran
    does not make a finished stage or a saved GRPO run count as changed."""
    from saereward import pipeline as pl
    from saereward.config import from_dict, to_dict
    from saereward.data.rollouts import RolloutsConfig
    from saereward.errors import SaeRewardError
    from saereward.model.lm import load_model, require_device
    from saereward.rl.checkpoint import settings_diff
    from saereward.rl.config import GRPOConfig

    with pytest.raises(SaeRewardError, match="device 'gpu' is not cpu, cuda or cuda:N"):
        from_dict(RolloutsConfig, {"device": "gpu"})
    if not torch.cuda.is_available():
        with pytest.raises(SaeRewardError, match="torch sees no CUDA GPU here"):
            load_model("no/such-model", device="cuda")  # refused before the model is looked up
        with pytest.raises(SaeRewardError, match="torch sees no CUDA GPU here"):
            from saereward.sae.stages import TrainSAEStageConfig, run_train_sae

            run_train_sae(TrainSAEStageConfig(activations=str(tmp_path / "missing"), device="cuda"))
    else:
        with pytest.raises(SaeRewardError, match="CUDA GPU"):
            require_device(f"cuda:{torch.cuda.device_count()}")
    assert from_dict(GRPOConfig, {"dtype": "auto", "device": "cuda"}).dtype == "bf16"

    cfg = from_dict(pl.PipelineConfig, {"out": str(tmp_path / "run"), "progress": False, "device": "cuda:0"})
    c = pl.stage_configs(cfg)
    assert c["rollouts"]["rollouts"].device == "cuda:0" and c["collect"]["collect"].device == "cuda:0"
    assert c["sae"]["train_sae"].device == "cuda:0" and c["sae"]["eval_sae"].device == "cuda:0"
    assert c["g2"]["gate_g2"].rl.device == "cuda:0"
    for stage, name in (("layers", "layers"), ("g3", "gate_g3"), ("steer", "steer"), ("drift", "drift")):
        assert c[stage][name].device == "cuda:0", stage
    assert not hasattr(c["g1"]["gate_g1"], "device")  # the statistics stages read saved tensors on the CPU
    rec = {"a": 1, "device": "cpu", "rl": {"device": "cpu", "lr": 2}}
    assert pl._placeless(rec) == pl._placeless(
        {"a": 1, "device": "cuda:0", "rl": {"device": "cuda", "lr": 2}}
    )
    assert pl._placeless(rec) != pl._placeless({"a": 1, "rl": {"lr": 3}})
    saved = to_dict(GRPOConfig())
    assert settings_diff(saved, GRPOConfig(device="cuda")) == []
    assert settings_diff(saved, GRPOConfig(lr=0.5)) == ["lr"]
