"""The real all-MiniLM-L6-v2 (``make test-minilm``): attach, one ELBO step, prune, compact,
save/load and ONNX, on real Debian package descriptions.

The truth each step is checked against is the model itself: the pretrained model's
embeddings before gating, the gated model's outputs after pruning, PyTorch's outputs for the
reloaded and the exported model.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import bmrs  # noqa: E402
from bmrs.compaction import count_parameters  # noqa: E402
from bmrs.integrations.transformers import HEADS, NEURONS  # noqa: E402

import minilm  # noqa: E402 - benchmarks/minilm, put on the path by conftest.py

LAYERS, HEADS_PER_LAYER, FFN = 6, 12, 1536
LENGTH = 64
# Gates that start almost exactly at theta = 1: E[theta] of a log-normal truncated at
# theta <= 1 is about 1 - 0.8 sigma, so the library's default sigma = e^-5 would scale every
# head and neuron by 0.9946 and move the embeddings by about 1e-3.
INIT_LOG_SCALE = -12.0


def _relative(reference, output) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def texts():
    splits, labels = minilm.load_descriptions()
    rows = splits["test"][::280][:6]  # the file is sorted by section: six of them
    return [r["text"] for r in rows], torch.tensor([labels.index(r["label"]) for r in rows]), len(labels)


@pytest.fixture(scope="module")
def pretrained():
    try:
        return minilm.load_checkpoint()
    except bmrs.BMRSError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gated(pretrained, texts):
    """The gated encoder, its layout, the inputs, and the plain model's embeddings."""
    model, tokenizer = pretrained
    inputs = minilm.tokenize(tokenizer, texts[0], LENGTH)
    with torch.no_grad():
        plain = minilm.Embedder(model)(**inputs)
    encoder = copy.deepcopy(model)
    layout = bmrs.attach_gates(encoder, inputs, init_log_scale=INIT_LOG_SCALE)
    return encoder.eval(), layout, inputs, plain


def test_every_head_and_ffn_neuron_is_gated(gated):
    encoder, layout, inputs, _ = gated
    counts = {}
    for site in layout.sites.values():
        counts.setdefault(site.kind, []).append(site.num_structures)
    assert counts == {HEADS: [HEADS_PER_LAYER] * LAYERS, NEURONS: [FFN] * LAYERS}
    assert sum(counts[HEADS]) == 72 and sum(counts[NEURONS]) == 9216
    assert len(bmrs.gates(encoder)) == 2 * LAYERS
    assert inputs["attention_mask"].sum(1).min() < LENGTH  # some descriptions are padded


def test_gated_embeddings_equal_the_pretrained(gated):
    encoder, _, inputs, plain = gated
    with torch.no_grad():
        out = minilm.Embedder(encoder)(**inputs)
    assert (out - plain).abs().max() < 1e-5
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(out)))


def test_one_elbo_step_of_a_classifier(gated, texts):
    encoder, _, inputs, _ = gated
    encoder = copy.deepcopy(encoder)
    torch.manual_seed(0)
    net = minilm.Classifier(encoder, texts[2]).train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss, _, kl = bmrs.elbo_loss(net(**inputs), texts[1], encoder)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss) and float(kl.detach()) > 0
    assert all(g.loc.grad is not None and g.loc.grad.abs().sum() > 0 for g in bmrs.gates(encoder).values())
    changed = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("head.") for n in changed) and any(".loc" in n for n in changed)
    assert any("attention.self.query.weight" in n for n in changed)


def _compacted_matches(encoder, inputs):
    small = bmrs.compact(encoder, inputs)
    encoder.eval()
    with torch.no_grad():
        ref, out = minilm.Embedder(encoder)(**inputs), minilm.Embedder(small)(**inputs)
    assert _relative(ref, out) < 1e-4
    return small


def _randomly_masked(encoder, seed: int, keep: float):
    """A copy of the gated ``encoder`` whose gates keep a random share ``keep`` of their structures."""
    encoder = copy.deepcopy(encoder)
    g = torch.Generator().manual_seed(seed)
    for gate in bmrs.gates(encoder).values():
        gate.mask.copy_((torch.rand(gate.num_structures, generator=g) < keep).float())
    return encoder


def test_random_masks_compact_exactly(gated, texts, pretrained):
    encoder, layout, inputs, _ = gated
    encoder = _randomly_masked(encoder, seed=0, keep=0.5)
    small = _compacted_matches(encoder, inputs)
    kept = {n: int(x.mask.sum()) for n, x in bmrs.gates(encoder).items()}
    assert small.config.layer_num_attention_heads == [kept[s.site] for s in layout.sites.values() if s.kind == HEADS]
    assert small.config.layer_intermediate_size == [kept[s.site] for s in layout.sites.values() if s.kind == NEURONS]
    assert count_parameters(small) < count_parameters(pretrained[0])
    other = minilm.tokenize(pretrained[1], texts[0][:2], 24)  # another batch and length than the trace's
    with torch.no_grad():
        assert _relative(minilm.Embedder(encoder)(**other), minilm.Embedder(small)(**other)) < 1e-4


def test_bmrs_decides_and_the_result_compacts(gated):
    encoder, layout, inputs, _ = gated
    encoder = copy.deepcopy(encoder)
    site = next(s for s in layout.sites.values() if s.kind == HEADS)
    gate = bmrs.gates(encoder)[site.site]
    with torch.no_grad():  # half the first layer's heads with a posterior near theta = e^-20, the prior's low end
        gate.loc[:6] = -18.0
        gate.log_scale[:6] = 1.0
    kept = bmrs.prune(encoder, "bmrs-n-kr")
    assert kept[site.site] <= HEADS_PER_LAYER - 6 and not bool(gate.mask[:6].any())
    assert sum(kept.values()) > 0.9 * (72 + 9216)  # the untouched ones near theta = 1 stay
    _compacted_matches(encoder, inputs)


def test_save_load_and_onnx(gated, tmp_path, pretrained):
    encoder, _, inputs, _ = gated
    small = _compacted_matches(_randomly_masked(encoder, seed=1, keep=0.4), inputs)
    bmrs.save_compact(small, tmp_path / "small.pt")
    loaded = bmrs.load_compact(tmp_path / "small.pt")
    assert type(loaded) is type(small)
    assert loaded.config.layer_num_attention_heads == small.config.layer_num_attention_heads
    with torch.no_grad():
        ref = minilm.Embedder(small)(**inputs)
        # load_compact builds the configuration's default attention (sdpa; the attention
        # implementation is not part of a saved configuration): the same up to rounding
        assert _relative(ref, minilm.Embedder(loaded)(**inputs)) < 1e-5
        loaded.set_attn_implementation(small.config._attn_implementation)
        assert torch.equal(minilm.Embedder(loaded)(**inputs), ref)
    run = minilm.onnx_session(minilm.Embedder(loaded), inputs, tmp_path / "small.onnx")
    assert _relative(ref, run(inputs)) < 1e-4
    other = minilm.tokenize(pretrained[1], ["A tool for the command line.", "Python bindings for a C library."], 16)
    with torch.no_grad():
        assert _relative(minilm.Embedder(loaded)(**other), run(other)) < 1e-4  # other batch and length
