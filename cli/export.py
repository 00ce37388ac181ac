"""Export every component of a text-to-image pipeline with static shapes into an artifact package.

SRC is a preset (tiny-pixart, tiny-sd3, pixart-sigma-xl, sd35-medium) or a local diffusers pipeline folder,
teacher or converted (EDiT / MM-EDiT). The package (docs/package.md) holds manifest.json, one folder per
component (text encoders, transformer, VAE decoder and encoder), the tokenizers and the scheduler config.
--target ort-mobile also writes ONNX Runtime's .ort files and required_operators.config for a minimal build.
--target coreml writes one Core ML ML program (model.mlpackage) per component, each checked against PyTorch by
the numpy reference executor (docs/coreml.md). Several sizes (--resolution repeated, WIDTHxHEIGHT): one static
transformer and VAE graph per size whose weights are stored once (ONNX: one weights.bin per component; Core ML
from iOS18 / macOS15: one multi-function program per component), the text encoders once (docs/resolutions.md).
--target executorch writes one ExecuTorch program (model.pte) per component, lowered to the XNNPACK delegate and
checked against PyTorch in ExecuTorch's own runtime (pip install -e '.[executorch]'; docs/executorch.md);
--delegate coreml lowers to Core ML instead (Apple devices; checked here by the Core ML reference executor).

example:
  edit-mobile export tiny-pixart --target onnx --resolution 256 --out pkg
  edit-mobile export tiny-pixart --target coreml --resolution 256 --compute-precision fp16 --out pkg-coreml
  edit-mobile export tiny-pixart --target executorch --resolution 256 --out pkg-et   # .pte, XNNPACK
  edit-mobile export pixart-folder --max-component-mb 2048 --out pkg   # T5-XXL and transformer in <= 2 GB graphs
  edit-mobile export tiny-pixart --transformer-chunks 2 --out pkg     # the transformer as 2 graphs
  edit-mobile export tiny-pixart --resolution 1024 --vae-tile 256 --out pkg   # the VAE decodes 256² tiles
  edit-mobile export tiny-pixart --resolution 256 --resolution 192x320 --out pkg   # two sizes, one copy of weights
  edit-mobile export tiny-pixart --aspect-ratios common --out pkg     # PixArt-Σ's buckets for 1:1 ... 16:9
"""

from __future__ import annotations

from ..runtime.manifest import TARGETS

HELP = "export a pipeline to an ONNX / ORT-mobile / Core ML / ExecuTorch package with static shapes"


def build_parser(parser):
    from ..runtime.families import describe

    parser.add_argument("src", metavar="SRC", help="preset name or local diffusers pipeline folder")
    parser.add_argument("--target", default="onnx", choices=TARGETS, help="output format")
    parser.add_argument(
        "--resolution",
        action="append",
        metavar="N|WxH",
        help="image size in pixels: N (square) or WIDTHxHEIGHT (768x1344 is portrait); repeat it for a package with "
        "several sizes: one static transformer and VAE graph per size sharing one weights file, the text encoders "
        "once; the first is the default (default 512)",
    )
    parser.add_argument(
        "--aspect-ratios",
        metavar="NAME",
        default=None,
        help="also export the model's own aspect-ratio buckets nearest to a set of ratios: 'common' = 1:1, 3:4, "
        "9:16, 4:3, 16:9 (PixArt-Σ's bucket table for its sample size, as its diffusers pipeline bins)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=2,
        choices=[1, 2],
        help="transformer batch: 2 = classifier-free guidance in one call (default), 1 = two calls",
    )
    parser.add_argument(
        "--max-text-tokens",
        type=int,
        default=None,
        help=f"static T5 prompt length (default: the pipeline's, {describe(lambda f: f.default_text_tokens, ' / ')})",
    )
    parser.add_argument(
        "--graph",
        default=None,
        metavar="fused|plain",
        help="ONNX / ORT-mobile only: fused (default) exports the transformer's softmax attention as ONNX Runtime's "
        "fused MultiHeadAttention and applies its transformer optimizer (FastGelu, SkipLayerNormalization): the "
        "fastest graph on ONNX Runtime; plain keeps standard ONNX ops only, for other ONNX runtimes",
    )
    # No argparse `choices` for the Core ML flags: a bad value is reported on one line by export_package.
    parser.add_argument(
        "--compute-precision",
        default=None,
        metavar="fp16|fp32",
        help="Core ML only: compute precision of the ML programs (default fp16)",
    )
    parser.add_argument(
        "--deployment-target",
        default=None,
        metavar="iOS17|iOS18|macOS14|macOS15",
        help="Core ML only: minimum deployment target (default iOS17)",
    )
    parser.add_argument(
        "--delegate",
        default=None,
        metavar="xnnpack|coreml|portable",
        help="ExecuTorch only: the delegate the programs are lowered to (default xnnpack; coreml: fp16 Core ML "
        "programs inside the .pte, for Apple devices; portable: none, ExecuTorch's portable CPU kernels)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        metavar="int8-dynamic|int4-weights",
        help="ExecuTorch only: quantize at export for XNNPACK (torchao): int8-dynamic (the transformer and text "
        "encoders) or int4-weights (the transformer); ONNX and Core ML packages: `edit-mobile quantize`",
    )
    parser.add_argument(
        "--max-component-mb",
        type=float,
        default=None,
        metavar="MB",
        help="a T5 text encoder or transformer with more fp32 weights than this is exported as a chain of graphs "
        "within it, one chunk in memory at a time (a folder's T5 is never loaded whole: T5-XXL on a 24 GB machine)",
    )
    parser.add_argument(
        "--transformer-chunks",
        type=int,
        default=None,
        metavar="K",
        help="split the transformer at block boundaries into K graphs run in sequence (each loaded on its own: "
        "fits a device's per-model memory; overrides --max-component-mb for the transformer)",
    )
    parser.add_argument(
        "--vae-tile",
        type=int,
        default=None,
        metavar="PX",
        help="export the VAE decoder and encoder for square tiles of PX pixels; the runtime decodes a larger image "
        "tile by tile, blending the overlaps (as diffusers' enable_tiling), so that 2048² and 4096² images decode "
        "in the memory of one tile",
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=None,
        metavar="MB",
        help="refuse the package (nothing written) when its predicted peak memory with `generate --memory low` "
        "exceeds this, naming the largest component and the options that shrink it (docs/memory.md)",
    )
    parser.add_argument("--out", required=True, help="package folder to write (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    return parser


def main(args) -> int:
    from ..export.package import export_package
    from ..export.targets import export_target

    manifest = export_package(
        args.src,
        args.out,
        target=args.target,
        resolution=args.resolution or ([] if args.aspect_ratios else ["512"]),
        aspect_ratios=args.aspect_ratios,
        batch=args.batch,
        max_text_tokens=args.max_text_tokens,
        overwrite=args.overwrite,
        compute_precision=args.compute_precision,
        deployment_target=args.deployment_target,
        delegate=args.delegate,
        precision=args.precision,
        max_component_mb=args.max_component_mb,
        transformer_chunks=args.transformer_chunks,
        vae_tile=args.vae_tile,
        budget_mb=args.budget_mb,
        graph=args.graph,
    )
    print(export_target(manifest["target"]).summary(manifest, args.out))
    return 0
