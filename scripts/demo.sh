#!/usr/bin/env bash
# The main job on the bundled tiny model: convert PixArt-Σ to EDiT, export it to an ONNX package, generate an
# image with the numpy + ONNX Runtime runtime, and validate the package against the diffusers PyTorch pipeline.
# Everything lands in ./out (recreated on each run).
set -euo pipefail
out="${1:-out}"
rm -rf "$out" && mkdir -p "$out"
edit-mobile convert tiny-pixart --arch edit --out "$out/tiny-edit"
edit-mobile export "$out/tiny-edit" --target onnx --resolution 256 --out "$out/tiny-edit-onnx"
edit-mobile inspect "$out/tiny-edit-onnx"
edit-mobile generate "$out/tiny-edit-onnx" --prompt "a red circle" --steps 20 --out "$out/red-circle.png"
edit-mobile validate "$out/tiny-edit-onnx" --steps 20 --json "$out/validation.json"
echo "demo done: image $out/red-circle.png, validation report $out/validation.json"
