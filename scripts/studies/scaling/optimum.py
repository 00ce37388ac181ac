"""The scaling study's `optimum` variant (--with-optimum): the SD3 teacher exported by optimum-onnx, which pins older
transformers / diffusers, from its own virtual environment.

  ensure_venv            create the venv and install optimum-onnx into it (once)
  run_optimum_export     save the teacher pipeline at the study's depth (child `_save_sd3`), then optimum-cli export
  save_sd3_pipeline      (in that child) the sd35-medium preset pipeline at reduced depth, as a diffusers folder the
                         venv's older transformers can read
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .. import archs
from .models import dual_layers
from .process import REPO, child_command, child_env

# torch first (the local 2.13.0 CPU build, not a CUDA download); optimum-onnx pins transformers < 4.58, which needs
# huggingface-hub < 1.0, hence diffusers < 0.40 (newer diffusers pull hub 1.x)
VENV_INSTALLS = (
    ["torch==2.13.0"],
    [
        "optimum-onnx",
        "onnxruntime==1.32.0",
        "diffusers<0.40",
        "huggingface-hub>=0.34,<1.0",
        "sentencepiece",
        "protobuf",
    ],
)


def ensure_venv(venv: Path, log) -> dict | None:
    """Create `venv` with optimum-onnx unless it has optimum-cli already; None, or {"error": ...}."""
    if (venv / "bin" / "optimum-cli").is_file():
        return None
    log(f"  creating {venv} (torch==2.13.0 first: the local CPU build, then optimum-onnx)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=600)
    for pkgs in VENV_INSTALLS:
        proc = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pkgs],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode:
            return {"error": f"pip install {' '.join(pkgs)} failed: {proc.stderr.strip()[-400:]}"}
    return None


def run_optimum_export(
    arch: str, depth: int, out: Path, desc_file: Path, venv: Path, export_timeout: float, log
) -> dict:
    """Export the SD3 teacher pipeline with optimum-onnx from its venv into out/onnx; the info dict or {"error"}."""
    if arch != "sd3":
        return {"error": "optimum-onnx exports SD3 pipelines, not PixArt"}
    venv = venv.resolve()
    py = venv / "bin" / "python"
    start = time.perf_counter()
    try:
        failed = ensure_venv(venv, log)
        if failed:
            return failed
        pipe_dir = out / "pipeline"
        if not (pipe_dir / "model_index.json").is_file():
            # the teacher pipeline at reduced depth, saved by our diffusers; the venv's diffusers reads it
            proc = subprocess.run(
                child_command("_save_sd3", "--desc", str(desc_file), "--depth", str(depth), "--out", str(pipe_dir)),
                capture_output=True,
                text=True,
                cwd=REPO,
                env=child_env(),
                timeout=1800,
            )
            if proc.returncode:
                return {"error": f"saving the SD3 pipeline failed: {proc.stderr.strip()[-400:]}"}
        proc = subprocess.run(
            [
                str(venv / "bin" / "optimum-cli"),
                "export",
                "onnx",
                "--model",
                str(pipe_dir),
                "--task",
                "text-to-image",
                "--no-post-process",
                str(out / "onnx"),
            ],
            capture_output=True,
            text=True,
            timeout=export_timeout,
        )
        versions = subprocess.run(
            [str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, timeout=120
        ).stdout
        try:
            wanted = {"optimum-onnx", "optimum", "transformers", "diffusers", "torch", "onnx", "onnxruntime"}
            versions = {p["name"]: p["version"] for p in json.loads(versions) if p["name"].lower() in wanted}
        except json.JSONDecodeError:
            versions = {}
        if proc.returncode or not (out / "onnx" / "transformer" / "model.onnx").is_file():
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-4:]
            return {
                "error": f"optimum-cli export failed (exit {proc.returncode}): {' | '.join(tail)[-700:]}",
                "versions": versions,
            }
        return {
            "export_s": round(time.perf_counter() - start, 1),
            "versions": versions,
            "command": "optimum-cli export onnx --model PIPELINE --task text-to-image --no-post-process OUT",
        }
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out: {e.cmd[0] if e.cmd else ''}"}
    except (OSError, subprocess.CalledProcessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def save_sd3_pipeline(desc: dict, depth: int, out: Path) -> None:
    """The SD3 preset's pipeline with `depth` transformer blocks (random weights), saved as a diffusers folder."""
    pipe = archs.pipeline(desc["preset"], num_layers=depth, dual_attention_layers=dual_layers(depth, desc))
    pipe.save_pretrained(out)
    # transformers 5 saves tokenizers as tokenizer.json with the class names T5Tokenizer / CLIPTokenizer; the
    # venv's transformers 4.x maps those names to the sentencepiece / vocab-file classes, whose files are absent.
    # Name the fast classes (which read tokenizer.json) so that optimum can load the pipeline.
    index = json.loads((out / "model_index.json").read_text())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        fast = index[name][1].removesuffix("Fast") + "Fast"
        index[name][1] = fast
        config = out / name / "tokenizer_config.json"
        cfg = json.loads(config.read_text())
        cfg["tokenizer_class"] = fast
        if isinstance(cfg.get("extra_special_tokens"), list):  # v5 writes a list; v4 expects a dict
            cfg.pop("extra_special_tokens")
        config.write_text(json.dumps(cfg, indent=1))
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
