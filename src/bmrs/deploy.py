"""Deployment: export a compacted network and time it against the full one.

* :func:`full_network`: the network of a gated model with every gate's ``E[theta]`` folded
  into the weights and nothing removed, the fair reference for a compacted network.
* :func:`prepare`: the inference form both networks are timed and exported in: eval mode,
  BatchNorm folded into the convolution before it.
* :func:`export`: ONNX (checked against PyTorch with onnxruntime), TorchScript or
  ``torch.export``, with a dynamic batch axis; every file is reloaded and checked.
* :func:`benchmark`: latency of the full and the compacted network side by side,
  interleaved, in eager PyTorch, ``torch.compile`` and onnxruntime.

onnx, onnxscript and onnxruntime (the ``bmrs[onnx]`` extra) are imported only when an ONNX
export or the onnxruntime runtime is asked for.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import ANY, Number, write_atomic
from .compaction import compact, count_flops, count_parameters
from .errors import BMRSError
from .gates import gates
from .pruning import set_masks

__all__ = ["FORMATS", "RUNTIMES", "full_network", "prepare", "export", "benchmark", "max_relative_error"]

FORMATS = ("onnx", "torchscript", "exported")
RUNTIMES = ("eager", "compile", "onnxruntime")
#: Exported outputs must match PyTorch's to this relative error (of the largest output).
TOLERANCE = 1e-5
BENCH_FORMAT = "bmrs-bench"

_SIZE = {"parameters": Number(0, integer=True), "flops": Number(0, integer=True)}
_MS = Number(0.0)
#: The shape of the figures :func:`benchmark` returns (``bench.json``), as ``bmrs info`` reads them.
BENCH = {
    "format": str, "measured_at": str,
    "machine": {"load_average_before": ANY, "load_average_after": ANY},
    "settings": {"threads": Number(1, integer=True), "repeats": Number(1, integer=True)},
    "networks": {"full": _SIZE, "compact": _SIZE}, "flop_ratio": Number(0.0), "parameter_ratio": Number(0.0),
    "results": [{"runtime": str, "batch": Number(1, integer=True), "full_ms": _MS, "compact_ms": _MS, "ratio": Number(0.0),
                 "full_setting": str, "compact_setting": str}],
    "deployment_gain": [{"batch": Number(1, integer=True), "runtime": str, "eager_full_ms": _MS, "compact_ms": _MS,
                         "gain": Number(0.0)}],
}
# Where the memory available cannot be read, the largest batch of inputs benchmark() makes.
MAX_INPUT_BYTES = 8 * 2**30


def _available_memory() -> int:
    """Bytes of memory available now (physical pages free), or :data:`MAX_INPUT_BYTES` where
    the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return MAX_INPUT_BYTES


def full_network(model: nn.Module, example_input) -> nn.Module:
    """The plain network of a gated ``model`` with ``E[theta]`` folded in and nothing removed.

    :func:`~bmrs.compaction.compact` of a copy whose masks are all 1: the same arithmetic as
    the compacted network, at full width. ``model`` is not modified.
    """

    net = copy.deepcopy(model)
    set_masks(net, {name: torch.ones(g.num_structures, dtype=torch.bool) for name, g in gates(net).items()})
    return compact(net, example_input)


