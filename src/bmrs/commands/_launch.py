"""``bmrs train --nproc N``: start N training processes through torchrun and speak for them.

torchrun runs in this process (``torch.distributed.run``). Every process's output goes to a
file of its own under ``OUT/logs/`` (torchrun's ``--log-dir`` and ``--redirects``), but for
rank 0's stdout, which stays this command's (the run's summary); rank 0's progress bar is
relayed from its log to this command's stderr. What torchrun itself logs goes to
``launcher.log`` beside the processes' logs. So the terminal shows what a single-process run
shows, and when a process dies the command ends with one line naming the process, the
cause, where the processes' output is and whether the checkpoint can be resumed; a signal
to the command (SIGTERM, Ctrl-C) stops every process and ends with one line too.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import BMRSError, Interrupted
from ..rundir import PROCESS_LOGS
from ..training import TrainingDiverged

__all__ = ["LAUNCHED", "ProgressRelay", "cause", "launch"]

#: Set in the environment of the processes this launcher starts (rank 0 leaves to the
#: launcher what it has said already).
LAUNCHED = "BMRS_NPROC_LAUNCHER"

# The signals torchrun turns into SignalException while its processes run.
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name))

# What a process that lost a peer says (gloo, NCCL, the store): the consequence of another's failure.
_LOST_PEER = re.compile(r"gloo|nccl|DistBackendError|DistNetworkError|DistStoreError|Connection (closed|reset) by peer|"
                        r"Broken pipe|Socket Timeout", re.IGNORECASE)


class _Keep(logging.Handler):
    """Keeps torchrun's log records (for ``launcher.log``) instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not worth failing a run for
            pass


@contextlib.contextmanager
def _torch_logs_kept(handler: logging.Handler):
    """While it runs, records of the ``torch.distributed`` loggers (torchrun's warnings and
    errors) go to ``handler`` only; the loggers' own handlers are put back after."""
    top = logging.getLogger("torch.distributed")
    saved = [(top, top.handlers[:], top.propagate)]
    saved += [(lg, lg.handlers[:], lg.propagate) for name, lg in list(logging.root.manager.loggerDict.items())
              if name.startswith("torch.distributed.") and isinstance(lg, logging.Logger) and lg.handlers]
    for lg, _, _ in saved:
        lg.handlers[:] = [handler]
    top.propagate = False
    try:
        yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate


@contextlib.contextmanager
def _signal_handlers_restored():
    """torchrun installs handlers for SIGTERM, SIGINT, SIGHUP and SIGQUIT when it starts the
    processes and leaves them; put the earlier ones back."""
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)


class ProgressRelay:
    """Shows the progress bars that rank 0 draws into its stderr log (tqdm's redraws: a
    carriage return, then ``desc:  30%|...| 3/10 [...]``) on ``stream``, and nothing else of
    that log: warnings, tracebacks and the rest stay in the file.

    :meth:`feed` takes the log's text as it grows; :meth:`close` clears a bar left on the line.
    """

    # a complete tqdm status: "desc:  30%|###   | 3/10 [00:01<00:02, 2.8it/s, loss=0.6]", or
    # without a total "desc: 12.3kB [00:01, 9.1kB/s]"; then only padding
    BAR = re.compile(r"[^\r\n\[\]|]{0,100}: +(\d+%\|[^\r\n]*|[\d.]+ ?\w*) \[[^\r\n\[\]]*\] *")

    def __init__(self, stream) -> None:
        self.stream = stream
        self._segment: str | None = None  # the text after the last carriage return (None: a plain line)
        self._state = "deciding"  # "deciding", "shown" (the bar is out; only padding may follow) or "dropped"
        self._shown = 0  # the width of the bar on the line, 0 when none

    def feed(self, text: str) -> None:
        for part in re.split(r"([\r\n])", text):
            if part in ("\r", "\n"):
                self._end()
                self._segment, self._state = ("" if part == "\r" else None), "deciding"
            elif part and self._segment is not None and self._state != "dropped":
                self._add(part)

    def _add(self, part: str) -> None:
        if self._state == "shown":
            if part.strip():  # anything but padding after a complete bar is not the bar's
                self._state = "dropped"
            else:
                self._write(part)
            return
        self._segment += part
        match = self.BAR.fullmatch(self._segment.rstrip(" ")) if self._segment.endswith("]") or \
            self._segment.endswith(" ") else None
        if match:
            self._write("\r" + self._segment)
            self._shown, self._state = len(self._segment), "shown"
        elif len(self._segment) > 1000:
            self._state = "dropped"

    def _end(self) -> None:
        """A carriage return or newline ends the segment: a blank one clears the bar."""
        if self._segment is not None and self._state == "deciding" and self._shown and not self._segment.strip():
            self._write("\r" + self._segment + "\r")
            self._shown = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken terminal: the bar is not worth an error
            pass

    def close(self) -> None:
        if self._shown:
            self._write("\r" + " " * self._shown + "\r")
            self._shown = 0


