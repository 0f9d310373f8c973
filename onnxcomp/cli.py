"""The ``onnxcomp`` command: compress / calibrate / inspect / bench."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import OnnxcompError
from .io import check_writable, columns, refuse_clashes
from .model import count_macs, count_params, find_layers, load_model, parse_input_shapes, save_model
from .model.files import EXTERNAL_DATA_BYTES, external_data_file, external_data_files


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args, unknown = _parser().parse_known_args(argv)
        if unknown:  # argparse would name the top-level command's help, not this command's
            raise OnnxcompError(f"unrecognized arguments: {' '.join(unknown)} (see onnxcomp {args.command} --help)")
        return args.run(args)
    except OnnxcompError as exc:
        print(f"onnxcomp: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("onnxcomp: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): every file was written before the printing
        _stdout_to_devnull()
        return 0
    except Exception as exc:  # a bug: say so in one line, the traceback only on request
        if os.environ.get("ONNXCOMP_DEBUG"):
            traceback.print_exc()
        print(f"onnxcomp: internal error: {type(exc).__name__}: {exc} (set ONNXCOMP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, CI runners and ``kill`` send), raised where the program is, as
    Ctrl-C is: every ``finally`` runs, so a half-written output's staging folder is removed."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def terminate(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes as every other refusal: one line ``onnxcomp: error: ...``, exit code 2
    (argparse prints the whole usage block); ``--help`` still shows it."""

    def error(self, message: str):
        raise OnnxcompError(f"{message} (see {self.prog} --help)")