def prepare(net: nn.Module, example_input: Tensor) -> nn.Module:
    """The inference form of a plain network: eval mode, every BatchNorm that follows a
    convolution folded into it (``torch.fx``'s conv-BatchNorm fusion), outputs checked.

    A network that ``torch.fx`` cannot trace, or without such pairs, is returned as an eval
    copy unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    net = copy.deepcopy(net).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return net
    try:
        fused = fuse(net)
    except Exception:  # noqa: BLE001 - untraceable user code: keep the module as it is
        return net
    with torch.no_grad():
        error = max_relative_error(net(example_input), fused(example_input))
    if error > TOLERANCE:
        raise RuntimeError(f"folding BatchNorm into the convolutions changed the outputs (relative error {error:.2g})")
    return fused.eval()


def max_relative_error(reference, output) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    reference, output = torch.as_tensor(reference).double(), torch.as_tensor(output).double()
    if reference.shape != output.shape:
        return float("inf")
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


# --- export ----------------------------------------------------------------------------------


def export(net: nn.Module, example_input: Tensor, path, fmt: str) -> dict:
    """Write ``net`` (a plain network, e.g. a compacted one) to ``path`` in format ``fmt``.

    The batch axis (dimension 0 of the input and output) is dynamic. ``"onnx"``: the
    ``torch.export``-based ONNX exporter; the file is run with onnxruntime. ``"torchscript"``:
    ``torch.jit.trace``, reloaded with ``torch.jit.load``. ``"exported"``: ``torch.export``
    (a ``.pt2`` archive), reloaded with ``torch.export.load``. In every case the reloaded
    model's outputs are compared with PyTorch's at two batch sizes (that of
    ``example_input`` and one more), and a ``RuntimeError`` is raised if they differ by more
    than :data:`TOLERANCE` relative to the largest output. The file is written to a
    temporary name first and renamed only when the check has passed.

    Returns ``{"format", "file", "batches", "max_relative_error", "checked_with"}``.
    """
    if fmt not in FORMATS:
        raise BMRSError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    net = prepare(net, example_input)
    batch = int(example_input.shape[0])
    checks = [example_input, _resized(example_input, batch + 3)]
    result: dict = {}

    def write(tmp: str) -> None:
        run, checked_with = _EXPORTERS[fmt](net, example_input, tmp)
        errors = []
        for x in checks:
            with torch.no_grad():
                reference = net(x)
            errors.append(max_relative_error(reference, run(x)))
        if max(errors) > TOLERANCE:
            raise RuntimeError(
                f"the {fmt} export's outputs differ from PyTorch's (relative error {max(errors):.2g} > {TOLERANCE:g})"
            )
        result.update(format=fmt, file=str(path), batches=[int(x.shape[0]) for x in checks],
                      max_relative_error=max(errors), checked_with=checked_with)

    write_atomic(path, write)
    return result


def _resized(example: Tensor, batch: int) -> Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, *example.shape[1:], generator=generator, dtype=example.dtype)


def _batch_dim():
    return torch.export.Dim("batch", min=1)


def _export_onnx(net, example, path) -> tuple[Callable, str]:
    onnx_model = _onnx_bytes(net, example)
    Path(path).write_bytes(onnx_model)
    session = _ort_session(path, threads=None)
    return (lambda x: session.run(None, {"input": x.numpy()})[0]), f"onnxruntime {_ort().__version__}"


def _onnx_bytes(net: nn.Module, example: Tensor) -> bytes:
    """The network as ONNX (input ``input``, output ``output``, dynamic batch)."""
    try:
        import onnx  # noqa: F401 - the exporter needs onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError:
        raise BMRSError("ONNX export needs the onnx extra: pip install 'bmrs[onnx]'") from None
    example = example if example.shape[0] > 1 else _resized(example, 2)  # batch 1 would be fixed
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), _silence_stdout():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: _batch_dim()},), verbose=False, optimize=True,
            )
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    with tempfile.TemporaryDirectory() as tmp:  # ONNXProgram.save takes a path
        file = Path(tmp) / "model.onnx"
        program.save(str(file))
        return file.read_bytes()


class _silence_stdout:
    """The ONNX exporter prints progress lines; a command's output stays ours."""

    def __enter__(self):
        import contextlib

        self._stack = contextlib.ExitStack()
        sink = self._stack.enter_context(open(os.devnull, "w"))
        self._stack.enter_context(contextlib.redirect_stdout(sink))

    def __exit__(self, *exc):
        self._stack.close()


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BMRSError("onnxruntime is not installed: pip install 'bmrs[onnx]'") from None
    return onnxruntime


def _ort_session(model, threads: int | None, level: str = "all"):
    ort = _ort()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _export_torchscript(net, example, path) -> tuple[Callable, str]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (example,), check_trace=False)
        torch.jit.save(traced, path)
        loaded = torch.jit.load(path)  # the file written a moment ago, by this process
    loaded.eval()

    def run(x):
        with torch.no_grad():
            return loaded(x)

    return run, "torch.jit.load"


