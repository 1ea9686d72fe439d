"""Hugging Face transformers (random weights, 2 layers, 4 heads): every head and feed-forward
neuron gated, random masks, compaction equal to the gated model, configuration and
attributes consistent, save/load round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bmrs  # noqa: E402
from bmrs.compaction import count_parameters  # noqa: E402
from bmrs.integrations.transformers import HEADS, NEURONS  # noqa: E402

LAYERS, HEADS_PER_LAYER, HIDDEN, FFN, VOCAB = 2, 4, 32, 37, 50


def _bert(cls=transformers.BertForSequenceClassification, attn="sdpa"):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS_PER_LAYER,
        intermediate_size=FFN, max_position_embeddings=32, num_labels=3, attn_implementation=attn,
    )
    return cls(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS_PER_LAYER, n_inner=FFN, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS_PER_LAYER, intermediate_size=FFN, num_labels=5,
    )
    return transformers.ViTForImageClassification(config)


def _text(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0  # padding in the last example
    return {"input_ids": torch.randint(1, VOCAB, (batch, length), generator=g), "attention_mask": mask}


def _image(batch=3, seed=0):
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


MODELS = {
    "bert": (_bert, _text),
    "bert-eager": (lambda: _bert(attn="eager"), _text),
    "bert-base": (lambda: _bert(transformers.BertModel), _text),
    "gpt2": (_gpt2, _text),
    "vit": (_vit, _image),
}


def _outputs(out):
    """The float outputs that identify a model's result."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for gate in bmrs.gates(model).values():
        with torch.no_grad():
            gate.loc.copy_(torch.empty(gate.num_structures).uniform_(-2, 0, generator=g))
            gate.log_scale.copy_(torch.empty(gate.num_structures).uniform_(-3, 0, generator=g))
        gate.mask.copy_((torch.rand(gate.num_structures, generator=g) < 0.6).float())


def _gated(name, seed=0):
    torch.manual_seed(seed)
    build, data = MODELS[name]
    model = build()
    example = data()
    layout = bmrs.attach_gates(model, example)
    return model, layout, data


@pytest.mark.parametrize("name", list(MODELS))
def test_every_head_and_ffn_neuron_is_gated(name):
    model, layout, _ = _gated(name)
    kinds = {}
    for site in layout.sites.values():
        kinds.setdefault(site.kind, []).append(site.num_structures)
    assert kinds == {HEADS: [HEADS_PER_LAYER] * LAYERS, NEURONS: [FFN] * LAYERS}
    assert all(f.size == s.num_structures for f, s in zip(layout.families, layout.sites.values()))
    assert len(bmrs.gates(model)) == 2 * LAYERS
    # printed as the module that owns the structures, with their kind
    names = bmrs.layer_names(model)
    assert sorted(n.rpartition(":")[2] for n in names.values()) == sorted([HEADS, NEURONS] * LAYERS)
    assert all(names[n] == f"{s.producer}:{s.kind}" for n, s in layout.sites.items())


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_training_draws_one_theta_per_example_and_structure(name):
    model, layout, data = _gated(name)
    seen = {}

    def record(gate, args, out):
        seen[gate] = (args[0], out)

    for gate in bmrs.gates(model).values():
        gate.register_forward_hook(record)
    model.train()
    inputs = data(batch=3)
    _outputs(model(**inputs)).sum().backward()
    assert len(seen) == 2 * LAYERS
    for gate, (x, out) in seen.items():  # x: (N, T, S, D); one theta per example and structure
        theta = (out * x).sum((1, 3)) / (x * x).sum((1, 3))  # out = x theta, if the gate acts so
        assert theta.shape == (3, gate.num_structures) and x.shape[0] == 3 and x.shape[2] == gate.num_structures
        torch.testing.assert_close(out, x * theta[:, None, :, None])
        assert (theta[0] != theta[1]).all() and (theta[:, 0] != theta[:, 1]).all()
    assert all(g.loc.grad is not None and g.loc.grad.abs().sum() > 0 for g in bmrs.gates(model).values())


