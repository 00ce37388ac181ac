"""The scaling study's plan: which architectures, variants, groups and resolutions are measured, and the options.

Torch-free. The architectures' sizes come from the model presets (studies/archs.py), described once per work folder
by a child process (`describe` in models.py, cached as JSON): `ARCHS` holds only what the study itself chooses.
"""

from __future__ import annotations

import argparse
import os

# What the study chooses per architecture; the architecture itself is the preset's transformer (studies/archs.py).
ARCHS = {
    "pixart": {
        "preset": "pixart-sigma-xl",
        "title": "PixArt-Σ-XL",
        "student": "edit",
        "text_tokens": 300,  # T5 prompt tokens PixArt-Σ's pipeline encodes
        "timestep": 999.0,
    },
    "sd3": {
        "preset": "sd35-medium",
        "title": "SD3.5-Medium",
        "student": "mm-edit",
        "text_tokens": 77 + 256,  # CLIP tokens + T5 tokens, as SD3's pipeline concatenates them
        "timestep": 500.0,
    },
}
GROUPS = {
    # softmax-bound: the teacher with its self-attention core replaced by the identity on V (models.py), the
    # attention-free bound EDiT is measured against. *-mha: the fused graph `edit-mobile export` ships by default
    # (export/mha.py); the others are the plain graph (`--graph plain`).
    "attention": [
        "softmax",
        "softmax-mha",
        "softmax-ortopt",
        "softmax-bound",
        "softmax-bound-mha",
        "@student",
        "@student-mha",
    ],
    # @student-mha-int8: what `export` + `quantize --precision int8-dynamic` ship, against the fp32 fused teacher
    "int8": ["@student", "@student-int8", "softmax-int8", "@student-mha-int8", "softmax-mha"],
    # EDiT's own configuration (PixArt, fused as shipped): ConvFusion C -> C/8 instead of C/4, compressor stride 4
    # instead of 2, both; a depthwise-separable ConvFusion, none; against the attention-free bound. Speed only (fresh
    # conversions; scripts/study_edit_variants.py distils them on the shapes model for their quality)
    "edit-config": [
        "softmax-bound-mha",
        "@student-mha",
        "@student-r8-mha",
        "@student-s4-mha",
        "@student-r8-s4-mha",
        "@student-sep-mha",
        "@student-nocf-mha",
    ],
    "torch": ["@student", "torch-@student", "torch-softmax"],
    "optimum": ["softmax", "optimum", "@student"],
    # ONNX Runtime's CPU memory arena (BFC, on by default) vs plain malloc / free: the peak-memory question
    # and the same for the fused graphs `export` ships: is EDiT's extra peak over the fused teacher the arena's?
    "arena": [
        "@student",
        "@student+noarena",
        "@student-mha",
        "@student-mha+noarena",
        "softmax-mha",
        "softmax-mha+noarena",
    ],
    # ONNX Runtime's memory pattern (its default, off in our runtime) on and off, fused graphs as `export` ships
    # them: what the pattern's one block costs each of them, and EDiT against the teacher and the bound either way
    "memory": [
        "softmax-mha",
        "softmax-mha+pattern",
        "softmax-bound-mha",
        "softmax-bound-mha+pattern",
        "@student-mha",
        "@student-mha+pattern",
    ],
}
# The complete PixArt-Σ-XL EDiT (the preset's depth, 28 blocks) at --full-depth-res: one group per variant, so that
# one ~8-16 GB worker is alive at a time. The plain graph with ONNX Runtime's CPU arena and without it, and the
# fused graph `export` ships in fp32 and int8.
FULL_DEPTH = {
    "full-depth": "edit",
    "full-depth-noarena": "edit+noarena",
    "full-depth-fused": "edit-mha",
    "full-depth-fused-int8": "edit-mha-int8",
}
ALL_GROUPS = ["attention", "int8", "edit-config", "torch", "optimum", "arena", "memory", *FULL_DEPTH]