def _export_program(net, example, path) -> tuple[Callable, str]:
    example = example if example.shape[0] > 1 else _resized(example, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (example,), dynamic_shapes=({0: _batch_dim()},))
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()  # the file written a moment ago, by this process

    def run(x):
        with torch.no_grad():
            return loaded(x)

    return run, "torch.export.load"


_EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript, "exported": _export_program}


# --- benchmark -------------------------------------------------------------------------------


class _Eager:
    """``net`` in eager PyTorch, in a memory format and with or without oneDNN (mkldnn)."""

    def __init__(self, net: nn.Module, channels_last: bool, mkldnn: bool) -> None:
        self.net = copy.deepcopy(net).to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last, self.mkldnn = channels_last, mkldnn

    def __call__(self, x: Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mkldnn:
            return self.net(x)
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return self.net(x)
        finally:
            torch.backends.mkldnn.enabled = previous


def _variants(net: nn.Module, runtime: str, example: Tensor, threads: int) -> dict[str, Callable]:
    """The settings a runtime can run ``net`` with, by name; :func:`benchmark` keeps the fastest."""
    if runtime == "eager":
        found = {"default": _Eager(net, False, True), "no-onednn": _Eager(net, False, False)}
        if example.dim() == 4:
            found |= {"channels-last": _Eager(net, True, True), "channels-last,no-onednn": _Eager(net, True, False)}
        return found
    if runtime == "compile":
        found = {"default": torch.compile(copy.deepcopy(net), dynamic=False)}
        if example.dim() == 4:
            found["channels-last"] = _Compiled(net)
        return found
    if runtime == "onnxruntime":
        model = _onnx_bytes(net, example)
        found = {}
        for level in ("all", "extended"):  # "all" adds layout transforms (NCHWc) that favour wide layers
            session = _ort_session(model, threads, level)
            found[f"level {level}"] = (lambda session: lambda x: session.run(None, {"input": x.numpy()}))(session)
        return found
    raise BMRSError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


class _Compiled:
    """``torch.compile`` of ``net`` in channels-last memory format."""

    def __init__(self, net: nn.Module) -> None:
        self.net = torch.compile(copy.deepcopy(net).to(memory_format=torch.channels_last), dynamic=False)

    def __call__(self, x: Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last))


