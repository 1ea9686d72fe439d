"""The ``bmrs`` command: train, sweep, report, compact, inspect, export, time and reproduce.

A thin dispatcher: each command is a module of :mod:`bmrs.commands` with ``add_parser``
(its options) and ``run`` (its body), listed in :data:`COMMANDS`. Every error a user can
cause (a :class:`~bmrs.BMRSError`: a bad option, an unknown name, a file that is not what
bmrs expects; an ``OSError``: a file or directory that is missing or cannot be read or
written; a download whose checksum is wrong) ends the command with one line
``bmrs: error: ...`` on stderr and exit status 2; training that diverges ends with one line
and exit status 3. Anything else is a defect and shows its traceback. A signal that stops
``train --nproc`` ends it with one line and exit status 128 + the signal's number (143 for
SIGTERM, 130 for Ctrl-C). Under torchrun, each process also writes the line that ends it
into torchrun's error file, from which ``train --nproc`` names the cause of a failure.
Result files are written to temporary names and renamed, so an interrupted command leaves
no half-written file, and no command replaces a file it did not write (``--force``). See
``docs/cli.md`` and ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from . import __version__
from .commands import bench, compact, explain, export, info, report, reproduce, sweep, train
from .commands._common import Formatter, Parser
from .datasets import ChecksumError
from .errors import BMRSError, Interrupted
from .experiments.sweep import parse_criteria
from .pruning.criteria import load_plugins
from .training import TrainingDiverged

__all__ = ["main", "build_parser", "parse_criteria", "COMMANDS"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3

#: The commands, in the order ``bmrs --help`` lists them: each module's ``add_parser`` adds
#: its subcommand (and sets ``run`` as what it calls).
COMMANDS = (train, sweep, report, compact, info, explain, export, bench, reproduce)


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    # "[Errno 22] Invalid argument" and the like: say which file
    name = getattr(err, "filename", None) if isinstance(err, OSError) else None
    if name is not None and str(name) not in text:
        text = f"{name}: {text}"
    return " ".join(text.split())


def _tell_torchrun(text: str) -> None:
    """Under torchrun, write ``text`` (what ends this process) into the error file torchrun
    names in ``TORCHELASTIC_ERROR_FILE``, in the form of its ``ErrorHandler``: torchrun reads
    it into the failure it reports (``bmrs train --nproc`` names the cause from it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": text, "extraInfo": {"py_callstack": traceback.format_exc(),
                                                       "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bmrs`` command."""
    parser = Parser(
        prog="bmrs",
        description="Structured pruning of neural networks with Bayesian model reduction (BMRS).\n\n"
        "Train with noise gates and prune continuously (train), prune a trained model at many\n"
        "compression levels (sweep), tabulate and plot results (report), turn a pruned model\n"
        "into a smaller plain network (compact, info), say what the evidence says of its decisions\n"
        "(explain), export and time it (export, bench), or run a\n"
        "whole experiment suite (reproduce).",
        formatter_class=Formatter,
        epilog="Run 'bmrs COMMAND --help' for the options of a command. Exit status: 0 success, 2 a usage error or a\n"
        "bad input file (one line on stderr), 3 training diverged. Documentation: docs/cli.md, docs/reliability.md",
    )
    parser.add_argument("--version", action="version", version=f"bmrs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    threads = Parser(add_help=False)
    threads.add_argument("--threads", type=int, default=None,
                         help="PyTorch CPU threads (default: PyTorch's choice; 1 is fastest for small models on a busy machine)")
    progress = Parser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="no progress bars")
    for command in COMMANDS:
        command.add_parser(commands, {"threads": threads, "progress": progress})
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``bmrs`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Criteria that installed packages declare in the ``bmrs.criteria`` entry point group are
    registered first, so every command sees them."""
    load_plugins()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for 'train --nproc' to start its processes
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except BrokenPipeError:  # e.g. 'bmrs info --json FILE | head': stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except Interrupted as err:  # 'train --nproc' stopped its processes
        print(f"bmrs: {_one_line(err)}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        _tell_torchrun("interrupted")
        print("bmrs: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        _tell_torchrun(_one_line(err))
        print(f"bmrs: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (BMRSError, OSError, ChecksumError) as err:  # what a user can fix; anything else is a defect
        _tell_torchrun(_one_line(err))
        print(f"bmrs: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a defect: its traceback follows, as ever
        _tell_torchrun(f"{type(err).__name__}: {_one_line(err)}")
        raise


if __name__ == "__main__":
    sys.exit(main())