def _stdout_to_devnull() -> None:
    """After a closed pipe, point stdout at /dev/null: Python's own flush at exit would fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="onnxcomp", description="Data-aware low-rank compression of ONNX models.")
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model's Conv/Gemm/MatMul layers")
    compress.add_argument("input", help="model to compress (.onnx)")
    compress.add_argument("output", help="where to write the compressed model")
    _data_arguments(compress)
    compress.add_argument("--method", default="svd", choices=["svd", "tucker2", "cp", "auto"],
                          help="svd; tucker2 (kxk convs: 1x1 -> kxk -> 1x1; matrices get svd); cp (kxk convs: "
                               "1x1 -> depthwise -> 1x1, with --rank, --keep or a budget); auto: per layer the lower "
                               "error of svd and tucker2 (default: svd)")
    compress.add_argument("--cp-form", default="4way", choices=["4way", "3way"],
                          help="CP: depthwise kh x 1 then 1 x kw (4way) or one kh x kw depthwise (3way)")
    rule = compress.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=_rank, metavar="N|R_OUT,R_IN",
                      help="the same rank for every layer (Tucker-2: R_OUT,R_IN or one N for both)")
    rule.add_argument("--keep", type=float, help="fraction of each layer's MACs to keep, e.g. 0.5")
    rule.add_argument("--energy", type=float, help="energy threshold tau in (0, 1], e.g. 0.95 (ARSVD)")
    rule.add_argument("--evbmf", action="store_true",
                      help="Tucker-2 ranks from EVBMF on the weight's mode unfoldings (data-free, Kim et al. 2016)")
    rule.add_argument("--target-macs", type=float, metavar="F",
                      help="whole-model budget: keep this fraction of the model's MACs, ranks allocated across layers")
    rule.add_argument("--target-params", type=float, metavar="F",
                      help="whole-model budget: keep this fraction of the model's parameters")
    rule.add_argument("--max-drop", type=float, metavar="D",
                      help="no size target: the smallest model (--minimize) whose --metric on the validation samples "
                           "drops by at most D from the original's (fidelity: standardised error at most D)")
    rule.add_argument("--target-latency", type=float, metavar="F",
                      help="whole-model budget: this fraction of the model's onnxruntime latency at batch 1, "
                           "every candidate chain timed on this machine (cached) with --provider and --threads")
    compress.add_argument("--rank-multiple", type=int, metavar="N",
                          help="budgets: only ranks that are multiples of N (default 8 with --target-macs and "
                               "--target-latency, free with --target-params; 1: any rank)")
    compress.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                          help="--target-latency and the latency check: the onnxruntime execution provider to time "
                               "on (default cpu)")
    compress.add_argument("--threads", type=int, metavar="N",
                          help="threads to compute with: BLAS, the layers solved in parallel (one BLAS thread "
                               "each), onnxruntime's intra-op threads, and the timed sessions of --target-latency "
                               "and the latency check (default: every available core; the timed sessions: "
                               "onnxruntime's choice)")
    compress.add_argument("--rank-rule", dest="rule", default="energy", choices=["energy", "entropy"],
                          help="with --energy: ARSVD's energy or spectral-entropy rule")
    compress.add_argument("--spectrum", default="data", choices=["data", "weight"],
                          help="with --energy: threshold the data-aware or the weight spectrum")
    compress.add_argument("--norm", default="data", choices=["data", "frobenius"],
                          help="fit under the data norm (default) or the data-free Frobenius norm")
    compress.add_argument("--uncentered", dest="centered", action="store_false",
                          help="fit under the uncentered second moment, without bias correction")
    compress.add_argument("--sensitivity", default="auto", choices=["auto", "on", "off", "measured"],
                          help="with a budget: weight each layer's error by its measured effect on the model's "
                               "outputs (noise probe; auto: only where that wins on the validation samples; "
                               "measured: each layer's own truncations judged on the model, a few per layer)")
    compress.add_argument("--minimize", default="macs", choices=["macs", "params", "latency"],
                          help="--max-drop: what to make smallest (default macs)")
    compress.add_argument("--metric", default="fidelity", choices=["fidelity", "top1", "cosine"],
                          help="what judges candidate models on the validation samples: minus the standardised error "
                               "(default), top-1 agreement with the original (per sample, or per position of "
                               "[N, positions, classes] scores), or the mean cosine of the first output")
    compress.add_argument("--validation-data", metavar="F",
                          help="samples that judge candidates and the result (default: every 10th calibration "
                               "sample, 8 to 64 of them, held out of the statistics)")
    compress.add_argument("--outputs", nargs="+", default=[], metavar="NAME[:WEIGHT[:AXIS]]",
                          help="the model outputs that count in the fidelity and how much (default: all, weight 1); "
                               "AXIS: the channel axis (default 1, the last of [N, seq, F])")
    compress.add_argument("--flush-denormals", action="store_true",
                          help="also set the subnormal (denormal) weights of the layers left alone to 0 (the factors "
                               "onnxcomp writes never hold any); many CPUs compute with them slowly")
    compress.add_argument("--no-latency-check", dest="check_latency", action="store_false",
                          help="do not profile the result (time in rewritable layers, Amdahl floor, latency guard)")
    _ray_argument(compress)
    compress.add_argument("--refit-bias", action="store_true",
                          help="re-estimate each rewritten layer's bias so that its output mean on what the compressed "
                               "model feeds it equals the original's (two more passes of the calibration data; kept "
                               "where the validation samples judge it better)")
    compress.add_argument("--fail-if-unchanged", action="store_true",
                          help="exit 2 when the model has no compressible layer (default: write it unchanged, warn)")
    compress.add_argument("--stats", help="statistics file from `onnxcomp calibrate` (instead of collecting)")
    compress.add_argument("--report", help="write the per-layer report as JSON here")
    compress.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the solvers run")
    compress.set_defaults(run=_compress)

    calibrate = commands.add_parser("calibrate", help="collect layer-input statistics into a file")
    calibrate.add_argument("input", help="model (.onnx)")
    calibrate.add_argument("output", help="statistics file to write (.npz)")
    _data_arguments(calibrate, data_required=True)
    calibrate.add_argument("--threads", type=int, metavar="N",
                           help="BLAS and onnxruntime intra-op threads (default: every available core)")
    _ray_argument(calibrate)
    calibrate.add_argument("--merge", nargs="+", default=[], metavar="STATS",
                           help="statistics files to add to the result (shards of a larger set)")
    calibrate.set_defaults(run=_calibrate)

    inspect = commands.add_parser("inspect", help="list the compressible layers with shapes, params, MACs and time")
    inspect.add_argument("input", help="model (.onnx)")
    _input_shape_argument(inspect)
    inspect.add_argument("--data", help="inputs to time the model on (.npz/.npy; default: random inputs of the "
                                        "model's shapes)")
    inspect.add_argument("--batch-size", type=int, default=32,
                         help="the second batch size timed, besides 1 (default 32, compress's calibration batch)")
    inspect.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="execution provider to time on")
    inspect.add_argument("--threads", type=int, metavar="N", help="intra-op threads (default: onnxruntime's)")
    inspect.add_argument("--no-timing", dest="timing", action="store_false",
                         help="do not time the model (no share of time, no Amdahl floors)")
    _initializer_inputs_argument(inspect)
    inspect.set_defaults(run=_inspect)

    _bench_command(commands)
    return parser


def _bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="compare a compressed model with its original: size, output error, accuracy, latency",
        description="Validate a compressed model against the original on held-out data: params, MACs, "
                    "file size, output error, top-1 agreement, accuracy (with labels) and latency "
                    "(both models in one process, interleaved runs).",
    )
    bench.add_argument("original", help="the original model (.onnx)")
    bench.add_argument("compressed", help="the compressed model (.onnx)")
    bench.add_argument("--data", required=True,
                       help="held-out data: .npz (input name -> array, optionally 'labels') "
                            "or .npy (single-input model)")
    bench.add_argument("--labels", help="class labels (.npy); default: the 'labels' array of the .npz, if any")
    bench.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="execution provider (default cpu)")
    bench.add_argument("--threads", type=int, help="intra-op threads per session (default: onnxruntime's choice)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="N",
                       help="batch sizes to time (default: 1 32)")
    bench.add_argument("--repeats", type=int,
                       help="timed runs of each model per batch size (default: as many as fit in ~3 s)")
    bench.add_argument("--warmup", type=int, help="warm-up runs of each model per batch size (default: ~0.3 s)")
    bench.add_argument("--eval-batch-size", type=int,
                       help="batch size of the error pass (default: the largest --batch-sizes)")
    bench.add_argument("--no-floor", dest="floor", action="store_false",
                       help="do not profile the models (no Amdahl floor, slow chains or subnormal-weight timing)")
    bench.add_argument("--row-mask", metavar="INPUT|auto|none", default="auto",
                       help="a [batch, seq] 0/1 input marking padding: its zero positions of [N, seq, F] outputs are "
                            "left out of the comparison (default auto: attention_mask or input_mask if present)")
    _batch_axis_argument(bench)
    bench.add_argument("--json", help="also write the results as JSON here")
    bench.set_defaults(run=_bench)


def _rank(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or R_OUT,R_IN, got {text!r}") from None
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or R_OUT,R_IN, got {text!r}")
    return values[0] if len(values) == 1 else values


def _data_arguments(parser: argparse.ArgumentParser, data_required: bool = False) -> None:
    parser.add_argument("--data", required=data_required,
                        help="calibration data: .npz (input name -> array) or .npy (single-input model)")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    parser.add_argument("--precision", default="float32", metavar="float32|float64",
                        help="calibration products: float32 per block, summed in float64 (default; ~1e-7 relative, "
                             "twice as fast), or float64 throughout")
    _input_shape_argument(parser)
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME_OR_OPTYPE",
                        help="layers to leave alone, by node name or op type (e.g. Gemm)")
    parser.add_argument("--row-mask", metavar="INPUT|auto|none", default="auto",
                        help="a [batch, seq] 0/1 input (e.g. attention_mask) whose zeros mark padding: validation "
                             "batches are padded under it and token outputs compared at real positions only "
                             "(default auto: attention_mask or input_mask if the model has one; none: no mask)")
    parser.add_argument("--drop-padding-rows", action="store_true",
                        help="with a row mask: also leave the padding rows out of the statistics (off by default: "
                             "on a BERT encoder it did not help held-out fidelity)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    _initializer_inputs_argument(parser)


def _initializer_inputs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initializer-inputs", default="constant", choices=["constant", "refuse"],
                        help="initializers also listed as graph inputs (IR 3 exports): constant weights (default; "
                             "the compressed model lists them again, except the replaced weights) or refuse (they "
                             "stay overridable and their layers dense)")
    _batch_axis_argument(parser)


def _batch_axis_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-axis", dest="batch_axes", action="append", default=[], metavar="NAME:AXIS|none",
                        help="the sample axis of an input or output where the graph cannot tell (default: read from "
                             "the dim name the inputs share, e.g. a state [2, batch, 128] on axis 1; scalars and fixed "
                             "tensors have none: their one value serves every sample); repeatable")


def _input_shape_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", dest="input_shapes", action="append", default=[], metavar="NAME:D1,D2,...",
                        help="fix a dynamic input shape, e.g. input:-1,3,224,224 (-1 keeps a dimension dynamic, "
                             "as the batch of the data; repeatable)")


def _ray_argument(parser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS|local",
                        help="sum the calibration batches on a Ray cluster's actors: 'local' starts Ray here, else "
                             "the address of a running cluster ('auto': the one this machine joined); needs "
                             "pip install 'onnxcomp[distributed]'")


def _compress(args) -> int:
    from .config import CompressConfig
    from .pipeline import compress

    config = CompressConfig.from_options(**_api_options(CompressConfig.from_options, args))
    check_writable(args.output, "output", _external_data_name(args.input, args.output))
    if args.report:
        check_writable(args.report, "report")
    refuse_clashes([*_model_files("input model", args.input), ("calibration data (--data)", args.data),
                    ("validation data (--validation-data)", args.validation_data),
                    ("statistics (--stats)", args.stats)],
                   [("output", args.output), ("output's external data", external_data_file(args.output)),
                    ("report", args.report)])
    compressed, report = compress(load_model(args.input), args.data, config, stats=args.stats,
                                  validation_data=args.validation_data)
    save_model(compressed, args.output)
    if args.report:
        report.save(args.report)
    # Printed after every file is written: a closed stdout (`| head`) loses only lines.
    print(report.table())
    print(f"wrote {args.output}")
    if args.report:
        print(f"wrote {args.report}")
    return 0


def _calibrate(args) -> int:
    from .calibration.quality import check_statistics
    from .calibration.stats import Statistics
    from .pipeline import calibrate

    check_writable(args.output, "statistics")
    refuse_clashes([*_model_files("input model", args.input), ("calibration data (--data)", args.data),
                    *(("statistics to merge (--merge)", shard) for shard in args.merge)],
                   [("statistics", args.output)])
    statistics = calibrate(load_model(args.input), args.data, input_shapes=args.input_shapes,
                           skip=args.skip, batch_size=args.batch_size, progress=args.progress,
                           row_mask=args.row_mask, threads=args.threads, drop_padding_rows=args.drop_padding_rows,
                           precision=args.precision, initializer_inputs=args.initializer_inputs,
                           batch_axes=args.batch_axes, ray=args.ray)
    for shard in args.merge:
        statistics = statistics.merged(Statistics.load(shard))
    for warning in check_statistics(statistics):  # the merged whole: a constant shard may be fine
        print(f"warning: {warning}", file=sys.stderr)
    statistics.save(args.output)
    samples = max(s.samples for s in statistics.values())
    print(f"wrote {args.output}: {len(statistics)} layer inputs, {samples} samples")
    return 0


def _bench(args) -> int:
    from .bench import bench

    if args.json:
        check_writable(args.json, "output")
    refuse_clashes([*_model_files("original model", args.original), *_model_files("compressed model", args.compressed),
                    ("data (--data)", args.data), ("labels (--labels)", args.labels)],
                   [("JSON output (--json)", args.json)])
    result = bench(**_api_options(bench, args))
    if args.json:
        result.save(args.json)
    print(result.table())  # after the file: a closed stdout loses only lines
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _external_data_name(model: str, output: str) -> tuple[str, ...]:
    """The name of the output's external data file when the compressed model may need one (the input
    model and its data are that large): its length is checked before any work, with the output's."""
    try:
        size = sum(os.path.getsize(path) for path in (model, *external_data_files(model)))
    except OSError:  # not there: loading the model says so
        return ()
    return (external_data_file(output).name,) if size > EXTERNAL_DATA_BYTES else ()


