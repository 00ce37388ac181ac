"""Scaling study: transformer step latency and peak memory vs resolution, EDiT / MM-EDiT vs softmax DiTs on ONNX
Runtime.

For each architecture (PixArt-Σ-XL, SD3.5-Medium: true width, random weights, depth reduced where stated) and
resolution, these variants of the transformer run one denoising call each (batch 1 = one CFG half):
  softmax        the teacher, exported by our exporter (export/onnx_export.py), fp32
  softmax-mha    the teacher in the best form a peer would ship on CPU: every attention exported as ONNX Runtime's
                 fused com.microsoft.MultiHeadAttention (memory-efficient flash attention on CPU), then ONNX
                 Runtime's transformer optimizer (FastGelu, SkipLayerNormalization fusions)
  softmax-ortopt SD3 only: our teacher graph through ONNX Runtime's transformer optimizer in its `mmdit` mode
  edit / mm-edit EDiT (PixArt) / MM-EDiT (SD3) converted from the same teacher, our exporter, fp32
  *-int8         ONNX Runtime dynamic int8 (export/quantize_onnx.quantize_dynamic_int8, the `edit-mobile quantize
                 --precision int8-dynamic` path) of the fp32 graph
  torch-*        the same models in PyTorch eager (fp32, torch.inference_mode)
  optimum        SD3 only, --with-optimum: the teacher exported by `optimum-onnx` in its own virtual environment
Every variant runs in its own worker process (so peak RSS is per variant). Variants that are compared run
interleaved in the same rounds (order rotating each round), in groups small enough to fit in memory together:
  attention  softmax, softmax-mha, softmax-ortopt, edit        int8   edit, edit-int8, softmax-int8
  torch      edit, torch-edit, torch-softmax                  optimum  softmax, optimum
Ratios are computed only between variants of the same group. A variant that exceeds the memory limit (address-space
limit in the worker plus an RSS watchdog) is recorded as "oom", one that exceeds the call timeout as "timeout":
the study never crashes on them. Exported graphs are cached in the work folder (default ./out/bench_scaling).

Writes the results as JSON, a log-log plot (latency and peak memory vs image tokens) and the generated section of
docs/benchmarks.md (between its bench_scaling markers), with the machine, load average, the measured fp32 matmul
peak and each variant's achieved GFLOP/s (multiply-adds counted on the fp32 graph x 2 / median time).

The architectures are the `pixart-sigma-xl` and `sd35-medium` presets' transformers (studies/archs.py). The study
is split by job under scripts/studies/scaling/: plan.py (architectures, groups, options, the measured points),
models.py (the models, export specs and timing inputs), worker.py (the child processes: export, measuring worker,
matmul peak), study.py (the interleaved measurement), optimum.py (the optimum-onnx virtual environment) and
report.py (ratios, JSON, plot, Markdown). The fused-MHA export is export code: export/mha.py.

    python scripts/bench_scaling.py --quick             # PixArt-XL width, 1 layer, 256² and 512², a few minutes
    python scripts/bench_scaling.py --docs              # the full study, results into docs/
    python scripts/bench_scaling.py --docs --with-optimum
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from studies.scaling.plan import build_parser, plan
from studies.scaling.process import REPO
from studies.scaling.report import merge_reports, ratios, write_report
from studies.scaling.study import Study, machine_description, measure_peak

DOCS = REPO / "docs"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    if args.quick:
        args.archs, args.int8 = ["pixart"], args.int8 and "--no-int8" not in argv
    docs_markdown = DOCS / "benchmarks.md" if args.docs else None
    if args.render_only:
        out_dir = DOCS if args.docs else Path(args.work_dir).resolve()
        report = json.loads((out_dir / "bench_scaling.json").read_text())
        report["ratios"] = ratios(report["results"])
        write_report(report, out_dir, docs_markdown)
        return report
    study = Study(args)
    if args.text_tokens:
        study.set_text_tokens("pixart", args.text_tokens)
    study.machine = machine_description(args.threads)
    study.log(f"machine: {study.machine}")
    study.peak = measure_peak(study)
    steps = plan(args, {arch: study.desc(arch) for arch in args.archs})
    study.log(
        f"plan: {len(steps)} groups: " + "; ".join(f"{s['arch']} {s['res']}² d{s['depth']} {s['group']}" for s in steps)
    )
    for s in steps:
        profile = args.profile or (s["group"] == "attention" and s["res"] <= 1024)
        study.measure_group(
            s["arch"],
            s["group"],
            s["variants"],
            s["res"],
            s["depth"],
            s["warmup"],
            s["runs"],
            profile=profile,
            call_timeout=s["call_timeout"],
        )
    study.machine["loadavg_end"] = list(os.getloadavg())
    report = study.report()
    out_dir = DOCS if args.docs else study.work
    if args.merge and (out_dir / "bench_scaling.json").is_file():
        report = merge_reports(json.loads((out_dir / "bench_scaling.json").read_text()), report)
    write_report(report, out_dir, docs_markdown)
    study.log(
        f"wrote {out_dir / 'bench_scaling.json'}, {out_dir / 'bench_scaling.png'}"
        + (", docs/benchmarks.md" if args.docs else f", {study.work / 'benchmarks_section.md'}")
    )
    for q in report["ratios"]:
        study.log(
            f"{q['arch']} {q['resolution']}² d{q['depth']} {q['what']}: {q.get('speedup')}× "
            f"(memory {q.get('memory_ratio')}×)"
        )
    return report


if __name__ == "__main__":
    main()
