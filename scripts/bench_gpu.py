"""PyTorch EDiT vs softmax attention on a GPU: PixArt-Σ-XL transformer, fp16, eager and torch.compile.

The softmax side is the teacher with diffusers' stock SDPA processor (FlashAttention through
`scaled_dot_product_attention` where the GPU and dtype allow it; the backend actually allowed is recorded); the
EDiT side is `EDiTPixArtTransformer2DModel.from_teacher` of the same teacher (same weights). Both run interleaved
(order alternating per repeat) after warm-up calls, per resolution and mode; a side that runs out of memory is
recorded as "oom". Rows (one per resolution and mode) are printed as JSON lines as soon as they are measured;
--json writes them all, --markdown prints a table for docs/benchmarks.md.

    python scripts/bench_gpu.py --json out/bench_gpu.json --markdown             # H100 / any CUDA GPU
    python scripts/bench_gpu.py --device cpu --quick                            # tiny CPU smoke test of the same code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from studies import archs

from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel

PRESET = "pixart-sigma-xl"  # PixArt-Σ-XL-2: the architecture is the preset's transformer (studies/archs.py)
PROMPT_TOKENS = 300  # T5 prompt tokens PixArt-Σ's pipeline encodes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def xl_config() -> dict:
    return archs.transformer_config(PRESET)


def pixart_xl(resolution: int, depth: int, heads: int | None = None):
    """The preset's transformer with `depth` blocks for `resolution`² images; `heads` (of the preset's head size)
    narrows it for smoke tests."""
    c = xl_config()
    overrides = {"num_layers": depth, "sample_size": resolution // archs.vae_scale_factor(PRESET)}
    if heads is not None:
        overrides.update(num_attention_heads=heads, cross_attention_dim=heads * c["attention_head_dim"])
    return archs.build_transformer(c, **overrides)


def make_inputs(resolution: int, batch: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    c = xl_config()
    latent = resolution // archs.vae_scale_factor(PRESET)
    mask = torch.zeros(batch, PROMPT_TOKENS)
    mask[:, :24] = 1  # the pipeline passes the T5 mask of a short prompt
    return dict(
        hidden_states=torch.randn(batch, c["in_channels"], latent, latent, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, PROMPT_TOKENS, c["caption_channels"], generator=g).to(device, dtype),
        encoder_attention_mask=mask.to(device, dtype),
        timestep=torch.full((batch,), 999, device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


class Timer:
    """Wall time on CPU; CUDA events (after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def is_oom(e: BaseException) -> bool:
    return (
        isinstance(e, torch.cuda.OutOfMemoryError)
        or "out of memory" in str(e).lower()
        or "can't allocate memory" in str(e).lower()
    )


def sdpa_context(backend: str):
    """Restrict SDPA to one backend ("flash", "efficient", "math"), or leave PyTorch's choice ("auto")."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[
            backend
        ]
    )


def bench_resolution(resolution: int, args, device, dtype) -> list[dict]:
    """Both sides at one resolution, for each mode (eager, compile); one row per mode."""
    torch.manual_seed(0)
    teacher = pixart_xl(resolution, args.depth, args.heads)
    student = EDiTPixArtTransformer2DModel.from_teacher(teacher).eval()
    teacher, student = teacher.to(device, dtype), student.to(device, dtype)
    inputs = make_inputs(resolution, args.batch, device, dtype)
    timer = Timer(device)
    rows = []
    for mode in args.modes:
        sides = {"softmax": teacher, "edit": student}
        if mode == "compile":
            sides = {k: torch.compile(m, mode=args.compile_mode, dynamic=False) for k, m in sides.items()}
        row = {
            "resolution": resolution,
            "tokens": (resolution // archs.vae_scale_factor(PRESET) // xl_config()["patch_size"]) ** 2,
            "mode": mode,
            "depth": args.depth,
            "batch": args.batch,
            "dtype": args.dtype,
            "device": str(device),
            "sdpa": args.sdpa,
        }
        times, status, peak = {k: [] for k in sides}, {k: "ok" for k in sides}, {}
        with torch.inference_mode(), sdpa_context(args.sdpa):
            for name, fn in sides.items():  # warm-up (and compilation) per side, with its own memory peak
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    start = time.perf_counter()
                    for _ in range(args.warmup):
                        fn(**inputs)
                    row[f"{name}_warmup_s"] = round(time.perf_counter() - start, 2)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        peak[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                except Exception as e:  # noqa: BLE001 - an OOM is a result
                    status[name] = "oom" if is_oom(e) else f"failed: {type(e).__name__}: {str(e)[:200]}"
            for i in range(args.repeats):
                order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
                for name, fn in order:
                    if status[name] != "ok":
                        continue
                    try:
                        times[name].append(timer(lambda fn=fn: fn(**inputs)))
                    except Exception as e:  # noqa: BLE001
                        status[name] = "oom" if is_oom(e) else f"failed: {type(e).__name__}: {str(e)[:200]}"
        for name in sides:
            row[f"{name}_status"] = status[name]
            if times[name] and status[name] == "ok":
                row[f"{name}_ms"] = round(statistics.median(times[name]), 2)
                row[f"{name}_ms_min"] = round(min(times[name]), 2)
            if name in peak:
                row[f"{name}_peak_gb"] = peak[name]
        if row.get("softmax_ms") and row.get("edit_ms"):
            row["speedup"] = round(row["softmax_ms"] / row["edit_ms"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del sides
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"GPU: {info['device_name']}, torch {info['torch']}, CUDA {info['cuda']}; {info['dtype']}, batch "
        f"{info['batch']}, depth {info['depth']}, SDPA backend {info['sdpa']}.",
        "",
        "| resolution | tokens | mode | softmax ms | EDiT ms | speed-up | softmax peak GB | EDiT peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def cell(side, r=r):
            return str(r.get(f"{side}_ms")) if r.get(f"{side}_status") == "ok" else r.get(f"{side}_status")

        lines.append(
            f"| {r['resolution']}² | {r['tokens']} | {r['mode']} | {cell('softmax')} | {cell('edit')} | "
            f"{str(r['speedup']) + '×' if r.get('speedup') else ''} | {r.get('softmax_peak_gb', '')} | "
            f"{r.get('edit_peak_gb', '')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--resolutions", nargs="+", type=int, default=None, help="default 1024 2048 4096")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default 28, the full PixArt-Σ-XL)")
    p.add_argument("--heads", type=int, default=None, help="attention heads of 72 channels (default 16: XL)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=["eager", "compile"])
    p.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode (default max-autotune-no-cudagraphs)",
    )
    p.add_argument(
        "--sdpa",
        choices=("auto", "flash", "efficient", "math"),
        default="auto",
        help="restrict the softmax side's SDPA backend (default: PyTorch's choice)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="calls per side before timing, compilation included (default 3)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 10)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: defaults of 2 heads (width 144), 1 block, 128² and 256², 2 repeats",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here (use --device cpu for a smoke test)")
    # --quick changes the defaults only: explicit values win
    defaults = (
        dict(heads=2, depth=1, resolutions=[128, 256], repeats=2, warmup=1)
        if args.quick
        else dict(
            heads=xl_config()["num_attention_heads"],
            depth=xl_config()["num_layers"],
            resolutions=[1024, 2048, 4096],
            repeats=10,
            warmup=3,
        )
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and device.type == "cpu":
        args.compile_mode = "default"
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    info = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "batch": args.batch,
        "depth": args.depth,
        "heads": args.heads,
        "sdpa": args.sdpa,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
    }
    print(json.dumps(info), flush=True)
    rows = []
    for resolution in args.resolutions:
        rows += bench_resolution(resolution, args, device, dtype)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        print(markdown(rows, info))
    return rows


if __name__ == "__main__":
    main()
