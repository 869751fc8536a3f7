"""fused_posenc.integrations.transformers on tiny random Hugging Face models (no download): patched logits and
parameter gradients equal the stock model's, greedy generate gives the same tokens (with and without padding),
rope types and partial rotary are read from the config, unsupported ones raise, and models converted to FoPE /
TAPA train with the FoPE coefficients as layer parameters."""
import copy

import pytest
import torch

import skips
from fused_posenc.backends import get_backend

_tf_problem = skips.import_problem("transformers")
_cpu_ok, _cpu_why = get_backend("cpu").available()
pytestmark = [pytest.mark.skipif(_tf_problem is not None, reason=f"transformers not importable ({_tf_problem}); "
                                 "scripts/install.sh installs it (the [hf] extra)"),
              pytest.mark.skipif(not _cpu_ok, reason=f"C++ extension not built: {_cpu_why}")]

VOCAB = 101


# families with sliding windows / soft-capping, as their configs set them (windows shorter than the test sequences;
# Gemma-2's scale 1 and cap 2 make the cap bite on random weights)
FAMILY_OPTIONS = {
    "qwen3": dict(head_dim=16),
    "mistral-sliding": dict(sliding_window=5),
    "qwen2-sliding": dict(sliding_window=6, use_sliding_window=True, max_window_layers=1),
    "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=1, attn_logit_softcapping=2.0,
                   final_logit_softcapping=30.0, attn_implementation="eager"),  # HF's Gemma-2 has no SDPA path
}


def _model(family, rope=None, partial=None, layers=2, max_positions=256):
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM)}[family.split("-")[0]]
    params = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    if partial is not None:
        params["partial_rotary_factor"] = partial
    kw = {"attn_implementation": "sdpa", **FAMILY_OPTIONS.get(family, {})}
    config = cls[0](hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                    num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=max_positions,
                    rope_parameters=params, **kw)
    torch.manual_seed(0)
    return cls[1](config).eval()


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale-notruncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "mscale": 0.8, "mscale_all_dim": 0.3, "truncate": False},
}
CASES = [("llama", r, None) for r in ROPES] + [("llama", "default", 0.5), ("mistral", "default", None),
                                                ("qwen2", "default", None), ("qwen2", "yarn", None),
                                                ("qwen3", "default", None), ("qwen3", "llama3", None),
                                                ("mistral-sliding", "default", None),
                                                ("qwen2-sliding", "default", None), ("gemma2", "default", None)]


def _patched(model, **kw):
    from fused_posenc.integrations.transformers import apply_fused_posenc

    return apply_fused_posenc(copy.deepcopy(model), backend="cpu", **kw)


def _ids(b=2, t=23, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,rope,partial", CASES)
def test_logits_and_gradients_equal_the_stock_model(family, rope, partial):
    stock = _model(family, ROPES[rope], partial)
    fused = _patched(stock)
    ids = _ids()
    ref, out = stock(ids).logits, fused(ids).logits
    # float32 idiom: the stock model's own float32 rounding is ~1e-7 here
    assert (out - ref).abs().max().item() < 1e-5
    for m in (stock, fused):
        m.train()
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for (name, a), b in zip(stock.named_parameters(), fused.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_stock_rotation_is_not_run(monkeypatch):
    # HF's apply_rotary_pos_emb must not run in a patched model (rotation happens once, in the kernel)
    import transformers.models.llama.modeling_llama as llama

    stock = _model("llama")
    fused = _patched(stock)

    def boom(*a, **k):
        raise AssertionError("apply_rotary_pos_emb ran")

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", boom)
    fused(_ids())
    with pytest.raises(AssertionError, match="apply_rotary_pos_emb ran"):
        stock(_ids())


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral-sliding", "gemma2"])
def test_greedy_generate_equals_the_stock_model(family):
    stock = _model(family, ROPES["yarn"])
    fused = _patched(stock)
    prompt = _ids(1, 6, seed=3)
    a = stock.generate(prompt, max_new_tokens=10, do_sample=False)
    b = fused.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b), (a, b)


def _no_fallback(monkeypatch):
    import fused_posenc.integrations.transformers as integ

    def boom(*a, **k):
        raise AssertionError("the masked fallback ran")

    monkeypatch.setattr(integ, "_masked_fallback", boom)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral-sliding"])
def test_left_padded_generate_runs_on_the_kernels_and_matches(family, monkeypatch):
    stock = _model(family)
    fused = _patched(stock)
    ids = _ids(2, 9, seed=4).clamp(min=1)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    a = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    _no_fallback(monkeypatch)
    b = fused.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b), (a, b)


