"""Measure a package on a backend with one protocol: cold load time per component (session creation), per-component
latency (median, p10, p90 of N runs after K warm-ups, on the inputs the text-to-image loop feeds it), transformer
time per denoising step, end-to-end text-to-image latency for S steps, runtime overhead (end to end minus the
component times inside it), peak resident memory of the process, package size on disk, and the machine
(CPU, cores, threads, library versions, load average). Prints a table; --json writes everything.

example:
  edit-mobile bench pkg --runs 10 --warmup 2 --steps 20 --threads 4 --json bench.json
  edit-mobile bench pkg --runs 1 --steps 4 --memory-phases     # peak memory per phase, --memory default vs low
"""

from __future__ import annotations

HELP = "latency, load time, memory and size of a package (per component and end to end)"


def build_parser(parser):
    parser.add_argument("package", metavar="PKG", help="package folder written by `edit-mobile export` / `quantize`")
    # Validated in main (not with argparse choices), so that a bad value is one error line, like every input error.
    parser.add_argument(
        "--backend",
        default=None,
        help="ort, coreml (macOS), coreml-reference or executorch (default: the package's: ort for ONNX, "
        "coreml on macOS and coreml-reference elsewhere for Core ML, executorch for ExecuTorch)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per component and end to end (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before them (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: ONNX Runtime's, one per physical core)",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the end-to-end runs (default 20)")
    parser.add_argument("--e2e-runs", type=int, default=None, help="timed end-to-end runs (default: --runs)")
    parser.add_argument("--prompt", default=None, help="prompt of the end-to-end runs")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the family's diffusers default)",
    )
    parser.add_argument(
        "--memory-phases",
        action="store_true",
        help="also generate one image in each memory mode (--memory default / low), each in a fresh process, and "
        "report the peak resident memory of every phase (loading, text encoding, denoising, decoding)",
    )
    parser.add_argument("--no-cpu-arena", action="store_true", help="ONNX Runtime: no CPU memory arena")
    parser.add_argument(
        "--shared-arena",
        action="store_true",
        help="ONNX Runtime: one CPU memory arena shared by every component's session instead of one each (memory "
        "one component freed serves the next)",
    )
    parser.add_argument(
        "--mem-pattern",
        action="store_true",
        help="ONNX Runtime: pre-plan each run's activations as one block (its own default; off here: the block comes "
        "on top of what the arena already holds, up to 1.8x the peak, for no measured speed-up; docs/memory.md)",
    )
    parser.add_argument(
        "--size", default=None, metavar="WxH", help="image size of a multi-size package (default: its first)"
    )
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the full report as JSON")
    return parser


def main(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..runtime.bench import DEFAULT_PROMPT, BenchOptions, bench_package, format_report
    from ..runtime.errors import UserError
    from ..runtime.manifest import size_key
    from ..runtime.package import parse_resolution

    options = BenchOptions(
        backend=args.backend,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        steps=args.steps,
        e2e_runs=args.e2e_runs,
        prompt=args.prompt or DEFAULT_PROMPT,
        guidance=args.guidance,
        memory_phases=args.memory_phases,
        cpu_arena=not args.no_cpu_arena,
        shared_arena=args.shared_arena,
        mem_pattern=args.mem_pattern,
        size=None if args.size is None else size_key(parse_resolution(args.size)),
    )
    options.check()
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"cannot write {args.json}: folder {Path(args.json).parent} does not exist")
    report = bench_package(
        args.package, options, progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)
    )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