def tokens(res: int, desc: dict) -> int:
    """Image tokens of the transformer at `res`² pixels (VAE factor, then patches)."""
    return (res // desc["vae_factor"] // desc["patch"]) ** 2


def plan(args, descs: dict[str, dict]) -> list[dict]:
    """The measured points: (arch, resolution, depth, group, variants, warm-up, runs, call timeout). `descs`: the
    architecture descriptions (models.describe) by arch."""
    steps = []
    student_groups = [
        g for g in ("attention", "int8", "edit-config") if g in args.groups and (g != "int8" or args.int8)
    ]

    def add(arch, res, depth, group, warmup=None, runs=None):
        student = ARCHS[arch]["student"]
        variants = [v.replace("@student", student) for v in GROUPS[group]]
        if arch != "pixart":  # the bound is built for PixArt only
            variants = [v for v in variants if not v.startswith("softmax-bound")]
        if arch == "pixart" or res >= 1024:
            # pixart: no attention fusion exists. SD3 at 1024²: the optimizer fuses no attention there either
            # (docs/benchmarks.md), and its 8.7 GB worker beside the plain teacher's would not leave room for the
            # group's other workers in 24 GB
            variants = [v for v in variants if v != "softmax-ortopt"]
        if res >= 2048:
            # Memory: the workers of a group are alive together; at 2048² an EDiT worker holds ~3-6 GB, so the
            # attention group keeps the graphs `export` ships (fused), the plain ones are measured up to 1024².
            if group == "attention":
                variants = [v for v in variants if v not in (student, "softmax-bound")]
            if group == "edit-config":  # 7 workers of ~4 GB do not fit in 24 GB (one was killed): 5 of them, the
                # stride-4 compressors measured at 1024² (at 2048² they save 10 % of the peak: docs/benchmarks.md)
                variants = [v for v in variants if "-s4" not in v]
            runs = args.runs_large if runs is None else runs
        if res >= 4096:  # minutes per call: one cold call each; the fp32 EDiT is not repeated in the int8 group
            warmup, runs = 0, 1
            if group == "int8":  # ~10 GB workers: the plain int8 pair only (fused: the full-depth groups)
                variants = [v for v in variants if v not in (student, f"{student}-mha-int8", "softmax-mha")]
        steps.append(
            {
                "arch": arch,
                "res": res,
                "depth": depth,
                "group": group,
                "variants": variants,
                "warmup": args.warmup if warmup is None else warmup,
                "runs": args.runs if runs is None else runs,
                "call_timeout": args.call_timeout,
            }
        )

    if args.quick:
        for res in (256, 512):
            add("pixart", res, args.depth or 1, "attention")
        if args.int8:
            add("pixart", 512, args.depth or 1, "int8")
        return steps
    depth = args.depth or 2
    for arch in args.archs:
        for res in args.resolutions if arch == "pixart" else args.sd3_resolutions:
            for group in student_groups:
                if group != "edit-config" or arch == "pixart":
                    add(arch, res, depth, group)
            if "torch" in args.groups and args.torch and res in args.torch_resolutions and arch in args.torch_archs:
                add(arch, res, depth, "torch")
            if "optimum" in args.groups and arch == "sd3" and args.with_optimum and res == args.optimum_resolution:
                add(arch, res, depth, "optimum")
    for group in ("arena", "memory"):
        if group in args.groups and "pixart" in args.archs:
            for res in args.arena_resolutions:
                add("pixart", res, depth, group)
    if args.full_depth and "pixart" in args.archs:
        # One cold call each: its time and its peak memory.
        for group, variant in FULL_DEPTH.items():
            if group not in args.groups:
                continue
            steps.append(
                {
                    "arch": "pixart",
                    "res": args.full_depth_res,
                    "depth": descs["pixart"]["full_depth"],
                    "group": group,
                    "variants": [variant],
                    "warmup": 0,
                    "runs": 1,
                    "call_timeout": 3 * args.call_timeout,
                }
            )
    return steps


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="PixArt-XL width, 1 layer, 256² and 512², softmax / fused-MHA teacher / EDiT (minutes)",
    )
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument(
        "--resolutions",
        nargs="+",
        type=int,
        default=[256, 512, 1024, 2048, 4096],
        help="PixArt resolutions (default 256 512 1024 2048 4096)",
    )
    p.add_argument(
        "--sd3-resolutions", nargs="+", type=int, default=[512, 1024], help="SD3.5-M resolutions (default 512 1024)"
    )
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default 2; --quick: 1)")
    p.add_argument("--batch", type=int, default=1, help="transformer batch (default 1: one CFG half)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant (default 1)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per variant (default 3)")
    p.add_argument("--runs-large", type=int, default=2, help="timed calls at 2048² and above (default 2)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 group")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch eager group")
    p.add_argument("--torch-resolutions", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--torch-archs", nargs="+", choices=list(ARCHS), default=["pixart"])
    p.add_argument(
        "--arena-resolutions",
        nargs="+",
        type=int,
        default=[2048],
        help="PixArt resolutions of the arena and memory groups (default 2048)",
    )
    p.add_argument(
        "--groups", nargs="+", choices=ALL_GROUPS, default=ALL_GROUPS, help="which groups to run (default all)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge into the existing output JSON: rows of the groups measured now replace the same "
        "(arch, resolution, depth, group) rows of earlier runs, the others are kept (each row names "
        "its run; ratios stay within one group of one run)",
    )
    p.add_argument(
        "--no-full-depth",
        dest="full_depth",
        action="store_false",
        help="skip the 28-layer PixArt-Σ-XL EDiT calls (full-depth groups)",
    )
    p.add_argument(
        "--full-depth-res", type=int, default=2048, help="resolution of the full-depth groups (default 2048)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="ONNX Runtime per-op profile of every ONNX variant (default: on for the attention group up to 1024²)",
    )
    p.add_argument(
        "--with-optimum",
        action="store_true",
        help="also export the SD3 teacher with optimum-onnx in its own venv and time it",
    )
    p.add_argument("--optimum-resolution", type=int, default=1024)
    p.add_argument("--optimum-venv", default="out/optimum-venv")
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=16.0,
        help="per-worker memory limit: address space and RSS watchdog (default 16)",
    )
    p.add_argument("--call-timeout", type=float, default=900.0, help="seconds per call before 'timeout'")
    p.add_argument("--export-timeout", type=float, default=3600.0)
    p.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="PixArt: the T5 prompt tokens its graphs take (default 300, the pipeline's; as `export "
        "--max-text-tokens`); a --work-dir of its own per length",
    )
    p.add_argument("--work-dir", default="out/bench_scaling", help="exported graphs, results, profiles")
    p.add_argument("--retry-failed", action="store_true", help="retry exports that failed in an earlier run")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: re-render the plot and Markdown from the output JSON",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="write docs/bench_scaling.json, docs/bench_scaling.png and the section of docs/benchmarks.md"
        " (default: only into the work folder)",
    )
    return p
