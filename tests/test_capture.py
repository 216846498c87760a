"""ResidualCapture on tiny models of every arch: plain forward, and during ``generate()``.

Layer L is the output of decoder block L = ``hidden_states[L + 1]`` (HF normalises the last entry, so
the last block is checked as ``final_norm(capture) == hidden_states[-1]``). During generation, the
prefill + per-step captures must line up with one re-forward of the generated ids.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saereward.model.capture import ResidualCapture, forward_residuals, position_ids_from_mask
from saereward.model.lm import decoder_layers
from tiny_models import ARCHES, EOS_ID, N_LAYERS, PAD_ID, VOCAB, make_tiny

NEW_TOKENS = 6
PROMPT_LENS = (5, 8)  # row 0 is left-padded by 3


@pytest.fixture(scope="module", params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def final_norm(model: nn.Module) -> nn.Module:
    """The norm HF applies to the last ``hidden_states`` entry: a sibling of the block list."""
    blocks = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is blocks:
            parent = model.get_submodule(name.rpartition(".")[0])
            break
    for attr in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        if isinstance(getattr(parent, attr, None), nn.Module):
            return getattr(parent, attr)
    raise AssertionError(f"no final norm found next to the blocks of {type(model).__name__}")


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Per position ``|a - e| <= rtol * |e| + atol`` in L2 over the feature dim (scale-free for deep layers)."""
    assert actual.shape == expected.shape
    err = (actual.float() - expected.float()).norm(dim=-1)
    bound = rtol * expected.float().norm(dim=-1) + atol
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error/bound {worst:.3g} (max err {err.max().item():.3g})"


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of lengths 5 and 8, left-padded with PAD_ID to 8; ids avoid PAD/BOS/EOS."""
    width = max(PROMPT_LENS)
    ids = torch.full((len(PROMPT_LENS), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENS):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,))
        mask[row, width - n :] = 1
    return ids, mask


def generate_with_capture(
    model: nn.Module, layers: list[int]
) -> tuple[ResidualCapture, torch.Tensor, torch.Tensor]:
    """Greedy-generate NEW_TOKENS for the two prompts under a capture; return (cap, out_ids, out_mask)."""
    ids, mask = left_padded_prompts()
    with ResidualCapture(model, layers) as cap, torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # EOS is suppressed until then: no early stop, no post-EOS pads
            do_sample=False,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
        )
    assert out.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    out_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    return cap, out, out_mask


# --------------------------------------------------------------------------------------------------
# Plain forward
# --------------------------------------------------------------------------------------------------


def test_capture_equals_hidden_states(arch: str) -> None:
    model, _ = make_tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 9))
    with ResidualCapture(model, range(N_LAYERS)) as cap, torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(cap.sequence(layer), hs[layer + 1], rtol=0, atol=1e-5)
        assert len(cap.chunks(layer)) == 1
    # The last entry of hidden_states is after the final norm; the capture is the raw block output.
    last = cap.sequence(N_LAYERS - 1)
    assert not torch.allclose(last, hs[-1])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(last), hs[-1], rtol=1e-5, atol=1e-5)
    assert cap.valid_length() == ids.shape[1]
    assert cap.sequence(-1) is not None and torch.equal(cap.sequence(-1), last)


def test_forward_residuals_stop_early_equals_full_forward(arch: str) -> None:
    """Stopping after the deepest requested block gives the same residuals, and skips the rest."""
    model, _ = make_tiny(arch)
    ids, mask = left_padded_prompts()
    layers = [0, 1]
    full = forward_residuals(model, ids, mask, layers, stop_early=False)
    early = forward_residuals(model, ids, mask, layers)
    for layer in layers:
        torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)
    ran: list[int] = []
    blocks = decoder_layers(model)
    handles = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        forward_residuals(model, ids, mask, layers)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]  # blocks 2 and 3 never ran
    # hooks are cleaned up: a plain forward afterwards runs to the logits
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape[:2] == ids.shape


def test_capture_negative_layers_and_remove() -> None:
    model, _ = make_tiny("llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    cap = ResidualCapture(model, [-1, 0, N_LAYERS - 1])
    assert cap.layers == [0, N_LAYERS - 1]
    with cap, torch.no_grad():
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # hooks are gone after the context
    assert len(cap.chunks(0)) == 1 and len(cap.chunks(-1)) == 1
    cap.clear()
    with pytest.raises(RuntimeError, match="no activations recorded"):
        cap.sequence(0)


def test_capture_store_dtype_and_keep_grad() -> None:
    model, _ = make_tiny("llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    with ResidualCapture(model, [1], store_dtype=torch.bfloat16) as cap, torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert cap.sequence(1).dtype == torch.bfloat16
    torch.testing.assert_close(cap.sequence(1), hs[2].to(torch.bfloat16), rtol=0, atol=0)

    with ResidualCapture(model, [1], keep_grad=True) as cap:
        model(input_ids=ids)
    assert cap.sequence(1).requires_grad
    cap.sequence(1).sum().backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_sequence_total_len_shorter_than_record_raises() -> None:
    model, _ = make_tiny("llama")
    with ResidualCapture(model, [0]) as cap, torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 6)))
    with pytest.raises(ValueError, match="total_len"):
        cap.sequence(0, total_len=5)
    padded = cap.sequence(0, total_len=8)
    assert padded.shape[1] == 8 and torch.equal(padded[:, 6:], torch.zeros_like(padded[:, 6:]))


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# --------------------------------------------------------------------------------------------------
# During generate()
# --------------------------------------------------------------------------------------------------


def check_generate_matches_reforward(model: nn.Module, rtol: float, atol: float) -> None:
    layers = list(range(N_LAYERS))
    cap, out, out_mask = generate_with_capture(model, layers)
    total = out.shape[1]
    ref = forward_residuals(model, out, out_mask, layers)
    valid = out_mask.bool()
    valid[:, -1] = False  # the last sampled token is never fed back through the model
    for layer in layers:
        # one prefill chunk over every prompt position, then one single-token chunk per decode step
        chunks = cap.chunks(layer)
        assert [c.shape[1] for c in chunks] == [max(PROMPT_LENS)] + [1] * (NEW_TOKENS - 1)
        assert cap.valid_length(layer) == total - 1
        seq = cap.sequence(layer, total_len=total)
        assert seq.shape == ref[layer].shape == (2, total, ref[layer].shape[-1])
        assert torch.count_nonzero(seq[:, -1]) == 0
        assert_rows_close(seq[valid], ref[layer][valid], rtol=rtol, atol=atol)


def test_generate_capture_matches_reforward(arch: str) -> None:
    model, _ = make_tiny(arch)
    # qwen3_next's linear-attention layers run the recurrent gated delta rule while decoding and the
    # chunked one in the re-forward: the same function summed in another order, up to 1.2e-4
    # relative in fp32 on an AVX-512 CPU (the other architectures stay inside 1e-4)
    check_generate_matches_reforward(model, rtol=3e-4 if arch == "qwen3_next" else 1e-4, atol=1e-5)


def test_generate_capture_matches_reforward_bf16() -> None:
    model, _ = make_tiny("llama")
    model.to(torch.bfloat16)
    check_generate_matches_reforward(model, rtol=2e-2, atol=1e-3)


def test_reforward_without_position_ids_misaligns_padded_row() -> None:
    """Guards the test above: it can tell when positions are off, as they are for a naive re-forward.

    Without ``position_ids`` the model numbers the left pads too, so with GPT-2's absolute position
    embeddings the padded row shifts while the unpadded row is unchanged. (Rotary models would not
    notice: RoPE attention only sees relative offsets, which a constant shift keeps.)
    """
    model, _ = make_tiny("gpt2")
    cap, out, out_mask = generate_with_capture(model, [1])
    seq = cap.sequence(1, total_len=out.shape[1])
    with ResidualCapture(model, [1]) as naive, torch.no_grad():
        model(input_ids=out, attention_mask=out_mask, use_cache=False)
    naive_seq = naive.sequence(1)
    pad = max(PROMPT_LENS) - min(PROMPT_LENS)
    assert_rows_close(seq[1, :-1], naive_seq[1, :-1], rtol=1e-4, atol=1e-5)
    err = (seq[0, pad + 1 : -1] - naive_seq[0, pad + 1 : -1]).norm(dim=-1)
    assert (err > 1e-2 * naive_seq[0, pad + 1 : -1].norm(dim=-1)).all()


def test_left_padding_does_not_change_valid_positions(arch: str) -> None:
    """A left-padded prompt's residuals equal the unpadded prompt's (what batched rollouts rely on).

    SSM / linear-attention blocks have to zero the pads out of their recurrent state for this to hold.
    """
    model, _ = make_tiny(arch)
    ids = torch.randint(3, VOCAB, (1, 8))
    padded = torch.cat([torch.full((1, 3), PAD_ID), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    alone = forward_residuals(model, ids, torch.ones_like(ids), range(N_LAYERS))
    batched = forward_residuals(model, padded, padded_mask, range(N_LAYERS))
    for layer in range(N_LAYERS):
        assert_rows_close(batched[layer][0, 3:], alone[layer][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"store_dtype": torch.float32}, {"store_device": "cpu"}],
    ids=["default", "dtype", "device"],
)
def test_capture_is_a_copy_not_the_live_tensor(kwargs: dict) -> None:
    """A block output modified in place after the hook must not change what was stored.

    Regression: with a ``store_dtype``/``store_device`` equal to the model's, ``Tensor.to`` returned the
    live output itself, so the capture aliased it (the default path always cloned).
    """

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.model.layers:
                x = block(x)
                x.mul_(2.0)  # in place on the block output, after the hook has run
            return x

    model = InPlace()
    x = torch.randn(1, 3, 4)
    with torch.no_grad():
        expected = model.model.layers[0](x)
        with ResidualCapture(model, [0], **kwargs) as cap:
            model(x)
    torch.testing.assert_close(cap.sequence(0), expected, rtol=0, atol=0)
