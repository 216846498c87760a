"""decoder_layers / resolve_layer / hidden_size on tiny models of every supported layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saereward.errors import SaeRewardError
from saereward.model.capture import ResidualCapture
from saereward.model.lm import decoder_layers, hidden_size, num_layers, resolve_layer, unwrap
from tiny_models import ARCHES, D_MODEL, LORA_TARGETS, N_LAYERS, make_tiny

# Where each arch keeps its blocks (the attribute path decoder_layers must land on).
EXPECTED_PATH = {
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "gemma3_mm": "model.language_model.layers",
}


@pytest.fixture(scope="module", params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def _lora(model: nn.Module, arch: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS[arch],
        lora_dropout=0.0,
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, cfg)


def test_decoder_layers_finds_blocks(arch: str) -> None:
    model, _ = make_tiny(arch)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == N_LAYERS == model.config.get_text_config().num_hidden_layers
    assert num_layers(model) == N_LAYERS
    assert layers is model.get_submodule(EXPECTED_PATH.get(arch, "model.layers"))
    # Not something that merely has the right length: the blocks are what the forward runs through.
    assert all("vision" not in type(b).__name__.lower() for b in layers)


def test_hidden_size(arch: str) -> None:
    model, _ = make_tiny(arch)
    assert hidden_size(model) == D_MODEL == model.config.get_text_config().hidden_size


def test_decoder_layers_through_peft_lora(arch: str) -> None:
    model, _ = make_tiny(arch)
    layers = decoder_layers(model)
    peft_model = _lora(model, arch)
    assert unwrap(peft_model) is model
    assert decoder_layers(peft_model) is layers
    assert hidden_size(peft_model) == D_MODEL
    # The LoRA config really wrapped something in every block (so the blocks are PEFT-modified).
    for i, block in enumerate(layers):
        assert any("lora_A" in name for name, _ in block.named_modules()), f"no LoRA in block {i}"
    # Capture through the wrapper hooks the same blocks: LoRA B starts at zero, so outputs are unchanged.
    ids = torch.randint(3, 100, (1, 7))
    with torch.no_grad(), ResidualCapture(peft_model, [1]) as cap:
        hs = peft_model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.sequence(1), hs[2], rtol=0, atol=0)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        {"target_modules": ["embed_tokens", "down_proj"]},
        {"target_modules": ["down_proj"], "modules_to_save": ["embed_tokens"]},
        {"target_modules": ["down_proj"], "trainable_token_indices": [3, 4]},
    ],
    ids=["lora-embedding", "modules-to-save", "trainable-tokens"],
)
def test_hidden_size_with_wrapped_embedding(peft_kwargs: dict) -> None:
    """Regression: PEFT's LoRA / trainable-token embedding wrappers have no ``embedding_dim``."""
    from peft import LoraConfig, get_peft_model

    model, _ = make_tiny("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, **peft_kwargs))
    assert hidden_size(peft_model) == D_MODEL
    assert decoder_layers(peft_model) is model.model.layers


@pytest.mark.parametrize("layer", [N_LAYERS, N_LAYERS + 5, -N_LAYERS - 1, 10**6])
def test_resolve_layer_out_of_range(layer: int) -> None:
    model, _ = make_tiny("llama")
    with pytest.raises(SaeRewardError, match="out of range") as exc:
        resolve_layer(model, layer)
    assert f"{N_LAYERS} decoder layers" in str(exc.value)
    with pytest.raises(SaeRewardError):
        ResidualCapture(model, [0, layer])


def test_resolve_layer_in_range_all_arches(arch: str) -> None:
    model, _ = make_tiny(arch)
    assert [resolve_layer(model, i) for i in range(N_LAYERS)] == list(range(N_LAYERS))
    assert [resolve_layer(model, -i) for i in range(1, N_LAYERS + 1)] == list(range(N_LAYERS - 1, -1, -1))
    for bad in (N_LAYERS, -N_LAYERS - 1):
        with pytest.raises(SaeRewardError):
            resolve_layer(model, bad)


def test_decoder_layers_unknown_model() -> None:
    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(SaeRewardError, match="cannot find the decoder layers"):
        decoder_layers(NoBlocks())


def test_decoder_layers_fallback_skips_vision_tower() -> None:
    """Unknown layouts: the longest ``layers`` list outside vision/audio towers wins."""

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = nn.Module()
            self.vision_tower.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))
            self.lm = nn.Module()
            self.lm.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    m = Custom()
    assert decoder_layers(m) is m.lm.layers