@pytest.mark.parametrize("name", list(MODELS))
def test_compact_equals_gated_model_and_shrinks_config(name):
    model, layout, data = _gated(name)
    _randomise(model)
    compacted = bmrs.compact(model, data())
    assert type(compacted) is type(model)
    model.eval()
    for seed, kwargs in ((1, {}), (2, {"batch": 2})):  # inputs other than the example too
        inputs = data(seed=seed, **kwargs)
        with torch.no_grad():
            ref, out = _outputs(model(**inputs)), _outputs(compacted(**inputs))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    kept = {n: int(g.mask.sum()) for n, g in bmrs.gates(model).items()}
    heads = [kept[s.site] for s in layout.sites.values() if s.kind == HEADS]
    neurons = [kept[s.site] for s in layout.sites.values() if s.kind == NEURONS]
    config = compacted.config
    assert config.layer_num_attention_heads == heads and sum(heads) < LAYERS * HEADS_PER_LAYER
    assert config.layer_intermediate_size == neurons
    assert count_parameters(compacted) < count_parameters(model)
    assert not bmrs.gates(compacted) and not any(m._forward_pre_hooks for m in compacted.modules())
    # the modules' own attributes follow the weights
    for layer, count in zip(_blocks(compacted), heads):
        attention = _attention(layer)
        assert next(getattr(attention, a) for a in ("num_attention_heads", "num_heads") if hasattr(attention, a)) == count
        width = count * HIDDEN // HEADS_PER_LAYER
        if hasattr(attention, "all_head_size"):
            assert attention.all_head_size == width
        if hasattr(attention, "split_size"):
            assert attention.split_size == width and attention.c_attn.nf == 3 * width


def _blocks(model):
    base = getattr(model, model.base_model_prefix, model)
    return base.h if hasattr(base, "h") else base.encoder.layer if hasattr(base, "encoder") else base.layers


def _attention(block):
    if hasattr(block, "attn"):
        return block.attn
    return block.attention.self if hasattr(block.attention, "self") else block.attention


def test_gpt2_generates_the_same_tokens_after_compaction():
    model, _, data = _gated("gpt2")
    _randomise(model, seed=3)
    compacted = bmrs.compact(model, data())
    model.eval()
    prompt = data(batch=1, length=4, seed=5)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(compacted.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_a_layer_with_every_head_masked_keeps_one_silent_head():
    model, layout, data = _gated("bert")
    site = next(s for s in layout.sites.values() if s.kind == HEADS)
    bmrs.gates(model)[site.site].mask.zero_()
    compacted = bmrs.compact(model, data())
    assert compacted.config.layer_num_attention_heads[0] == 1
    assert torch.all(compacted.bert.encoder.layer[0].attention.output.dense.weight == 0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compacted(**data(seed=4)).logits, model(**data(seed=4)).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_save_and_load_round_trip(name, tmp_path):
    model, _, data = _gated(name)
    _randomise(model, seed=1)
    compacted = bmrs.compact(model, data())
    path = tmp_path / "model.pt"
    bmrs.save_compact(compacted, path)
    loaded = bmrs.load_compact(path)
    assert type(loaded) is type(compacted)
    assert loaded.config.layer_num_attention_heads == compacted.config.layer_num_attention_heads
    assert loaded.config.layer_intermediate_size == compacted.config.layer_intermediate_size
    inputs = data(seed=7)
    with torch.no_grad():
        assert torch.equal(_outputs(loaded(**inputs)), _outputs(compacted(**inputs)))
    if name == "gpt2":  # the language-model head stays tied to the token embedding
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # weights-only: the file loads without unpickling any object
    data_ = torch.load(path, weights_only=True)
    assert set(data_) == {"state_dict", "metadata"}


def test_l2_criterion_scores_heads_by_their_q_k_v_rows():
    model, layout, _ = _gated("gpt2")
    scores = bmrs.make_criterion("l2").structure_scores(model)
    site = next(s for s in layout.sites.values() if s.kind == HEADS)
    attn = model.transformer.h[0].attn
    d = HIDDEN // HEADS_PER_LAYER
    w = attn.c_attn.weight.detach().double()  # (in, 3 * hidden): q | k | v
    expected = torch.stack([
        torch.cat([w[:, c * HIDDEN + h * d: c * HIDDEN + (h + 1) * d].flatten() for c in range(3)]).norm()
        for h in range(HEADS_PER_LAYER)
    ])
    torch.testing.assert_close(scores[site.site], expected)


def test_exclude_and_heads_false_leave_structures_ungated():
    torch.manual_seed(0)
    model = _bert()
    layout = bmrs.attach_gates(model, _text(), heads=False, exclude=["bert.encoder.layer.1"])
    assert [s.kind for s in layout.sites.values()] == [NEURONS]
    assert layout.skipped["bert.encoder.layer.0.attention"].startswith("excluded")
    assert layout.skipped["bert.encoder.layer.1"] == "excluded"
    bmrs.detach_gates(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
