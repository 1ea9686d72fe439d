"""``bmrs export``: the compacted network as ONNX, TorchScript or torch.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..deploy import FORMATS, export
from ..errors import BMRSError
from ..rundir import is_run_file
from ._common import Formatter, say, set_threads
from ._models import networks

def run(args) -> int:
    set_threads(args)
    out = Path(args.out)
    if out.is_dir():
        raise BMRSError(f"--out {out} is a directory; give a file name")
    source = Path(args.source)
    if is_run_file(out, [source]):
        raise BMRSError(f"--out {out} is a file of the run or model being exported; choose another --out")
    if out.exists() and not args.force:
        raise BMRSError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    small, _, architecture, example, _ = networks(Path(args.source), args.data_dir, need_full=False)
    result = export(small, example, out, args.format)
    say(f"exported the compacted {architecture['name']} of {args.source} to {out} ({args.format}, dynamic batch axis)")
    say(f"checked: {result['checked_with']} gives PyTorch's outputs at batch sizes "
         f"{' and '.join(map(str, result['batches']))} (largest relative error {result['max_relative_error']:.2g}, "
         f"tolerance 1e-05)")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs export``."""
    p = commands.add_parser(
        "export", parents=[parents["threads"]], formatter_class=Formatter,
        help="export the compacted network to ONNX, TorchScript or torch.export",
        description="Export the compacted network of a run (compacted afresh from its gated model) or of a\n"
        "compacted model file, with a dynamic batch axis and BatchNorm folded into the convolutions:\n"
        "  onnx         ONNX (input 'input', output 'output'); needs the extra bmrs[onnx]\n"
        "  torchscript  torch.jit.trace, for torch.jit.load\n"
        "  exported     torch.export (a .pt2 archive), for torch.export.load\n"
        "The written file is loaded again (ONNX: run with onnxruntime) and its outputs are compared\n"
        "with PyTorch's at two batch sizes; they must agree to 1e-5 of the largest output, or\n"
        "nothing is written.",
        epilog="example: bmrs export runs/demo --format onnx --out runs/demo.onnx",
    )
    p.add_argument("source", metavar="RUN_OR_COMPACT", help="run directory, its model.pt / checkpoint.pt, or a compacted model file")
    p.add_argument("--format", choices=FORMATS, required=True, help="export format")
    p.add_argument("--out", metavar="FILE", required=True, help="file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (never the source or a file of its run)")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=run)