def _follow(find, relay: ProgressRelay, stop: threading.Event) -> None:
    """Feed ``relay`` the file that ``find()`` returns once it exists, as it grows, until ``stop``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    handle = None
    try:
        while True:
            done = stop.is_set()
            if handle is None:
                path = find()
                if path is not None:
                    handle = open(path, "rb")
            if handle is not None:
                relay.feed(decoder.decode(handle.read()))
            if done:
                break
            stop.wait(0.1)
    except OSError:
        pass
    finally:
        if handle is not None:
            handle.close()
        relay.close()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(path: Path) -> str:
    """The last line of a process's stderr log that says something (without torch's
    ``[rank0]:`` prefix), or ``""``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]", text)):
        line = re.sub(r"^\[(default|rank)\d+\]:", "", line).strip()
        if line:
            return line
    return ""


def cause(failures: dict, logs: Path | None) -> tuple[int, str, int, int]:
    """(rank, what happened to it, its exit status, how many processes failed alike) of the
    process whose failure ended the run, among torchrun's ``failures`` (rank:
    ``ProcessFailure``): a process killed by a signal other than SIGTERM (torchrun stops the
    others with SIGTERM) before one that raised an error, before one that lost its peers (a
    gloo or NCCL error), before one stopped by SIGTERM; the lowest rank among equals. What a
    process says of itself is the line it wrote into torchrun's error file (``bmrs.cli``
    writes it), else the last line of its stderr log in ``logs``."""
    def told(rank, failure) -> str:
        message = failure.message  # the error file's message: a string, or ErrorHandler's {"message": ...}
        if isinstance(message, dict):
            message = message.get("message")
        if not isinstance(message, str) or not os.path.isfile(failure.error_file):
            message = ""  # torch's "To enable traceback see ..." when the process wrote no error file
        if not message and logs is not None:
            message = _last_line(logs / str(failure.local_rank) / "stderr.log")
        return " ".join(message.split())

    ranked = []
    for rank, failure in failures.items():
        code = failure.exitcode
        if code < 0:
            sig = _signal_name(-code)
            ranked.append((3 if sig == "SIGTERM" else 0, rank, f"was {'stopped' if sig == 'SIGTERM' else 'killed'} by {sig}", code))
        else:
            message = told(rank, failure)
            ranked.append((2 if _LOST_PEER.search(message) else 1, rank, message or f"ended with exit status {code}", code))
    _, rank, what, code = min(ranked)
    return rank, what, code, sum(1 for r in ranked if r[2:] == (what, code))


def _resume_hint(out: Path) -> str:
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        return f"{checkpoint} keeps the last completed epoch: run the same command with --resume to continue"
    return "no epoch was completed: run the same command again"


