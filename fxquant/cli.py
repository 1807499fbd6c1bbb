"""The `fxquant` command line: compile, report, bench, dump, passes, eval, transcribe, demo.

Example:
    fxquant dump kws-cnn --after fold-bn
    fxquant compile bcresnet --avg-bits 3 --dump-dir dumps/
"""
from __future__ import annotations

import argparse
import os
import sys

# torch's OpenMP workers (libgomp) spin ~300k iterations at every barrier by default: with one core taken by
# another program, a 2-thread op then waits a whole time slice for its preempted partner. GOMP_SPINCOUNT=0
# makes them sleep at once (measured, Whisper tiny.en fp32 encoder with one core busy: 992 -> 388 ms;
# `fxquant compile whisper-tiny.en --avg-bits 4`, encoder sensitivity sweep: 674 s -> 78 s). libgomp reads
# it when torch loads, so it is set before the import, and only when the user has not chosen a value.
os.environ.setdefault("GOMP_SPINCOUNT", "0")

import torch  # noqa: E402

from .errors import FxQuantError
from .formats import scheme_options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (whisper-tiny.en, whisper-base, kws-cnn, bcresnet, digits), a "
                                 "Whisper checkpoint folder, or module.path:factory returning (model, "
                                 "example_inputs)")
    p.add_argument("--passes", help="pipeline text, e.g. 'cleanup,fold-bn,propagate-shapes'")
    p.add_argument("--dump-dir", help="write the graph after every pass here")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, choices=(8, 4, 3, 2), help="one weight bit width for every node")
    g.add_argument("--avg-bits", type=float, help="mixed precision: average weight bits budget")
    g.add_argument("--budget-bytes", type=int, help="mixed precision: total weight bytes budget")
    p.add_argument("--scheme", default="auto", choices=scheme_options())
    p.add_argument("--target", default="native", help="native | avx512 | avx2 | portable | reference")


def _compile_from_args(args):
    """(model, example inputs, compiled module) for the model/budget arguments shared by the subcommands."""
    import fxquant
    from .zoo import load_factory

    model, inputs = load_factory(args.model)
    cm = fxquant.compile_lowbit(model, inputs, bits=args.bits, avg_bits=args.avg_bits,
                                budget_bytes=args.budget_bytes, scheme=args.scheme, passes=args.passes,
                                target=args.target, dump_dir=args.dump_dir)
    return model, inputs, cm


def cmd_compile(args) -> int:
    from .asr.cli import cmd_compile_whisper, is_whisper

    if is_whisper(args.model):
        return cmd_compile_whisper(args)
    _, _, cm = _compile_from_args(args)
    print(cm.report(passes=True))
    if getattr(args, "out", None):
        cm.save(args.out)
        print(f"saved to {args.out}")
    return 0


def cmd_bench(args) -> int:
    """Median latency of the fp32 model and the compiled one on the factory's example inputs."""
    import statistics
    import time

    from tabulate import tabulate

    from .runtime import tensor_bytes

    model, inputs, cm = _compile_from_args(args)

    def median_ms(fn) -> float:
        with torch.no_grad():
            fn(*inputs)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                fn(*inputs)
                times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    fp32_ms, ours_ms = median_ms(model), median_ms(cm)
    rows = [
        ["fp32 (torch)", f"{fp32_ms:.3f}", "1.00x", f"{tensor_bytes(model) / 1024:.1f}"],
        [
            f"fxquant ({cm.summary()['avg_weight_bits']:.2f} bits)",
            f"{ours_ms:.3f}",
            f"{fp32_ms / ours_ms:.2f}x",
            f"{cm.summary()['model_bytes'] / 1024:.1f}",
        ],
    ]
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    print(f"{args.model} on {shapes}, {torch.get_num_threads()} threads, median of {args.reps} calls")
    print(tabulate(rows, headers=["variant", "median ms", "speed-up", "KiB"], tablefmt="simple"))
    return 0


def cmd_dump(args) -> int:
    import fxquant
    from .dump import table_text
    from .pipeline import Pipeline
    from .zoo import load_factory

    model, inputs = load_factory(args.model)
    pipeline = Pipeline.coerce(args.passes or fxquant.default_pipeline("reference"))
    names = pipeline.names()
    if args.after not in names:
        raise fxquant.PipelineError(
            f"--after {args.after!r} is not in the pipeline; its passes are: {', '.join(names)}"
        )
    steps = pipeline.steps[: names.index(args.after) + 1]
    cm = fxquant.compile_lowbit(model, inputs, passes=Pipeline(steps), dump_dir=args.dump_dir)
    print(table_text(cm.graph_module, include_get_attr=args.all))
    return 0


def cmd_passes(args) -> int:
    from tabulate import tabulate
    from .registry import available_passes

    rows = [[p.name, p.kind, p.origin, p.description] for p in available_passes().values()]
    print(tabulate(rows, headers=["pass", "kind", "from", "what it does"], tablefmt="simple"))
    return 0


