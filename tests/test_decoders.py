"""Hugging Face decoders with grouped-query attention and gated feed-forward blocks (Llama,
Qwen2, Mistral, Gemma; random weights, 2 layers, 8 query heads over 2 key/value heads,
SwiGLU/GeGLU): every head and neuron gated, a key/value head pruned with its query heads,
compaction equal to the gated model, generation with a cache, save/load round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bmrs  # noqa: E402
from bmrs.compaction import count_parameters  # noqa: E402
from bmrs.pruning import count_trainable_parameters, decide, parameter_compression, set_masks  # noqa: E402
from bmrs.integrations.transformers import HEADS, HIDDEN, NEURONS  # noqa: E402

LAYERS, HEADS_PER_LAYER, KV_HEADS, HEAD_DIM, HIDDEN_SIZE, FFN, VOCAB = 2, 8, 2, 8, 64, 48, 50
PER_KV = HEADS_PER_LAYER // KV_HEADS
FAMILIES = ("Llama", "Qwen2", "Mistral", "Gemma")


def _decoder(family):
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN_SIZE, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS_PER_LAYER, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    return getattr(transformers, f"{family}ForCausalLM")(config)


def _text(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0  # padding in the last example
    return {"input_ids": torch.randint(1, VOCAB, (batch, length), generator=g), "attention_mask": mask}


def _gated(family, seed=0):
    torch.manual_seed(seed)
    model = _decoder(family)
    layout = bmrs.attach_gates(model, _text())
    return model, layout


def _randomise(model, seed=0, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    for gate in bmrs.gates(model).values():
        with torch.no_grad():
            gate.loc.copy_(torch.empty(gate.num_structures).uniform_(-2, 0, generator=g))
            gate.log_scale.copy_(torch.empty(gate.num_structures).uniform_(-3, 0, generator=g))
        gate.mask.copy_((torch.rand(gate.num_structures, generator=g) < keep).float())


def _head_gates(model, layout):
    return [bmrs.gates(model)[s.site] for s in layout.sites.values() if s.kind == HEADS]


def _close(model, compacted, seeds=((1, {}), (2, {"batch": 2, "length": 5}))):
    model.eval()
    for seed, kwargs in seeds:  # inputs other than the example too
        inputs = _text(seed=seed, **kwargs)
        with torch.no_grad():
            ref, out = model(**inputs).logits, compacted(**inputs).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_and_ffn_neuron_is_gated_and_only_the_lm_head_is_left(family):
    model, layout = _gated(family)
    kinds = {}
    for site in layout.sites.values():
        kinds.setdefault(site.kind, []).append(site.num_structures)
    assert kinds == {HEADS: [HEADS_PER_LAYER] * LAYERS, NEURONS: [FFN] * LAYERS}
    assert layout.skipped == {"lm_head": layout.skipped["lm_head"]}
    assert layout.skipped["lm_head"].startswith("final layer")
    heads = [f for f in layout.families if f.members[0][0].endswith("o_proj.bmrs_input")]
    assert len(heads) == LAYERS
    for family_ in heads:  # slot j: key/value head j with its query heads j * PER_KV + r
        assert family_.size == KV_HEADS and len(family_.members) == PER_KV
        slots = [sorted(idx[j] for _, idx in family_.members) for j in range(KV_HEADS)]
        assert slots == [list(range(j * PER_KV, (j + 1) * PER_KV)) for j in range(KV_HEADS)]


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_equals_gated_logits_with_random_masks(family):
    model, layout = _gated(family)
    _randomise(model)
    compacted = bmrs.compact(model, _text())
    assert type(compacted) is type(model)
    _close(model, compacted)
    assert count_parameters(compacted) < count_parameters(model)
    assert not bmrs.gates(compacted) and not any(m._forward_pre_hooks for m in compacted.modules())
    config = compacted.config
    for i, layer in enumerate(compacted.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        q, kv = attention.q_proj.out_features // HEAD_DIM, attention.k_proj.out_features // HEAD_DIM
        assert attention.head_dim == HEAD_DIM and q == kv * attention.num_key_value_groups
        assert attention.v_proj.out_features == kv * HEAD_DIM and attention.o_proj.in_features == q * HEAD_DIM
        assert config.layer_num_attention_heads[i] == q and config.layer_num_key_value_heads[i] == kv
        width = mlp.gate_proj.out_features
        assert mlp.up_proj.out_features == mlp.down_proj.in_features == mlp.intermediate_size == width
        assert config.layer_intermediate_size[i] == width
    kept = [int(s.mask.sum()) for s in bmrs.gates(model).values() if s.num_structures == FFN]
    assert config.layer_intermediate_size == [max(k, 1) for k in kept]
    # configuration-wide counts stay: they fix head_dim and the rotary embedding
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS_PER_LAYER, KV_HEADS, HEAD_DIM)


def test_a_key_value_head_goes_with_its_group_and_groups_stay_equal():
    model, layout = _gated("Llama")
    first, second = _head_gates(model, layout)
    # layer 0: group 0 all masked, group 1 one masked -> 1 key/value head with 3 query heads
    first.mask.copy_(torch.tensor([0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.float))
    # layer 1: 2 live heads in group 0, 4 in group 1 -> 2 key/value heads of 4 (2 silent)
    second.mask.copy_(torch.tensor([1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.float))
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    a0, a1 = (layer.self_attn for layer in compacted.model.layers)
    assert (a0.k_proj.out_features // HEAD_DIM, a0.num_key_value_groups) == (1, 3)
    assert (a1.k_proj.out_features // HEAD_DIM, a1.num_key_value_groups) == (2, 4)
    assert compacted.config.layer_num_attention_heads == [3, 8]
    assert compacted.config.layer_num_key_value_heads == [1, 2]
    # the kept key/value head of layer 0 is the original head 1
    original = model.model.layers[0].self_attn
    torch.testing.assert_close(a0.k_proj.weight, original.k_proj.weight[HEAD_DIM:])
    # the silent query heads of layer 1 (group 0's two masked ones) have zero output columns
    columns = a1.o_proj.weight.view(HIDDEN_SIZE, 2 * 4, HEAD_DIM)
    assert [bool(columns[:, h].abs().sum() == 0) for h in range(8)] == [False, True, True, False] + [False] * 4


def test_a_layer_with_every_head_masked_keeps_one_silent_head():
    model, layout = _gated("Qwen2")
    _head_gates(model, layout)[0].mask.zero_()
    compacted = bmrs.compact(model, _text())
    attention = compacted.model.layers[0].self_attn
    assert attention.q_proj.out_features == attention.k_proj.out_features == HEAD_DIM
    assert attention.num_key_value_groups == 1 and torch.all(attention.o_proj.weight == 0)
    _close(model, compacted)


def test_decisions_prune_whole_groups_and_count_the_parameters_compaction_deletes():
    model, layout = _gated("Mistral")
    _randomise(model, seed=4, keep=1.0)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():  # key/value head 1 of layer 0 and its query heads: the smallest weights
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = attention.get_submodule(name).weight
            weight[weight.shape[0] // 2:] *= 1e-3
    set_masks(model, decide(model, bmrs.make_criterion("l2"), target=0.3))
    first, second = _head_gates(model, layout)
    assert first.mask.tolist() == [1.0] * PER_KV + [0.0] * PER_KV
    for gate in (first, second):  # each key/value group kept or removed as a whole
        groups = gate.mask.view(KV_HEADS, PER_KV)
        assert torch.all(groups == groups[:, :1])
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    deleted = count_parameters(model) - count_parameters(compacted)
    gate_params = 2 * sum(int((g.mask == 0).sum()) for g in bmrs.gates(model).values())
    placeholders = 0  # a layer that lost everything keeps one structure
    for gate, site in ((bmrs.gates(model)[n], s) for n, s in layout.sites.items()):
        if int(gate.mask.sum()) == 0:
            placeholders += (HEAD_DIM * (HIDDEN_SIZE * 4) if site.kind == HEADS else 3 * HIDDEN_SIZE)
    assert round(parameter_compression(model) * count_trainable_parameters(model)) == deleted + gate_params + placeholders


@pytest.mark.parametrize("family", ["Llama", "Mistral"])
def test_the_compacted_decoder_generates_the_same_tokens_with_its_cache(family):
    model, _ = _gated(family)
    _randomise(model, seed=3)
    compacted = bmrs.compact(model, _text())
    model.eval()
    prompt = _text(batch=1, length=4, seed=5)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    with torch.no_grad():
        out = compacted.generate(prompt, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, model.generate(prompt, **kwargs))
    cache = out.past_key_values  # the cache holds each layer's own number of key/value heads
    for i, layer in enumerate(compacted.model.layers):
        assert cache.layers[i].keys.shape[1] == layer.self_attn.k_proj.out_features // HEAD_DIM


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_save_and_load_round_trip_with_per_layer_widths(family, tmp_path):
    model, _ = _gated(family)
    _randomise(model, seed=1)
    compacted = bmrs.compact(model, _text())
    path = tmp_path / "decoder.pt"
    bmrs.save_compact(compacted, path)
    loaded = bmrs.load_compact(path)
    assert type(loaded) is type(compacted)
    for attr in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
        assert getattr(loaded.config, attr) == getattr(compacted.config, attr)
    for a, b in zip(loaded.model.layers, compacted.model.layers):
        assert a.self_attn.num_key_value_groups == b.self_attn.num_key_value_groups
    inputs = _text(seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, compacted(**inputs).logits)
    assert set(torch.load(path, weights_only=True)) == {"state_dict", "metadata"}


def test_a_file_whose_head_counts_do_not_fit_is_refused(tmp_path):
    model, _ = _gated("Llama")
    _randomise(model, seed=1)
    compacted = bmrs.compact(model, _text())
    compacted.config.layer_num_key_value_heads = [3, 2]  # 3 key/value heads cannot exist
    path = tmp_path / "bad.pt"
    bmrs.save_compact(compacted, path)
    with pytest.raises(bmrs.BMRSError, match="key/value heads"):
        bmrs.load_compact(path)


def test_l2_scores_a_query_head_with_the_key_value_head_it_reads():
    model, layout = _gated("Llama")
    scores = bmrs.make_criterion("l2").structure_scores(model)
    site = next(s for s in layout.sites.values() if s.kind == HEADS)
    attention = model.model.layers[0].self_attn
    q, k, v = (attention.get_submodule(n).weight.detach().double() for n in ("q_proj", "k_proj", "v_proj"))
    rows = lambda w, h: w[h * HEAD_DIM:(h + 1) * HEAD_DIM].flatten()  # noqa: E731
    expected = torch.stack([
        torch.cat([rows(q, h), rows(k, h // PER_KV), rows(v, h // PER_KV)]).norm() for h in range(HEADS_PER_LAYER)
    ])
    torch.testing.assert_close(scores[site.site], expected)


def test_phi3_gates_its_packed_gate_up_neurons_and_says_why_its_heads_are_not_gated(tmp_path):
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN_SIZE, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS_PER_LAYER, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.Phi3ForCausalLM(config)
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, _text())
    assert [(s.kind, s.num_structures) for s in layout.sites.values()] == [(NEURONS, FFN)] * LAYERS
    attention = [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert set(layout.skipped) == {"lm_head", *attention}
    assert all("configuration shared by all layers" in layout.skipped[n] for n in attention)
    _randomise(model, seed=2)
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    kept = [max(int(g.mask.sum()), 1) for g in bmrs.gates(model).values()]
    for layer, width in zip(compacted.model.layers, kept):  # both halves of gate_up_proj shrink
        assert layer.mlp.gate_up_proj.out_features == 2 * width == 2 * layer.mlp.down_proj.in_features
    assert compacted.config.layer_intermediate_size == kept
    path = tmp_path / "phi3.pt"
    bmrs.save_compact(compacted, path)
    inputs = _text(seed=8)
    with torch.no_grad():
        assert torch.equal(bmrs.load_compact(path)(**inputs).logits, compacted(**inputs).logits)


# --- the hidden width (attach_gates(..., hidden_width=True)) ------------------------------------

WRITERS = 1 + 2 * LAYERS  # the token embedding, and each block's o_proj and down_proj


def _hidden(family="Llama", seed=0):
    torch.manual_seed(seed)
    model = _decoder(family)
    layout = bmrs.attach_gates(model, _text(), hidden_width=True)
    return model, layout


def _stream_family(layout):
    return next(f for f in layout.families if layout.sites[f.members[0][0]].kind == HIDDEN)


def _mask_stream(model, layout, drop):
    for name, idx in _stream_family(layout).members:
        bmrs.gates(model)[name].mask[torch.tensor(idx)[drop]] = 0


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_hidden_width_gated_at_every_writer_and_removed_everywhere(family, tmp_path):
    model, layout = _hidden(family)
    assert layout.skipped == {}  # the language-model head reads the stream: it loses channels too
    stream = _stream_family(layout)
    writers = sorted(layout.sites[n].producer for n, _ in stream.members)
    expected = ["model.embed_tokens"] + [f"model.layers.{i}.{p}" for i in range(LAYERS)
                                         for p in ("mlp.down_proj", "self_attn.o_proj")]
    assert writers == sorted(expected) and stream.size == HIDDEN_SIZE
    _randomise(model, seed=5, keep=0.7)  # heads and neurons, and writers' own masks
    for gate in (bmrs.gates(model)[n] for n, _ in stream.members):
        gate.mask.fill_(1)
    drop = torch.rand(HIDDEN_SIZE, generator=torch.Generator().manual_seed(6)) < 0.4
    _mask_stream(model, layout, drop)
    eps = model.model.norm.variance_epsilon
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    kept = HIDDEN_SIZE - int(drop.sum())
    assert compacted.config.compact_hidden_size == kept and compacted.config.hidden_size == HIDDEN_SIZE
    assert compacted.model.embed_tokens.weight.shape == (VOCAB, kept) and compacted.lm_head.in_features == kept
    for layer in compacted.model.layers:
        assert layer.self_attn.q_proj.in_features == layer.mlp.up_proj.in_features == kept
        assert layer.self_attn.o_proj.out_features == layer.mlp.down_proj.out_features == kept
        assert layer.input_layernorm.weight.shape == (kept,)
    assert compacted.model.norm.variance_epsilon == pytest.approx(eps * HIDDEN_SIZE / kept)
    prompt = _text(batch=1, length=4, seed=5)["input_ids"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    model.eval()
    with torch.no_grad():
        assert torch.equal(compacted.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
    path = tmp_path / "narrow.pt"
    bmrs.save_compact(compacted, path)
    loaded = bmrs.load_compact(path)
    assert loaded.model.norm.variance_epsilon == compacted.model.norm.variance_epsilon
    inputs = _text(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, compacted(**inputs).logits)


def test_hidden_width_counts_what_compaction_deletes():
    model, layout = _hidden()
    drop = torch.rand(HIDDEN_SIZE, generator=torch.Generator().manual_seed(1)) < 0.3
    _mask_stream(model, layout, drop)
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    deleted = count_parameters(model) - count_parameters(compacted)
    counted = round(parameter_compression(model) * count_trainable_parameters(model))
    assert counted == deleted + 2 * WRITERS * int(drop.sum())


def test_a_stream_with_every_channel_masked_keeps_one_silent_channel():
    model, layout = _hidden("Qwen2")
    _mask_stream(model, layout, torch.ones(HIDDEN_SIZE, dtype=torch.bool))
    compacted = bmrs.compact(model, _text())
    assert compacted.config.compact_hidden_size == 1
    _close(model, compacted)


def test_hidden_width_is_left_ungated_where_it_cannot_be_removed_exactly():
    torch.manual_seed(0)
    model = _decoder("Gemma")  # its language-model head is the token embedding (tied)
    with pytest.warns(UserWarning, match="hidden width"):
        layout = bmrs.attach_gates(model, _text(), hidden_width=True)
    assert "tied embeddings" in layout.skipped["hidden width"]
    assert not any(s.kind == HIDDEN for s in layout.sites.values())
    with pytest.raises(bmrs.BMRSError, match="hidden_width"):
        bmrs.attach_gates(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
                          torch.randn(2, 3), hidden_width=True)


def test_hidden_width_with_heads_and_neurons_counts_each_weight_once():
    model, layout = _hidden("Mistral")
    g = torch.Generator().manual_seed(3)
    for family in layout.families:  # whole slots, as decisions remove them, some of every family
        drop = torch.rand(family.size, generator=g) < 0.4
        drop[0] = False  # no layer loses everything (no placeholder)
        drop[-1] = True
        for name, idx in family.members:
            bmrs.gates(model)[name].mask[torch.tensor(idx)[drop]] = 0
    compacted = bmrs.compact(model, _text())
    _close(model, compacted)
    deleted = count_parameters(model) - count_parameters(compacted)
    gate_params = 2 * sum(int((gate.mask == 0).sum()) for gate in bmrs.gates(model).values())
    assert round(parameter_compression(model) * count_trainable_parameters(model)) == deleted + gate_params