def _find_logs(root: Path, run_id: str) -> Path | None:
    """The folder torchrun made for this launch's attempt (``<run id>_<suffix>/attempt_<n>``), or None."""
    found = sorted(root.glob(f"{run_id}_*/attempt_*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None


def launch(nproc: int, argv: list[str], out: Path) -> None:
    """Run ``python -m bmrs ARGV`` in ``nproc`` local processes through torchrun (one machine,
    a free port); a :class:`~bmrs.BMRSError` (or ``TrainingDiverged``) of one line when a
    process fails, :class:`~bmrs.errors.Interrupted` when a signal stops the command."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    root = out / PROCESS_LOGS
    run_id = time.strftime("%Y%m%d-%H%M%S")
    had_config = (out / "config.json").exists()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    redirects = ",".join(f"{rank}:{2 if rank == 0 else 3}" for rank in range(nproc))  # all but rank 0's stdout
    # --standalone but with a run id of our choosing, which names the launch's log folder
    launch_args = get_args_parser().parse_args([
        "--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        "--rdzv-id", run_id, "--log-dir", str(root), "--redirects", redirects, "-m", "bmrs"])
    launch_args.training_script_args = list(argv)  # not parsed by torchrun: '--nproc' would be ambiguous there

    kept = _Keep()
    stop = threading.Event()
    relay = threading.Thread(target=_follow, daemon=True, args=(
        lambda: next(iter(sorted(root.glob(f"{run_id}_*/attempt_*/0/stderr.log"))), None), ProgressRelay(sys.stderr), stop))
    previous = os.environ.get(LAUNCHED)
    os.environ[LAUNCHED] = "1"
    failure: BaseException | None = None
    try:
        with _signal_handlers_restored(), _torch_logs_kept(kept):
            relay.start()
            try:
                run(launch_args)  # torchrun stops every process before it raises
            finally:
                stop.set()
                relay.join(timeout=5)
    except (ChildFailedError, SignalException) as err:
        failure = err
    finally:
        if previous is None:
            os.environ.pop(LAUNCHED, None)
        else:
            os.environ[LAUNCHED] = previous
    logs = _find_logs(root, run_id)
    if logs is not None and kept.lines:
        with contextlib.suppress(OSError):
            (logs / "launcher.log").write_text("\n".join(kept.lines) + "\n")
    if failure is None:
        return
    if not (out / "checkpoint.pt").exists() and not had_config:
        (out / "config.json").unlink(missing_ok=True)  # a run that never completed an epoch leaves no run behind
    where = f"their output is in {logs}" if logs is not None else "their output was not kept"
    others = "the other" if nproc == 2 else f"the other {nproc - 1}"
    if isinstance(failure, SignalException):
        number = int(failure.sigval)
        parts = [f"stopped by {_signal_name(number)}", f"the {nproc} training processes stopped with it"]
        raise Interrupted("; ".join(parts + ([where] if logs is not None else []) + [_resume_hint(out)]), number) from None
    rank, what, code, alike = cause(failure.failures, logs)
    if code in (2, 3):  # a bmrs error of that process (3: training diverged), which says what it is itself
        what = re.sub(r"^bmrs: error: ", "", what)
        who = f"all {nproc} training processes" if alike == nproc else \
            f"training process {rank} of {nproc}; {others} stopped with it"
        text = f"{what} ({who}; {where})"
        if code == 3:
            raise TrainingDiverged(text) from None
        raise BMRSError(f"{text}; {_resume_hint(out)}" if (out / "checkpoint.pt").is_file() else text) from None
    if code < 0:
        text = f"training process {rank} of {nproc} {what}; {others} stopped with it; {where}"
    else:  # an exception bmrs did not expect (or a lost peer): its traceback is in the process's log
        log = f"; its traceback is in {logs / str(rank) / 'stderr.log'}" if logs is not None else ""
        text = f"training process {rank} of {nproc} failed: {what}{log}; {others} stopped with it"
    raise BMRSError(f"{text}; {_resume_hint(out)}") from None
