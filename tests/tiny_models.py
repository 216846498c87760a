"""Tiny random-init language models for tests: no download, each builds in well under a second.

``make_tiny(arch, seed=0) -> (model, None)`` returns an fp32 model in eval mode with
``requires_grad`` left on (tests that train adapters need it). Every model shares the same small
shape so tests can treat them alike:

* vocabulary :data:`VOCAB` (128) with ``PAD_ID`` 0, ``BOS_ID`` 1 and ``EOS_ID`` 2;
* hidden size :data:`D_MODEL` (64; GPT-2 and GPT-NeoX too);
* :data:`N_LAYERS` (4) decoder blocks; hybrids mix linear-attention / SSM blocks with full attention
  (see each builder);
* weights drawn with std :data:`INIT_STD` (0.2, not HF's 0.02) so every block visibly changes the
  residual stream (norms grow from ~1.6 after the embedding to ~20-60 after block 3).

No tokenizer is built (the second element is always ``None``): tests feed token ids directly.

Archs (:data:`ARCHES`):

* dense: ``llama``, ``qwen2``, ``gpt2`` (``transformer.h``), ``gpt_neox`` (``gpt_neox.layers``),
  ``gemma3`` (``Gemma3ForCausalLM``, sliding + full attention), ``gemma3_mm``
  (``Gemma3ForConditionalGeneration`` with a tiny SigLIP tower: blocks at
  ``model.language_model.layers``);
* MoE: ``qwen3_moe``, ``mixtral`` (4 experts, top-2); :data:`MOE_ARCHES` also lists the hybrids
  ``qwen3_next`` (experts in every block) and ``jamba`` (experts in blocks 1 and 3);
* hybrid (:data:`HYBRID_ARCHES`), all on transformers' pure-torch fallbacks (no
  ``causal-conv1d`` / ``mamba-ssm`` / ``flash-linear-attention`` kernels):
  ``qwen3_5`` (Gated DeltaNet + full attention; the Qwen3.5 text model), ``qwen3_next``
  (Gated DeltaNet + MoE), ``falcon_h1`` (parallel Mamba2 + attention in every block),
  ``jamba`` (Mamba + attention, MoE), ``bamba`` (Mamba2 + attention).

``LORA_TARGETS[arch]`` is a PEFT LoRA ``target_modules`` list that hits every decoder block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VOCAB = 128
D_MODEL = 64
N_LAYERS = 4
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
#: Weight init std. HF's default 0.02 makes every block a tiny perturbation of the embedding
#: (residual norms barely move layer to layer), so a broken block would hide under tolerances.
INIT_STD = 0.2

_TOKENS = {
    "initializer_range": INIT_STD,
    "vocab_size": VOCAB,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
# Shared transformer shape: 4 heads of 16, 2 KV heads.
_ATTN = {
    "hidden_size": D_MODEL,
    "intermediate_size": 128,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_ATTN, **_TOKENS, head_dim=16))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_ATTN, **_TOKENS))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=4,
        n_positions=256,
        initializer_range=INIT_STD,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(cfg)


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=256,
        **_TOKENS,
    )
    return GPTNeoXForCausalLM(cfg)


def _gemma3_text_config() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_ATTN,
        **_TOKENS,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,  # shorter than the test sequences, so the sliding layers really slide
        layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2),
    )


def _gemma3() -> Any:
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM(_gemma3_text_config())


def _gemma3_mm() -> Any:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    cfg = Gemma3Config(
        text_config=_gemma3_text_config(),
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    return Gemma3ForConditionalGeneration(cfg)


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **_ATTN, **_TOKENS, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    return Qwen3MoeForCausalLM(cfg)


def _mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_ATTN, **_TOKENS, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg)


def _qwen3_5() -> Any:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(
        **_ATTN,
        **_TOKENS,
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    )
    return Qwen3_5ForCausalLM(cfg)


def _qwen3_next() -> Any:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        **_ATTN,
        **_TOKENS,
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    )
    return Qwen3NextForCausalLM(cfg)


def _falcon_h1() -> Any:
    from transformers import FalconH1Config, FalconH1ForCausalLM

    cfg = FalconH1Config(
        **_ATTN,
        **_TOKENS,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=8,
    )
    return FalconH1ForCausalLM(cfg)


def _jamba() -> Any:
    from transformers import JambaConfig, JambaForCausalLM

    cfg = JambaConfig(
        **_ATTN,
        **_TOKENS,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
    )
    return JambaForCausalLM(cfg)


def _bamba() -> Any:
    from transformers import BambaConfig, BambaForCausalLM

    cfg = BambaConfig(
        **_ATTN,
        **_TOKENS,
        attn_layer_indices=[1, 3],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
    )
    return BambaForCausalLM(cfg)


_BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gemma3": _gemma3,
    "gemma3_mm": _gemma3_mm,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen3_5": _qwen3_5,
    "qwen3_next": _qwen3_next,
    "falcon_h1": _falcon_h1,
    "jamba": _jamba,
    "bamba": _bamba,
}

ARCHES: list[str] = list(_BUILDERS)
MOE_ARCHES: list[str] = ["qwen3_moe", "mixtral", "qwen3_next", "jamba"]
HYBRID_ARCHES: list[str] = ["qwen3_5", "qwen3_next", "falcon_h1", "jamba", "bamba"]

#: LoRA ``target_modules`` per arch: linear layers (GPT-2: ``Conv1D``) that together appear in every
#: decoder block and nowhere in a vision tower.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["c_fc"],  # transformers' Conv1D; PEFT handles it with fan_in_fan_out
    "gpt_neox": ["dense_4h_to_h"],
    "gemma3": ["down_proj"],
    "gemma3_mm": ["down_proj"],  # the SigLIP tower names its MLP fc1/fc2
    "qwen3_moe": ["o_proj"],  # experts are fused 3-D parameters, not nn.Linear
    "mixtral": ["o_proj"],
    "qwen3_5": ["down_proj"],
    "qwen3_next": ["down_proj"],  # the shared expert's MLP
    "falcon_h1": ["down_proj"],
    "jamba": ["out_proj", "o_proj"],  # Mamba blocks / attention blocks
    "bamba": ["down_proj"],
}


def make_tiny(arch: str, seed: int = 0) -> tuple[Any, None]:
    """Build the tiny ``arch`` model with weights drawn after ``torch.manual_seed(seed)``; eval mode, fp32.

    Same ``(arch, seed)`` gives bit-identical weights. Note that this reseeds torch's global RNG.
    """
    if arch not in _BUILDERS:
        raise KeyError(f"unknown tiny arch {arch!r}: choose from {', '.join(ARCHES)}")
    torch.manual_seed(seed)
    model = _BUILDERS[arch]()
    model.eval()
    return model, None


def char_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


_LMS: dict[str, Any] = {}


def tiny_lm(arch: str = "llama") -> Any:
    """A cached :class:`saereward.model.lm.LoadedModel` of a tiny model with a character tokenizer."""
    from saereward.model.lm import LoadedModel

    if arch not in _LMS:
        model, _ = make_tiny(arch)
        _LMS[arch] = LoadedModel(
            model=model, tokenizer=char_tokenizer(), spec=f"tiny:{arch}", source="hf", path=""
        )
    return _LMS[arch]


def random_sae(
    d_in: int = D_MODEL,
    d_sae: int = 256,
    k: int = 8,
    seed: int = 0,
    *,
    dtype: Any = None,
    b_dec_scale: float = 0.3,
    b_enc_scale: float = 0.05,
    **cfg: Any,
) -> Any:
    """A random TopK SAE with nonzero biases (so every term of encode/decode is exercised)."""
    import torch

    from saereward.sae.coder import SAEConfig, TopKSAE

    dtype = dtype or torch.float32
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(b_dec_scale * torch.randn(d_in, generator=g, dtype=dtype))
        sae.b_enc.copy_(b_enc_scale * torch.randn(d_sae, generator=g, dtype=dtype))
    return sae