def benchmark(
    full: nn.Module,
    small: nn.Module,
    input_shape,
    *,
    batches=(1, 256),
    runtimes=("eager", "onnxruntime"),
    threads: int = 1,
    repeats: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> dict:
    """Latency of ``full`` and ``small`` (plain networks) in each runtime, timed interleaved.

    Both networks get the same treatment: :func:`prepare` (eval, BatchNorm folded), then
    each runtime's settings, of which every network gets the fastest for it at each batch
    size (a short interleaved trial decides): eager PyTorch and ``torch.compile`` in the
    default or the channels-last memory format, eager also with oneDNN (mkldnn) switched
    off; onnxruntime (the ONNX export, ``threads`` threads) with all graph optimisations or
    all but the layout transforms ("extended"). So no network is slowed by a setting that
    suits the other. For every batch size, every (runtime, network) pair is then called once
    per repetition in a new random order, so that a change in the machine's load hits all of
    them alike; at small batches several calls make one sample. The figure per pair is the
    fastest repetition: on a busy machine many samples include a pause in which other
    processes ran (half of them on the 2-core machine these figures were first measured
    on, where the median then jumped between the two modes), and such pauses only ever
    add time.

    Returns a JSON-able dict: the settings, the machine, both networks' parameters and
    FLOPs per example, and per (runtime, batch) the two latencies in milliseconds and
    ``ratio = full / compact`` and the setting each network ran with; plus, per batch, the deployment gain: eager full over the
    compacted network in its fastest runtime.
    """
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise BMRSError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if min(batches) < 1 or repeats < 1 or warmup < 0 or threads < 1:
        raise BMRSError("batch sizes, repeats and threads must be positive, warmup non-negative")
    needed = max(batches) * math.prod(input_shape) * 4  # the float32 batch of inputs alone
    available = _available_memory()
    if needed > available // 2:
        raise BMRSError(f"a batch of {max(batches):,} inputs of shape {list(input_shape)} needs {needed / 2**30:,.1f} GiB "
                        f"for the inputs alone, over half the {available / 2**30:,.1f} GiB of memory available; "
                        "choose a smaller --batch")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    dynamo = torch._dynamo.config
    previous_limit = dynamo.recompile_limit
    dynamo.recompile_limit = max(previous_limit, 64)  # past the limit, compile silently runs eager
    try:
        one = torch.zeros(1, *input_shape)
        nets = {"full": prepare(full, one), "compact": prepare(small, one)}
        sizes = {
            key: {"parameters": count_parameters(net), "flops": count_flops(net, one)} for key, net in nets.items()
        }
        results = []
        load_before = _load()
        for batch in batches:
            x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
            if "compile" in runtimes:  # each network, setting and batch compiles the same forward code
                torch._dynamo.reset()
            runners, chosen = {}, {}
            for runtime in runtimes:
                for key, net in nets.items():
                    variants = _variants(net, runtime, x, threads)
                    if len(variants) > 1:  # a short interleaved trial picks this network's fastest setting
                        trial = _time_interleaved(variants, x, max(3, repeats // 5), warmup)
                        chosen[(runtime, key)] = min(trial, key=trial.get)
                    else:
                        chosen[(runtime, key)] = next(iter(variants))
                    runners[(runtime, key)] = variants[chosen[(runtime, key)]]
            times = _time_interleaved(runners, x, repeats, warmup)
            for runtime in runtimes:
                full_ms, small_ms = times[(runtime, "full")] * 1e3, times[(runtime, "compact")] * 1e3
                results.append({"runtime": runtime, "batch": batch, "full_ms": full_ms, "compact_ms": small_ms,
                                "ratio": full_ms / small_ms, "full_setting": chosen[(runtime, "full")],
                                "compact_setting": chosen[(runtime, "compact")]})
    finally:
        torch.set_num_threads(previous_threads)
        dynamo.recompile_limit = previous_limit
    gains = []
    for batch in batches:
        rows = [r for r in results if r["batch"] == batch]
        best = min(rows, key=lambda r: r["compact_ms"])
        eager = [r for r in rows if r["runtime"] == "eager"]
        if eager:
            gains.append({"batch": batch, "runtime": best["runtime"], "eager_full_ms": eager[0]["full_ms"],
                          "compact_ms": best["compact_ms"], "gain": eager[0]["full_ms"] / best["compact_ms"]})
    return {
        "format": BENCH_FORMAT, "version": 1,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": _load()},
        "versions": _versions(runtimes),
        "settings": {"threads": threads, "repeats": repeats, "warmup": warmup, "batches": list(batches),
                     "runtimes": list(runtimes), "input_shape": list(input_shape)},
        "networks": sizes,
        "flop_ratio": sizes["full"]["flops"] / sizes["compact"]["flops"],
        "parameter_ratio": sizes["full"]["parameters"] / sizes["compact"]["parameters"],
        "results": results,
        "deployment_gain": gains,
    }


def _time_interleaved(runners: dict, x: Tensor, repeats: int, warmup: int) -> dict:
    calls = max(1, 32 // int(x.shape[0]))  # several calls per sample for tiny batches
    keys = list(runners)
    samples: dict = {k: [] for k in keys}
    # a new random order every repetition, so that no runner always follows the same one
    generator = torch.Generator().manual_seed(len(keys) * 7919 + repeats)
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(max(warmup, 1)):
                run(x)
        for _ in range(repeats):
            for i in torch.randperm(len(keys), generator=generator).tolist():
                key = keys[i]
                run = runners[key]
                start = time.perf_counter()
                for _ in range(calls):
                    run(x)
                samples[key].append((time.perf_counter() - start) / calls)
    return {k: min(v) for k, v in samples.items()}


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions(runtimes) -> dict:
    versions = {"torch": torch.__version__}
    if "onnxruntime" in runtimes:
        versions["onnxruntime"] = _ort().__version__
    return versions