def cmd_eval(args) -> int:
    from .asr.cli import cmd_eval_whisper, is_whisper
    from .datasets import shared_dir
    from .errors import ConfigError
    from .evaluate import evaluate_digits, evaluate_keywords, render

    if shared_dir() is None:
        raise ConfigError(
            "fxquant eval needs ../shared (FSDD recordings) beside the repository, or "
            "FXQUANT_SHARED pointing at it"
        )
    if is_whisper(args.model):
        return cmd_eval_whisper(args)
    variants = (args.variants or "fp32,torch-int8,W8A8,W4,mixed-4.0,mixed-3.0").split(",")
    if args.model == "digits":
        rows = evaluate_digits(args.n, variants, target=args.target)
        title = f"digit recognizer, {args.n} connected-digit strings from FSDD test takes"
    elif args.model == "bcresnet":
        rows = evaluate_keywords(variants, args.split, target=args.target)
        title = f"BC-ResNet keyword accuracy on FSDD ({args.split} clips)"
    else:
        raise ConfigError(f"fxquant eval knows 'digits' and 'bcresnet', not {args.model!r}")
    print(render(rows, title))
    return 0


def cmd_transcribe(args) -> int:
    import fxquant
    from .asr.cli import cmd_transcribe_whisper, is_whisper
    from .audio import load_audio
    from .models import digits as dg

    if args.model != "digits" and (args.artifact is None or is_whisper(args.artifact)):
        return cmd_transcribe_whisper(args)
    if args.batch_size is not None:
        from .errors import ConfigError

        raise ConfigError("--batch-size applies to Whisper; the digit recognizer reads one file at a time")
    model = fxquant.load(args.artifact) if args.artifact else dg.load_digits_model()
    config = dg.load_digits_model().config if args.artifact else model.config
    for path in args.audio:
        print(f"{path}: {' '.join(dg.transcribe(model, load_audio(path), config)) or '(nothing recognised)'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxquant", description="Low-bit compiler for speech models on CPUs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="compile a model and print its per-node report")
    _add_model_args(p)
    _add_budget_args(p)
    p.add_argument("--out", help="save the compiled artifact to this directory")
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("report", help="compile a model and print its per-node report (no artifact)")
    _add_model_args(p)
    _add_budget_args(p)
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("bench", help="median latency of the compiled model vs fp32 on its example inputs")
    _add_model_args(p)
    _add_budget_args(p)
    p.add_argument("--reps", type=int, default=50)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("dump", help="print the graph table after a chosen pass")
    _add_model_args(p)
    p.add_argument("--after", default="propagate-shapes", help="pass name after which to print the graph")
    p.add_argument("--all", action="store_true", help="include get_attr (parameter) nodes")
    p.set_defaults(fn=cmd_dump)
    p = sub.add_parser("passes", help="list registered passes (built-in and plugins)")
    p.set_defaults(fn=cmd_passes)
    p = sub.add_parser(
        "eval", help="word error rate / keyword accuracy of fp32, torch int8 and fxquant variants"
    )
    p.add_argument("model", help="whisper-tiny.en, whisper-base (or a checkpoint folder), digits, bcresnet")
    p.add_argument("--n", type=int, default=300, help="digit strings to evaluate (digits)")
    p.add_argument("--limit", type=int, help="Whisper: score only the first N LJ Speech utterances")
    p.add_argument("--fsdd", type=int, default=60, help="Whisper: FSDD digit sentences to score (0: none)")
    p.add_argument("--split", default="all", choices=("all", "test", "train"), help="FSDD clips (bcresnet)")
    p.add_argument(
        "--variants",
        help="comma-separated variants (Whisper: openai-fp32, fp32, torch-int8, ct2-int8, "
        "bits8, bits4, avg4, avg3; digits/bcresnet: fp32, torch-int8, W8A8, W4, "
        "mixed-4.0, ...)",
    )
    p.add_argument("--target", default="native")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("transcribe", help="transcribe audio files with Whisper (or the digit recognizer)")
    p.add_argument("audio", nargs="+", help="audio files: WAV, FLAC, OGG; any sample rate; mono or stereo")
    p.add_argument(
        "--model",
        default="whisper-tiny.en",
        help="whisper-tiny.en (default), whisper-base, a checkpoint folder, or 'digits'",
    )
    p.add_argument("--artifact", help="a compiled artifact folder (Whisper or digit recognizer)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--precision", choices=("fp32",), help="run the fp32 model (the default)")
    g.add_argument("--bits", type=int, choices=(8, 4, 3, 2), help="compile at this weight bit width (cached)")
    g.add_argument("--avg-bits", type=float, help="compile at this average weight bit budget (cached)")
    p.add_argument(
        "--format",
        default="txt",
        choices=("txt", "tsv", "json"),
        help="txt: one text per line; tsv: path<TAB>text; json: a list of objects",
    )
    p.add_argument("--batch-size", type=int, help="30 s windows decoded together (Whisper; default 8): "
                                                  "1 needs the least memory, 8 is about twice as fast")
    p.set_defaults(fn=cmd_transcribe)
    p = sub.add_parser(
        "demo", help="compile Whisper tiny.en to low bits and transcribe real speech vs its peers"
    )
    p.add_argument("--quick", action="store_true", help="fewer utterances")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FxQuantError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"fxquant: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