def test_right_padded_batch_logits_and_gradients_match_on_real_tokens(monkeypatch):
    stock = _model("qwen3")
    fused = _patched(stock)
    ids = _ids(3, 12, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 10:] = 0, 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    real = mask.bool()
    ref = stock(ids, attention_mask=mask).logits
    _no_fallback(monkeypatch)
    out = fused(ids, attention_mask=mask).logits
    assert (out - ref)[real].abs().max().item() < 1e-5
    for m in (stock, fused):
        m.train()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, a), b in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_mask_with_holes_takes_the_masked_fallback_and_matches():
    stock = _model("llama")
    fused = _patched(stock)
    ids = _ids(2, 10, seed=7)
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0  # zeros between ones: not padding, a real mask
    real = mask.bool()
    ref, out = stock(ids, attention_mask=mask).logits, fused(ids, attention_mask=mask).logits
    assert (out - ref)[real].abs().max().item() < 1e-5


@pytest.mark.parametrize("encoding", ["alibi", "tapa"])
def test_padded_rows_of_converted_models_equal_the_unpadded_rows(encoding):
    """ALiBi and TAPA have no masked fallback: padding runs on the kernels' key lengths, and a left-padded row's
    real tokens (positions 0..n-1) get the logits the same row gets alone."""
    fused = _patched(_model("llama"), encoding=encoding)
    ids = _ids(2, 9, seed=8).clamp(min=1)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = fused(ids, attention_mask=mask, position_ids=pos).logits
    alone = fused(ids[1:, 4:]).logits
    assert (out[1, 4:] - alone[0]).abs().max().item() < 1e-5
    assert (out[0] - fused(ids[:1]).logits[0]).abs().max().item() < 1e-5


def test_rope_from_config_equals_rope_from_the_model():
    from fused_posenc.integrations.transformers import rope_from_hf

    for rope in ("default", "yarn", "llama3", "yarn-mscale-notruncate"):
        m = _model("llama", ROPES[rope], layers=1)
        a, b = rope_from_hf(m.config), rope_from_hf(m.config, m.model.rotary_emb)
        assert a.inv_freq == b.inv_freq and a.attention_factor == pytest.approx(b.attention_factor), rope


RUNTIME_ROPES = {  # frequencies chosen by the sequence length at run time; the switch at 16 positions
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 16),
    "longrope": ({"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                  "long_factor": [1.0 + 0.7 * i for i in range(8)], "original_max_position_embeddings": 16}, 64),
}


@pytest.mark.parametrize("rope", list(RUNTIME_ROPES))
def test_runtime_dependent_rope_types_follow_the_sequence_length(rope):
    """dynamic NTK and longrope change their frequencies when a call's positions pass 16: the patched model
    follows the stock one through short, long and short-again calls (and the frequencies really change)."""
    params, max_positions = RUNTIME_ROPES[rope]
    stock = _model("llama", params, max_positions=max_positions)
    fused = _patched(stock)
    freqs = []
    for t in (10, 23, 40, 12):
        ids = _ids(2, t, seed=t)
        ref, out = stock(ids).logits, fused(ids).logits
        assert (out - ref).abs().max().item() < 1e-5, (rope, t)
        freqs.append(fused.model.rotary_emb.inv_freq.clone())
    assert not torch.equal(freqs[0], freqs[1]) and torch.equal(freqs[0], freqs[3])
    fused.train()
    stock.train()
    ids = _ids(2, 23, seed=5)
    for m in (stock, fused):
        m(ids, labels=ids).loss.backward()
    for (name, a), b in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_runtime_rope_greedy_generate_equals_the_stock_model_below_the_switch():
    params, _ = RUNTIME_ROPES["longrope"]
    stock = _model("llama", params, max_positions=64)
    fused = _patched(stock)
    prompt = _ids(1, 5, seed=3)
    a = stock.generate(prompt, max_new_tokens=10, do_sample=False)  # 15 positions: short factors throughout
    b = fused.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize("encoding", ["fope", "tapa"])
def test_converted_models_train(encoding):
    fused = _patched(_model("qwen2"), encoding=encoding)
    fused.train()
    names = [n for n, _ in fused.named_parameters() if "fused_posenc_encoding" in n]
    assert (len(names) > 0) == (encoding == "fope"), names
    if encoding == "fope":
        assert any("cos_coef" in k for k in fused.state_dict())
    opt = torch.optim.Adam(fused.parameters(), lr=3e-3)
    ids = _ids(4, 16, seed=5)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = fused(ids, labels=ids).loss
        loss.backward()
        if encoding == "fope":
            coef = dict(fused.named_parameters())[names[0]]
            assert coef.grad is not None and coef.grad.abs().max() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_model_compiles_fullgraph(family):
    # the whole patched model (HF's code around the fused custom ops) in one graph; the same loss and gradients
    fused = _patched(_model(family, ROPES["yarn"]))
    fused.train()
    ids = _ids()

    def loss_fn(ids):
        return fused(ids, labels=ids).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        fused.zero_grad()
        loss = fn(ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in fused.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
