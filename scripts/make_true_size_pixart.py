"""A true-size PixArt-Σ-XL EDiT pipeline folder whose text encoder is a true-size T5-v1.1-XXL (random weights).

    python scripts/make_true_size_pixart.py OUT

OUT is a diffusers PixArtSigmaPipeline folder: the `pixart-sigma-xl` preset (PixArt-Σ-XL-2-1024 transformer, SDXL
VAE) converted to EDiT by `edit-mobile convert`, with `text_encoder/` replaced by a 4.76 B-parameter T5-XXL written
one block at a time (models/t5_xxl.py): 19 GB on disk, never whole in memory. Export it with a component size limit,
so that the T5 is read and exported chunk by chunk (docs/quantization.md, "True-size T5-XXL"):

    edit-mobile export OUT --resolution 512 --max-component-mb 2048 --out PKG
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from edit_mobile.models.convert import convert
from edit_mobile.models.t5_xxl import write_random_t5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    staging = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    convert("pixart-sigma-xl", "edit", staging)  # the preset's 1-layer T5 is replaced below
    shutil.rmtree(staging / "text_encoder")
    write_random_t5(staging / "text_encoder")
    info = json.loads((staging / "edit_mobile.json").read_text())
    info["text_encoder"] = "random T5-v1.1-XXL encoder at true size (models/t5_xxl.py)"
    (staging / "edit_mobile.json").write_text(json.dumps(info, indent=2) + "\n")
    staging.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