def _model_files(role: str, path: str) -> list[tuple[str, str | Path]]:
    """A model file and the external data files it refers to, as ``(role, path)`` pairs."""
    return [(role, path), *((f"{role}'s external data", f) for f in external_data_files(path))]


def _api_options(function, args) -> dict:
    """The parsed options that ``function`` takes: the command line's ``dest`` names are those of
    the Python API's parameters."""
    names = inspect.signature(function).parameters
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _inspect(args) -> int:
    from .model.prepare import prepare_model
    from .model.subgraphs import describe

    prepared = prepare_model(load_model(args.input), args.initializer_inputs, args.batch_axes)
    model = prepared.model
    for note in prepared.notes:
        print(f"note: {note}")
    shapes = parse_input_shapes(args.input_shapes)
    layers, skipped = find_layers(model, shapes)
    shares, source = _inspect_times(args, model, layers, shapes)
    timed = shares[0].layers if shares else {}
    in_bodies = any(l.scope for l in layers)
    header = ("layer", "op", "shape", "input", *(("in body",) if in_bodies else ()), "params", "MACs/sample") + (
        ("ms b1",) if timed else ())
    rows = [header] + [
        (l.name, l.op_type, l.shape_text, l.input, *((describe(l.scope) or "-",) if in_bodies else ()), str(l.params),
         "?" if l.macs() is None else str(l.macs()),
         *((f"{timed[l.name] * 1e3:.3g}" if l.name in timed else "-",) if timed else ()))
        for l in layers
    ]
    for line in columns(rows):
        print(line)
    for s in skipped:
        print(f"not compressible: {s.name} ({s.op_type}): {s.reason}")
    from .model.semantics import output_semantics

    for meaning in output_semantics(model).values():  # how compress judges each output
        print(f"judged as: {meaning.line()}")
    total = count_macs(model, shapes)
    print(f"{len(layers)} compressible layers; model params {count_params(model)}, "
          f"MACs/sample {'unknown (dynamic shapes: use --input-shape)' if total is None else total}")
    from .reach import reach_lines

    for line in reach_lines(shares, source, layers, total, args.provider, args.threads):
        print(line)
    return 0


def _inspect_times(args, model, layers, shapes):
    """inspect's timing: (shares per batch size, where the inputs came from), or ([], why not)."""
    if not args.timing or not layers:
        return [], "not timed (--no-timing)" if not args.timing else ""
    from .reach import model_shares
    from .runtime import Timer, execution_providers

    if args.threads is not None and args.threads < 1:
        raise OnnxcompError(f"--threads must be a positive integer, got {args.threads}")
    if args.batch_size < 1:
        raise OnnxcompError(f"--batch-size must be a positive integer, got {args.batch_size}")
    execution_providers(args.provider)
    return model_shares(Timer(args.provider, args.threads), model, layers, shapes, args.data, args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
