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

    python scripts/bench_scaling.py --quick             # PixArt-XL width, 1 layer, 256² and 512², a few minutes
    python scripts/bench_scaling.py --docs              # the full study, results into docs/
    python scripts/bench_scaling.py --docs --with-optimum
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
MARK_BEGIN, MARK_END = "<!-- bench_scaling:begin -->", "<!-- bench_scaling:end -->"

# True-width architectures (the `pixart-sigma-xl` and `sd35-medium` presets' transformers).
ARCHS = {
    "pixart": {
        "title": "PixArt-Σ-XL",
        "heads": 16,
        "head_dim": 72,
        "latent_channels": 4,
        "out_channels": 8,
        "caption_channels": 4096,
        "text_tokens": 300,
        "full_depth": 28,
        "timestep": 999.0,
        "student": "edit",
    },
    "sd3": {
        "title": "SD3.5-Medium",
        "heads": 24,
        "head_dim": 64,
        "latent_channels": 16,
        "out_channels": 16,
        "joint_dim": 4096,
        "text_tokens": 77 + 256,
        "pooled": 2048,
        "full_depth": 24,
        "full_dual": 13,
        "timestep": 500.0,
        "student": "mm-edit",
    },
}
VAE_FACTOR, PATCH = 8, 2
GROUPS = {
    "attention": ["softmax", "softmax-mha", "softmax-ortopt", "@student", "@student-mha"],
    "int8": ["@student", "@student-int8", "softmax-int8"],
    "torch": ["@student", "torch-@student", "torch-softmax"],
    "optimum": ["softmax", "optimum", "@student"],
    # ONNX Runtime's CPU memory arena (BFC, on by default) vs plain malloc / free: the peak-memory question
    "arena": ["@student", "@student+noarena"],
}
ALL_GROUPS = ["attention", "int8", "torch", "optimum", "arena", "full-depth", "full-depth-noarena"]


def tokens(res: int) -> int:
    return (res // VAE_FACTOR // PATCH) ** 2


def sd3_dual_layers(depth: int) -> tuple[int, ...]:
    """SD3.5-M has dual attention in its first 13 of 24 blocks: keep that share at reduced depth."""
    return tuple(range(max(1, round(depth * 13 / 24)))) if depth < 24 else tuple(range(13))


# ==================================================================================================================
# Models and export (run in child processes: they import torch)
# ==================================================================================================================
def build_model(arch: str, family: str, res: int, depth: int, seed: int = 0):
    """The teacher (family "softmax") or its conversion (family "edit" / "mm-edit"), random weights, eval mode."""
    import torch
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    a = ARCHS[arch]
    sample = res // VAE_FACTOR
    if arch == "pixart":
        teacher = PixArtTransformer2DModel(
            num_attention_heads=a["heads"],
            attention_head_dim=a["head_dim"],
            in_channels=a["latent_channels"],
            out_channels=a["out_channels"],
            num_layers=depth,
            cross_attention_dim=a["heads"] * a["head_dim"],
            caption_channels=a["caption_channels"],
            sample_size=sample,
            attention_bias=True,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
            interpolation_scale=max(sample // 64, 1),
        ).eval()
        if family == "edit":
            from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel

            return EDiTPixArtTransformer2DModel.from_teacher(teacher).eval()
        return teacher
    teacher = SD3Transformer2DModel(
        sample_size=sample,
        patch_size=PATCH,
        in_channels=a["latent_channels"],
        out_channels=a["out_channels"],
        num_layers=depth,
        attention_head_dim=a["head_dim"],
        num_attention_heads=a["heads"],
        joint_attention_dim=a["joint_dim"],
        caption_projection_dim=a["heads"] * a["head_dim"],
        pooled_projection_dim=a["pooled"],
        pos_embed_max_size=384,
        dual_attention_layers=sd3_dual_layers(depth),
        qk_norm="rms_norm",
    ).eval()
    if family == "mm-edit":
        from edit_mobile.models.mm_edit_sd3 import MMEDiTSD3Transformer2DModel

        return MMEDiTSD3Transformer2DModel.from_teacher(teacher).eval()
    return teacher


def transformer_spec(arch: str, model, res: int, batch: int):
    """The export spec of the transformer component (docs/package.md), for this resolution and batch."""
    from edit_mobile.export.components import ComponentSpec, PixArtTransformer, SD3Transformer, TensorSpec

    a, h = ARCHS[arch], res // VAE_FACTOR

    def f32(name, *shape):
        return TensorSpec(name, tuple(shape), "float32")

    if arch == "pixart":
        return ComponentSpec(
            "transformer",
            PixArtTransformer(model),
            [
                f32("sample", batch, a["latent_channels"], h, h),
                f32("timestep", batch),
                f32("encoder_hidden_states", batch, a["text_tokens"], a["caption_channels"]),
                f32("encoder_attention_mask", batch, a["text_tokens"]),
            ],
            [f32("out_sample", batch, a["out_channels"], h, h)],
        )
    return ComponentSpec(
        "transformer",
        SD3Transformer(model),
        [
            f32("sample", batch, a["latent_channels"], h, h),
            f32("timestep", batch),
            f32("encoder_hidden_states", batch, a["text_tokens"], a["joint_dim"]),
            f32("pooled_projections", batch, a["pooled"]),
        ],
        [f32("out_sample", batch, a["out_channels"], h, h)],
    )


def timing_inputs(arch: str, res: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs by role: a noisy latent, a mid-schedule timestep, prompt embeddings (PixArt: the T5 mask
    of a 24-token prompt, as the pipeline passes it)."""
    a, h = ARCHS[arch], res // VAE_FACTOR
    rng = np.random.default_rng(seed)
    out = {
        "sample": rng.standard_normal((batch, a["latent_channels"], h, h), dtype=np.float32),
        "timestep": np.full((batch,), a["timestep"], dtype=np.float32),
    }
    if arch == "pixart":
        out["encoder_hidden_states"] = rng.standard_normal(
            (batch, a["text_tokens"], a["caption_channels"]), dtype=np.float32
        )
        mask = np.zeros((batch, a["text_tokens"]), dtype=np.float32)
        mask[:, :24] = 1.0
        out["encoder_attention_mask"] = mask
    else:
        out["encoder_hidden_states"] = rng.standard_normal((batch, a["text_tokens"], a["joint_dim"]), dtype=np.float32)
        out["pooled_projections"] = rng.standard_normal((batch, a["pooled"]), dtype=np.float32)
    return out


ROLE_ALIASES = {"hidden_states": "sample"}  # optimum's input names


# --- the fused-attention teacher: every attention as com.microsoft.MultiHeadAttention --------------------------------
def _mha_function():
    import torch
    import torch.nn.functional as F

    class OrtMultiHeadAttention(torch.autograd.Function):
        """SDPA in PyTorch; ONNX Runtime's fused MultiHeadAttention (q, k, v as (B, S, C)) in the exported graph.

        `keep` (B, L) int32 (1 = attend) is MHA's key_padding_mask; MHA adds mask_filter_value (-10000, the same
        as diffusers' attention bias) to masked scores. MHA's optional `bias` input (3C) is passed as zeros because
        the TorchScript exporter cannot leave an optional input empty."""

        @staticmethod
        def forward(ctx, q, k, v, keep, heads: int):
            b, s, c = q.shape

            def split(x):
                return x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)

            bias = None if keep is None else (1.0 - keep.to(q.dtype))[:, None, None, :] * -10000.0
            y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
            return y.transpose(1, 2).reshape(b, s, c)

        @staticmethod
        def symbolic(g, q, k, v, keep, heads: int):
            inputs = [q, k, v]
            if keep is not None and not keep.node().mustBeNone():
                c = q.type().sizes()[-1]
                inputs += [g.op("Constant", value_t=torch.zeros(3 * c)), keep]
            y = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads)
            y.setType(q.type())
            return y

    return OrtMultiHeadAttention


class MHAExportProcessor:
    """A diffusers attention processor (self-, cross- and SD3 joint attention) that computes exactly what
    AttnProcessor2_0 / JointAttnProcessor2_0 compute, with the attention itself as one fused MHA call."""

    def __init__(self):
        self.mha = _mha_function()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, grid_size=None
    ):  # grid_size: what EDiT blocks pass to every attention; unused here
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def qk_norm(x, norm):  # SD3's RMSNorm over each head's channels, on the (B, S, C) layout
            if norm is None:
                return x
            s, c = x.shape[1], x.shape[2]
            return norm(x.reshape(b, s, heads, c // heads)).reshape(b, s, c)

        q = qk_norm(attn.to_q(hidden_states), attn.norm_q)
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:  # SD3: one softmax over [image; prompt] tokens
            k = qk_norm(attn.to_k(hidden_states), attn.norm_k)
            v = attn.to_v(hidden_states)
            qp = qk_norm(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)
            kp = qk_norm(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)
            vp = attn.add_v_proj(encoder_hidden_states)
            y = self.mha.apply(torch_cat(q, qp), torch_cat(k, kp), torch_cat(v, vp), None, heads)
            y_img, y_txt = y[:, :n], y[:, n:]
            out = attn.to_out[1](attn.to_out[0](y_img))
            if attn.context_pre_only:
                return out, encoder_hidden_states
            return out, attn.to_add_out(y_txt)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = qk_norm(attn.to_k(context), attn.norm_k)
        v = attn.to_v(context)
        keep = None
        if attention_mask is not None:  # PixArt: (B, 1, L) additive bias, 0 = keep, -10000 = masked
            keep = (attention_mask.reshape(b, -1) > -1.0).int()
        y = self.mha.apply(q, k, v, keep, heads)
        return attn.to_out[1](attn.to_out[0](y))


def torch_cat(a, b):
    import torch

    return torch.cat([a, b], dim=1)


def export_mha(arch: str, family: str, res: int, depth: int, batch: int, out_dir: Path) -> dict:
    """The teacher ("softmax") with every attention as fused MHA, or EDiT ("edit") with its softmax
    cross-attention as fused MHA, then ONNX Runtime's basic folding and transformer optimizer."""
    import warnings

    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = build_model(arch, family, res, depth)
    if family == "softmax":
        model.set_attn_processor(MHAExportProcessor())
    elif arch == "pixart":  # EDiT: the self-attention stays linear, the prompt cross-attention becomes MHA
        for block in model.transformer_blocks:
            block.attn2.set_processor(MHAExportProcessor())
    else:
        raise ValueError("MM-EDiT's softmax terms live inside its processor: no MHA form")
    spec = transformer_spec(arch, model, res, batch)
    example = tuple(torch.from_numpy(v) for v in timing_inputs(arch, res, batch, seed=1).values())
    raw, folded, final = out_dir / "raw.onnx", out_dir / "folded.onnx", out_dir / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = spec.module(*example).numpy()
        torch.onnx.export(
            spec.module.eval(),
            example,
            str(raw),
            input_names=[s.name for s in spec.inputs],
            output_names=[s.name for s in spec.outputs],
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets={"com.microsoft": 1},
        )
    # As our exporter does: the tracer turns equal constants (a fresh EDiT's GroupNorm weights in every block)
    # into Identity nodes that ONNX Runtime's optimizer then drops while later nodes still read them.
    from edit_mobile.export.onnx_export import inline_initializer_identities

    proto = onnx.load(str(raw))
    inline_initializer_identities(proto)
    onnx.save_model(proto, str(raw))
    del proto
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    fusion = FusionOptions("bert")
    # The bert-mode simplified-LayerNorm fusion crashes on the EDiT GroupNorm pattern; LayerNorm fusion itself is
    # done by ONNX Runtime's session optimizer anyway. Kept off for every graph, teacher or student.
    fusion.enable_layer_norm = False
    a = ARCHS[arch]
    optimized = optimize_model(
        str(folded),
        model_type="bert",
        num_heads=a["heads"],
        hidden_size=a["heads"] * a["head_dim"],
        optimization_options=fusion,
        opt_level=0,
    )
    optimized.save_model_to_file(str(final))
    raw.unlink()
    folded.unlink()
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    got = session.run(None, timing_inputs(arch, res, batch, seed=1))[0]
    mha = sum(n.op_type == "MultiHeadAttention" for n in onnx.load(str(final), load_external_data=False).graph.node)
    return {
        "fusions": stats,
        "multi_head_attention_nodes": mha,
        "onnx_vs_torch_max_abs": float(np.abs(got - ref).max()),
    }


def optimize_ortopt(src: Path, arch: str, out_dir: Path) -> dict:
    """Our teacher graph through ONNX Runtime's transformer optimizer in the mode made for this architecture."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    a = ARCHS[arch]
    mode = "mmdit" if arch == "sd3" else "bert"
    fusion = FusionOptions(mode)
    fusion.enable_layer_norm = False
    optimized = optimize_model(
        str(src),
        model_type=mode,
        num_heads=a["heads"],
        hidden_size=a["heads"] * a["head_dim"],
        optimization_options=fusion,
        opt_level=0,
    )
    optimized.save_model_to_file(str(out_dir / "model.onnx"))
    ops = [n.op_type for n in onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph.node]
    return {
        "mode": mode,
        "fusions": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
        "multi_head_attention_nodes": ops.count("MultiHeadAttention"),
    }


def child_export(args) -> None:
    """`_export`: write one variant's graph into args.out (model.onnx + info.json)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kind = args.variant
    if kind in ("softmax", "edit", "mm-edit"):
        from edit_mobile.export.onnx_export import export_onnx

        model = build_model(args.arch, kind, args.res, args.depth)
        info = {"parameters": sum(p.numel() for p in model.parameters())}
        export_onnx(transformer_spec(args.arch, model, args.res, args.batch), out)
    elif kind in ("softmax-mha", "edit-mha"):
        info = export_mha(args.arch, kind[: -len("-mha")], args.res, args.depth, args.batch, out)
    elif kind == "softmax-ortopt":
        info = optimize_ortopt(Path(args.src), args.arch, out)
    elif kind == "int8":
        from edit_mobile.export import quantize_onnx as qo

        info = qo.quantize_dynamic_int8(Path(args.src), out / "model.onnx", qo.Int8Options())
    else:
        raise SystemExit(f"unknown export kind {kind}")
    info["export_s"] = round(time.perf_counter() - start, 1)
    (out / "info.json").write_text(json.dumps(info, indent=1))


# ==================================================================================================================
# Multiply-adds of a graph (static shapes recorded by the exporter's shape inference)
# ==================================================================================================================
def graph_macs(path: Path) -> dict:
    """Multiply-adds of every MatMul / Gemm / Conv / MultiHeadAttention node of an ONNX graph, from its static
    shapes: {"macs": int, "uncounted": [op types whose shapes were unknown]}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    shapes = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    macs, uncounted = 0, []
    for n in g.node:
        try:
            if n.op_type in ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger"):
                attrs = {a.name: a.i for a in n.attribute}
                a_shape, out_shape = shapes[n.input[0]], shapes[n.output[0]]
                k = a_shape[-2] if attrs.get("transA") else a_shape[-1]
                macs += int(np.prod(out_shape)) * k
            elif n.op_type == "Conv":
                macs += int(np.prod(shapes[n.output[0]])) * int(np.prod(shapes[n.input[1]][1:]))
            elif n.op_type == "MultiHeadAttention":
                q, k = shapes[n.input[0]], shapes[n.input[1]]
                macs += 2 * q[0] * q[1] * k[1] * q[2]
        except KeyError:
            uncounted.append(n.op_type)
    return {"macs": macs, "uncounted": sorted(set(uncounted))}


# ==================================================================================================================
# Workers: one process per measured variant
# ==================================================================================================================
def _peak_rss_mb() -> float:
    """Peak RSS of this process image. Linux keeps getrusage's ru_maxrss across fork + exec, so a worker
    started from a parent that holds 1.5 GB would report at least 1.5 GB: read VmHWM (the high-water mark of
    this process's own memory map, new at exec) instead."""
    from edit_mobile.runtime.bench import peak_rss_mb

    return peak_rss_mb()


def _is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, MemoryError) or any(
        s in text for s in ("bad_alloc", "failed to allocate", "can't allocate", "out of memory", "cannot allocate")
    )


def child_worker(args) -> None:
    """`_worker`: load one variant, then answer "run" with one timed call and "quit" with the peak RSS."""
    spec = json.loads(args.spec)
    # Replies go to the real stdout; anything a library prints (to Python's or C's stdout) goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    if spec.get("mem_limit_gb"):
        import resource

        limit = int(spec["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        start = time.perf_counter()
        feeds = timing_inputs(spec["arch"], spec["res"], spec["batch"])
        if spec["kind"] == "ort":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = spec["threads"]
            if spec.get("arena") is False:  # "+noarena" variants: plain malloc / free instead of the BFC arena
                opts.enable_cpu_mem_arena = False
            for key, value in (spec.get("session_config") or {}).items():  # what the runtime applies to a package
                opts.add_session_config_entry(key, value)
            if spec.get("profile"):
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(spec["profile_dir"]) / "profile")
            session = ort.InferenceSession(spec["path"], opts, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            feeds = {name: feeds[ROLE_ALIASES.get(name, name)] for name in names}

            def call():
                session.run(None, feeds)
        else:
            import torch

            torch.set_num_threads(spec["threads"])
            model = build_model(spec["arch"], spec["family"], spec["res"], spec["depth"])
            spec_ = transformer_spec(spec["arch"], model, spec["res"], spec["batch"])
            tensors = [torch.from_numpy(feeds[s.name]) for s in spec_.inputs]

            def call():
                with torch.inference_mode():
                    spec_.module(*tensors)

        reply(event="ready", load_s=round(time.perf_counter() - start, 3), rss_mb=_peak_rss_mb())
    except BaseException as e:  # noqa: BLE001 - every failure is a recorded result
        reply(event="error", status="oom" if _is_oom(e) else "failed", message=f"{type(e).__name__}: {e}"[:500])
        return
    runs = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            try:
                t0 = time.perf_counter()
                call()
                runs += 1
                reply(event="done", ms=(time.perf_counter() - t0) * 1e3)
            except BaseException as e:  # noqa: BLE001
                reply(event="error", status="oom" if _is_oom(e) else "failed", message=f"{type(e).__name__}: {e}"[:500])
                return
        elif cmd == "quit":
            result = {"peak_rss_mb": _peak_rss_mb()}
            if spec["kind"] == "ort" and spec.get("profile"):
                result["profile"] = summarize_profile(session.end_profiling(), runs)
            reply(event="bye", **result)
            return


def summarize_profile(path: str, runs: int) -> dict:
    """Per-op-type and per-region kernel time (ms per call) from an ONNX Runtime profile."""
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    by_op, by_region = {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op, name, dur = e["args"].get("op_name", "?"), e["name"], e["dur"] / 1e3 / max(runs, 1)
        by_op[op] = by_op.get(op, 0.0) + dur
        region = node_region(name)
        by_region[region] = by_region.get(region, 0.0) + dur
    total = sum(by_op.values())
    top = dict(sorted(((k, round(v, 1)) for k, v in by_op.items()), key=lambda kv: -kv[1])[:12])
    return {
        "kernel_ms_per_call": round(total, 1),
        "by_op_ms": top,
        "by_region_ms": dict(sorted(((k, round(v, 1)) for k, v in by_region.items()), key=lambda kv: -kv[1])),
    }


def node_region(name: str) -> str:
    """Which part of a DiT block a profiled node belongs to (from the exporter's module-path node names)."""
    for key, region in (
        ("conv_fusion", "self-attn: ConvFusion"),
        ("compressor", "self-attn: K/V compressors"),
        ("/attn1/to_", "self-attn: projections"),
        ("/attn/to_", "joint attn: projections"),
        ("/attn/add_", "joint attn: projections"),
        ("/attn2/to_", "attn2: projections"),
        ("/attn1/", "self-attn: attention core"),
        ("/attn/", "joint attn: attention core"),
        ("/attn2/", "attn2: attention core"),
        ("/ff", "MLP"),
        ("caption_projection", "caption projection"),
        ("context_embedder", "caption projection"),
        ("adaln_single", "timestep embedding"),
        ("time_text_embed", "timestep embedding"),
        ("pos_embed", "patchify / unpatchify"),
        ("proj_out", "patchify / unpatchify"),
        ("norm_out", "patchify / unpatchify"),
        ("transformer_blocks", "norms, modulation, residuals"),
        ("norm", "norms, modulation, residuals"),
    ):
        if key in name:
            return region
    return "other (fused / renamed nodes)"


class Worker:
    """Parent side of one worker process: start, wait ready, timed calls, RSS watchdog, quit."""

    def __init__(self, variant: str, spec: dict, mem_limit_gb: float, timeout_s: float):
        import psutil

        self.variant, self.timeout_s, self.limit = variant, timeout_s, mem_limit_gb * 2**30
        self.status, self.message, self.times, self.result = "ok", "", [], {}
        self.killed_for_memory = False
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "_worker", "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        self._ps = psutil.Process(self.proc.pid)
        self.max_rss = 0.0
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()

    def _watchdog(self):
        while self.proc.poll() is None:
            try:
                rss = self._ps.memory_info().rss
            except Exception:  # noqa: BLE001 - the process ended between poll and read
                return
            self.max_rss = max(self.max_rss, rss)
            if rss > self.limit:
                self.killed_for_memory = True
                self.proc.kill()
                return
            time.sleep(0.2)

    def _read(self, timeout: float) -> dict | None:
        box = {}

        def read():
            box["line"] = self.proc.stdout.readline()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.proc.kill()
            self._fail("timeout", f"no answer within {timeout:.0f} s")
            return None
        line = box.get("line", "")
        if not line:
            self.proc.wait()
            if self.killed_for_memory:
                self._fail("oom", f"RSS above the {self.limit / 2**30:.0f} GB limit: killed by the watchdog")
            else:
                self._fail(
                    "oom" if self.proc.returncode in (-9, 137) else "failed",
                    f"worker exited with code {self.proc.returncode}",
                )
            return None
        msg = json.loads(line)
        if msg.get("event") == "error":
            self._fail(msg["status"], msg["message"])
            self.proc.wait()
            return None
        return msg

    def _fail(self, status: str, message: str):
        if self.status == "ok":
            self.status, self.message = status, message

    @property
    def alive(self) -> bool:
        return self.status == "ok"

    def ready(self) -> None:
        msg = self._read(self.timeout_s)
        if msg:
            self.result["load_s"] = msg["load_s"]

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        msg = self._read(self.timeout_s)
        if msg:
            self.times.append(msg["ms"])

    def quit(self) -> None:
        if self.alive:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            msg = self._read(120)
            if msg:
                self.result.update({k: v for k, v in msg.items() if k != "event"})
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ==================================================================================================================
# The study (parent process: no torch)
# ==================================================================================================================
class Study:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.log_file = self.work / "study.log"
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}"
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    # --- graphs -------------------------------------------------------------------------------------------------
    def graph(self, arch: str, variant: str, res: int, depth: int) -> tuple[Path | None, dict]:
        """model.onnx of an ONNX variant (exported once, cached), or (None, {"error": ...})."""
        batch = self.args.batch
        student = ARCHS[arch]["student"]
        key = f"{arch}-{variant}-d{depth}-r{res}-b{batch}"
        folder = self.work / "graphs" / key
        if (folder / "info.json").is_file():
            return folder / "model.onnx", json.loads((folder / "info.json").read_text())
        if (folder / "error.json").is_file() and not self.args.retry_failed:
            return None, json.loads((folder / "error.json").read_text())
        cmd = [
            sys.executable,
            str(SCRIPT),
            "_export",
            "--arch",
            arch,
            "--res",
            str(res),
            "--depth",
            str(depth),
            "--batch",
            str(batch),
            "--out",
            str(folder),
        ]
        if variant in ("softmax", student, "softmax-mha", "edit-mha"):
            cmd += ["--variant", variant]
        elif variant == "softmax-ortopt":
            src, info = self.graph(arch, "softmax", res, depth)
            if src is None:
                return None, info
            cmd += ["--variant", "softmax-ortopt", "--src", str(src)]
        elif variant.endswith("-int8"):
            src, info = self.graph(arch, variant[: -len("-int8")], res, depth)
            if src is None:
                return None, info
            cmd += ["--variant", "int8", "--src", str(src)]
        elif variant == "optimum":
            return self.optimum_graph(arch, res, depth)
        else:
            raise ValueError(variant)
        self.log(f"export {key}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=self.args.export_timeout)
        if proc.returncode != 0 or not (folder / "info.json").is_file():
            tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()][-3:]
            info = {"error": f"export failed (exit {proc.returncode}): {' | '.join(tail)[-600:]}"}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.json").write_text(json.dumps(info))
            self.log(f"  {info['error']}")
            return None, info
        self.log(f"  exported in {time.perf_counter() - start:.0f} s")
        return folder / "model.onnx", json.loads((folder / "info.json").read_text())

    def optimum_graph(self, arch: str, res: int, depth: int) -> tuple[Path | None, dict]:
        from_dir = self.work / "optimum" / f"{arch}-d{depth}"
        model = from_dir / "onnx" / "transformer" / "model.onnx"
        if model.is_file():
            return model, json.loads((from_dir / "info.json").read_text())
        if (from_dir / "error.json").is_file() and not self.args.retry_failed:
            return None, json.loads((from_dir / "error.json").read_text())
        self.log(f"optimum-onnx export of the {arch} teacher (depth {depth}) in its own virtual environment")
        info = run_optimum_export(self, arch, res, depth, from_dir)
        if "error" in info:
            from_dir.mkdir(parents=True, exist_ok=True)
            (from_dir / "error.json").write_text(json.dumps(info))
            self.log(f"  {info['error']}")
            return None, info
        (from_dir / "info.json").write_text(json.dumps(info))
        return model, info

    # --- measurement --------------------------------------------------------------------------------------------
    def measure_group(
        self,
        arch: str,
        group: str,
        variants: list[str],
        res: int,
        depth: int,
        warmup: int,
        runs: int,
        profile: bool = False,
        call_timeout: float | None = None,
    ) -> list[dict]:
        """Interleaved rounds over the group's variants, each in its own worker process."""
        rows, workers = {}, {}
        for v in variants:
            row = {
                "arch": arch,
                "group": group,
                "variant": v,
                "resolution": res,
                "tokens": tokens(res),
                "depth": depth,
                "batch": self.args.batch,
                "threads": self.args.threads,
                "warmup": warmup,
            }
            rows[v] = row
            skip = self.predicted_failure(arch, v, res, depth)
            if skip:
                row.update(status=skip[0], message=skip[1])
                self.log(f"  {v}: {skip[0]} ({skip[1]})")
                continue
            family = v.replace("torch-", "") if v.startswith("torch-") else None
            if family:
                spec = {"kind": "torch", "family": family}
                base, info = self.graph(arch, family, res, depth)  # for the multiply-add count only
                row["macs"] = graph_macs(base)["macs"] if base else None
            else:
                graph_variant, _, option = v.partition("+")
                path, info = self.graph(arch, graph_variant, res, depth)
                if path is None:
                    row.update(status="failed", message=info.get("error", "export failed"))
                    continue
                row["graph"] = info
                row["size_mb"] = round(sum(f.stat().st_size for f in path.parent.glob("model.onnx*")) / 2**20, 1)
                base_variant = "softmax" if v.startswith("softmax") or v == "optimum" else ARCHS[arch]["student"]
                # multiply-adds of the plain fp32 graph of the same math (MHA / int8 graphs count alike)
                base = (
                    path
                    if graph_variant in ("softmax", "edit", "mm-edit")
                    else self.graph(arch, base_variant, res, depth)[0]
                )
                row["macs"] = graph_macs(base)["macs"] if base else None
                spec = {
                    "kind": "ort",
                    "path": str(path),
                    "profile": profile,
                    "profile_dir": str(self.work / "profiles"),
                    "arena": option != "noarena",
                }
                if graph_variant.endswith("-int8"):
                    # the session options `edit-mobile quantize` records for int8-dynamic components (the package
                    # manifest's `ort_session_config`, applied by runtime/backends.py)
                    from edit_mobile.export.quantize_onnx import WEIGHT_DQ_SESSION_CONFIG

                    spec["session_config"] = dict(WEIGHT_DQ_SESSION_CONFIG)
                    row["session_config"] = spec["session_config"]
                (self.work / "profiles").mkdir(exist_ok=True)
            spec.update(
                arch=arch,
                res=res,
                depth=depth,
                batch=self.args.batch,
                threads=self.args.threads,
                mem_limit_gb=self.args.mem_limit_gb,
            )
            self.log(f"load {arch} {v} {res}² depth {depth}")
            w = Worker(v, spec, self.args.mem_limit_gb, call_timeout or self.args.call_timeout)
            w.ready()
            workers[v] = w
            if not w.alive:
                self.log(f"  {v}: {w.status} ({w.message})")
        order = [v for v in variants if v in workers]
        if not order:
            self.results += list(rows.values())
            self.save()
            return list(rows.values())
        load_before = os.getloadavg()
        for r in range(warmup + runs):
            k = r % max(len(order), 1)
            for v in order[k:] + order[:k]:  # rotate the order every round
                w = workers[v]
                if not w.alive:
                    continue
                w.run()
                if not w.alive:
                    self.log(f"  {v}: {w.status} ({w.message})")
                elif r < warmup:
                    rows[v]["first_call_ms"] = round(w.times[-1], 1)
            done = {v: f"{workers[v].times[-1] / 1e3:.2f}s" for v in order if workers[v].alive}
            self.log(f"  round {r + 1}/{warmup + runs}: {done}")
        for v, w in workers.items():
            w.quit()
            row = rows[v]
            row["status"], row["message"] = w.status, w.message
            row["load_s"] = w.result.get("load_s")
            row["peak_rss_mb"] = w.result.get("peak_rss_mb") or round(w.max_rss / 2**20, 1)
            if w.status != "ok":
                row["peak_rss_mb_watchdog"] = round(w.max_rss / 2**20, 1)
            timed = w.times[warmup:]
            if w.status == "ok" and timed:
                row.update(summarize(timed))
                row["times_ms"] = [round(t, 1) for t in timed]
                if row.get("macs"):
                    row["gflops"] = round(2 * row["macs"] / (row["median_ms"] / 1e3) / 1e9, 1)
            if "profile" in w.result:
                row["profile"] = w.result["profile"]
        load_after = os.getloadavg()
        for row in rows.values():
            row["loadavg"] = [round(x, 2) for x in (*load_before, *load_after)]
        out = list(rows.values())
        self.results += out
        self.save()
        return out

    def predicted_failure(self, arch: str, variant: str, res: int, depth: int) -> tuple[str, str] | None:
        """Skip a variant that already ran out of memory / time at a lower resolution, or whose call time,
        extrapolated from the largest lower resolution (quadratic in tokens for softmax attention, linear
        otherwise), exceeds the call timeout: recorded as that status, with the reason."""
        earlier = [
            r
            for r in self.results
            if (r["arch"], r["variant"], r["depth"]) == (arch, variant, depth) and r["resolution"] < res
        ]
        if not earlier:
            return None
        last = max(earlier, key=lambda r: r["resolution"])
        if last.get("status") in ("oom", "timeout"):
            return last["status"], f"predicted: {last['status']} already at {last['resolution']}²"
        if last.get("median_ms"):
            growth = tokens(res) / tokens(last["resolution"])
            if variant.startswith(("softmax", "torch-softmax", "optimum")):
                growth **= 2
            estimate = last["median_ms"] / 1e3 * growth
            if estimate > self.args.call_timeout:
                return "timeout", (
                    f"predicted: ~{estimate:.0f} s per call extrapolated from "
                    f"{last['resolution']}² exceeds the {self.args.call_timeout:.0f} s call timeout"
                )
            # An export runs the model too (the fused-MHA export three times: trace, PyTorch reference, check).
            graph_variant = variant.partition("+")[0]
            key = f"{arch}-{graph_variant}-d{depth}-r{res}-b{self.args.batch}"
            passes = 3 if graph_variant.endswith("-mha") else 1
            if (
                not variant.startswith("torch-")
                and not (self.work / "graphs" / key / "info.json").is_file()
                and estimate * (1 + passes) > self.args.call_timeout
            ):
                return "timeout", (
                    f"predicted: exporting and running it ~{estimate * (1 + passes):.0f} s "
                    f"(~{estimate:.0f} s per model pass, extrapolated from {last['resolution']}²) "
                    f"exceeds the {self.args.call_timeout:.0f} s call timeout"
                )
        return None

    def save(self) -> None:
        (self.work / "results.json").write_text(json.dumps(self.report(), indent=1))

    def report(self) -> dict:
        run = {
            "command": " ".join(["python", "scripts/bench_scaling.py", *sys.argv[1:]]),
            "machine": self.machine,
            "matmul_peak": getattr(self, "peak", None),
            "args": vars(self.args),
            "started": self.started,
        }
        results = [dict(r, run=run["started"]) for r in self.results]
        return {
            "machine": self.machine,
            "matmul_peak": run["matmul_peak"],
            "args": run["args"],
            "command": run["command"],
            "runs": [run],
            "results": results,
            "ratios": ratios(results),
        }


def summarize(samples: list[float]) -> dict:
    a = np.asarray(samples)
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return {
        "median_ms": round(float(med), 1),
        "p10_ms": round(float(p10), 1),
        "p90_ms": round(float(p90), 1),
        "min_ms": round(float(a.min()), 1),
        "runs": len(samples),
    }


def ratios(results: list[dict]) -> list[dict]:
    """Speed and memory ratios between variants measured in the same group (same rounds, same run)."""
    out = []
    pairs = [
        ("softmax", "@s", "EDiT vs softmax teacher (our export)"),
        ("softmax-mha", "@s", "EDiT vs fused-MHA teacher (peer form)"),
        ("softmax-ortopt", "@s", "EDiT vs ORT-optimizer teacher"),
        ("softmax-mha", "@s-mha", "EDiT vs teacher, both in peer form (fused MHA + ORT optimizer)"),
        ("@s", "@s-int8", "int8 vs fp32 EDiT"),
        ("softmax-int8", "@s-int8", "int8 EDiT vs int8 teacher"),
        ("torch-@s", "@s", "ONNX Runtime vs PyTorch eager (EDiT): eager time / ORT time"),
        ("torch-softmax", "torch-@s", "EDiT vs softmax in PyTorch eager"),
        ("optimum", "@s", "EDiT vs optimum-onnx teacher"),
        ("@s", "@s+noarena", "ONNX Runtime CPU arena on vs off (EDiT): time on / time off, memory on / off"),
    ]
    keyed = {}
    for r in results:
        keyed.setdefault((r["arch"], r["resolution"], r["depth"], r["group"], r.get("run")), {})[r["variant"]] = r
    for (arch, res, depth, group, _), rows in keyed.items():
        s = ARCHS[arch]["student"]
        for slow, fast, what in pairs:
            slow, fast = slow.replace("@s", s), fast.replace("@s", s)
            if slow not in rows or fast not in rows:
                continue
            a, b = rows[slow], rows[fast]
            entry = {
                "arch": arch,
                "resolution": res,
                "depth": depth,
                "group": group,
                "what": what,
                "slow": slow,
                "fast": fast,
            }
            if a.get("median_ms") and b.get("median_ms"):
                entry["speedup"] = round(a["median_ms"] / b["median_ms"], 2)
                entry["speedup_min"] = round(a["min_ms"] / b["min_ms"], 2)
            elif b.get("median_ms"):
                entry["speedup"] = None
                entry["note"] = f"{slow}: {a.get('status')}"
            if a.get("peak_rss_mb") and b.get("peak_rss_mb") and a.get("status") == "ok":
                entry["memory_ratio"] = round(a["peak_rss_mb"] / b["peak_rss_mb"], 2)
            out.append(entry)
    # int8 student vs fp32 teacher: chained through the fp32 student, the anchor measured in both groups of the run
    for (arch, res, depth, group, run), rows in keyed.items():
        s = ARCHS[arch]["student"]
        int8 = keyed.get((arch, res, depth, "int8", run), {})
        if group != "attention" or not all(int8.get(v, {}).get("median_ms") for v in (s, f"{s}-int8")):
            continue
        for teacher, form in (("softmax", "our export"), ("softmax-mha", "fused-MHA peer form")):
            if not all(rows.get(v, {}).get("median_ms") for v in (teacher, s)):
                continue
            chained = (rows[teacher]["median_ms"] / rows[s]["median_ms"]) * (
                int8[s]["median_ms"] / int8[f"{s}-int8"]["median_ms"]
            )
            out.append(
                {
                    "arch": arch,
                    "resolution": res,
                    "depth": depth,
                    "group": "attention × int8",
                    "what": f"int8 EDiT vs fp32 teacher ({form}), chained through the fp32 EDiT measured in "
                    "both groups",
                    "slow": teacher,
                    "fast": f"{s}-int8",
                    "speedup": round(chained, 2),
                }
            )
    return out


# ==================================================================================================================
# Machine and matmul peak
# ==================================================================================================================
def machine_description(threads: int) -> dict:
    from edit_mobile.runtime.bench import cpu_model, physical_cores
    from edit_mobile.runtime.package import installed_version

    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_gb": mem,
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {n: installed_version(n) for n in ("onnxruntime", "torch", "numpy", "diffusers", "onnx")},
        "loadavg_start": list(os.getloadavg()),
    }


def child_peak(args) -> None:
    """`_peak`: best-of-N fp32 matmul throughput (GFLOP/s) on `threads` threads: ONNX Runtime's MatMul (the kernel
    the graphs use), PyTorch and numpy; 4096 x 1152 @ 1152 x 4608 (the PixArt-XL MLP at 1024²)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(args.threads)
    m, k, n = 4096, 1152, 4608
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(b, "B")],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fns = {"onnxruntime": lambda: session.run(None, {"A": a}), "torch": lambda: ta @ tb, "numpy": lambda: a @ b}
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    flop = 2 * m * k * n
    gflops = {name: round(flop / t / 1e9, 1) for name, t in best.items()}
    print(
        json.dumps(
            {
                "shape": [m, k, n],
                "threads": args.threads,
                "gflops_best": gflops,
                "peak_gflops": max(gflops.values()),
                "loadavg": list(os.getloadavg()),
            }
        )
    )


def measure_peak(study: Study) -> dict:
    study.log("matmul peak (fp32, best of 8)")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "_peak", "--threads", str(study.args.threads), "--repeats", "8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    try:
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        peak = {"error": proc.stderr[-500:]}
    study.log(f"  {peak}")
    return peak


# ==================================================================================================================
# optimum-onnx in its own virtual environment (--with-optimum)
# ==================================================================================================================
def run_optimum_export(study: Study, arch: str, res: int, depth: int, out: Path) -> dict:
    """Export the SD3 teacher pipeline with optimum-onnx (which pins older transformers / diffusers) from a venv."""
    if arch != "sd3":
        return {"error": "optimum-onnx exports SD3 pipelines, not PixArt"}
    venv = Path(study.args.optimum_venv).resolve()
    py = venv / "bin" / "python"
    start = time.perf_counter()
    try:
        if not (venv / "bin" / "optimum-cli").is_file():
            study.log(f"  creating {venv} (torch==2.13.0 first: the local CPU build, then optimum-onnx)")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=600)
            # torch first (the local 2.13.0 CPU build, not a CUDA download); optimum-onnx pins transformers < 4.58,
            # which needs huggingface-hub < 1.0, hence diffusers < 0.40 (newer diffusers pull hub 1.x)
            for pkgs in (
                ["torch==2.13.0"],
                [
                    "optimum-onnx",
                    "onnxruntime==1.32.0",
                    "diffusers<0.40",
                    "huggingface-hub>=0.34,<1.0",
                    "sentencepiece",
                    "protobuf",
                ],
            ):
                proc = subprocess.run(
                    [str(py), "-m", "pip", "install", "-q", *pkgs], capture_output=True, text=True, timeout=1800
                )
                if proc.returncode:
                    return {"error": f"pip install {' '.join(pkgs)} failed: {proc.stderr.strip()[-400:]}"}
        pipe_dir = out / "pipeline"
        if not (pipe_dir / "model_index.json").is_file():
            # the teacher pipeline at reduced depth, saved by our diffusers; the venv's diffusers reads it
            proc = subprocess.run(
                [sys.executable, str(SCRIPT), "_save_sd3", "--depth", str(depth), "--out", str(pipe_dir)],
                capture_output=True,
                text=True,
                cwd=REPO,
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
            timeout=study.args.export_timeout,
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


def child_save_sd3(args) -> None:
    """`_save_sd3`: the sd35-medium preset pipeline with `depth` transformer blocks, saved as a diffusers folder."""
    from edit_mobile.models.presets import sd3_pipeline

    pipe = sd3_pipeline(
        heads=24,
        head_dim=64,
        layers=args.depth,
        dual_layers=sd3_dual_layers(args.depth),
        sample_size=128,
        pos_embed_max_size=384,
        clip_widths=(768, 1280),
        clip_layers=2,
        clip_heads=(12, 20),
        t5_width=4096,
        t5_layers=1,
        t5_heads=64,
        t5_ff=10240,
        vae_blocks=(128, 256, 512, 512),
        vae_layers=2,
        vae_groups=32,
        seed=0,
    )
    pipe.save_pretrained(args.out)
    # transformers 5 saves tokenizers as tokenizer.json with the class names T5Tokenizer / CLIPTokenizer; the
    # venv's transformers 4.x maps those names to the sentencepiece / vocab-file classes, whose files are absent.
    # Name the fast classes (which read tokenizer.json) so that optimum can load the pipeline.
    out = Path(args.out)
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


# ==================================================================================================================
# Plan, output
# ==================================================================================================================
def plan(args) -> list[dict]:
    """The measured points: (arch, resolution, depth, group, warm-up, runs)."""
    steps = []
    student_groups = [g for g in ("attention", "int8") if g in args.groups and (g != "int8" or args.int8)]

    def add(arch, res, depth, group, warmup=None, runs=None):
        student = ARCHS[arch]["student"]
        variants = [v.replace("@student", student) for v in GROUPS[group]]
        if arch == "pixart":
            variants = [v for v in variants if v != "softmax-ortopt"]  # pixart: no attention fusion exists
        else:
            variants = [v for v in variants if v != "mm-edit-mha"]  # its softmax terms are inside its processor
        if res >= 2048:
            # Memory: the workers of a group are alive together; at 2048² an EDiT worker holds ~6 GB, so the group
            # keeps one EDiT graph per precision (the fused-cross-attention EDiT is measured up to 1024²).
            variants = [v for v in variants if v != f"{student}-mha"]
            runs = args.runs_large if runs is None else runs
        if res >= 4096:  # minutes per call: one cold call each; the fp32 EDiT is not repeated in the int8 group
            warmup, runs = 0, 1
            if group == "int8":
                variants = [v for v in variants if v != student]
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
                add(arch, res, depth, group)
            if "torch" in args.groups and args.torch and res in args.torch_resolutions and arch in args.torch_archs:
                add(arch, res, depth, "torch")
            if "optimum" in args.groups and arch == "sd3" and args.with_optimum and res == args.optimum_resolution:
                add(arch, res, depth, "optimum")
    if "arena" in args.groups and "pixart" in args.archs:
        for res in args.arena_resolutions:
            add("pixart", res, depth, "arena")
    if args.full_depth_2048 and "pixart" in args.archs:
        # The complete 28-block PixArt-Σ-XL EDiT at 2048²: one cold call each (its time and its peak memory),
        # with ONNX Runtime's default CPU arena and without it, one after the other (~8 GB each).
        for group, variant in (("full-depth", "edit"), ("full-depth-noarena", "edit+noarena")):
            if group not in args.groups:
                continue
            steps.append(
                {
                    "arch": "pixart",
                    "res": 2048,
                    "depth": ARCHS["pixart"]["full_depth"],
                    "group": group,
                    "variants": [variant],
                    "warmup": 0,
                    "runs": 1,
                    "call_timeout": 3 * args.call_timeout,
                }
            )
    return steps


def merge_reports(old: dict, new: dict) -> dict:
    """`new` plus the rows of `old` whose (arch, resolution, depth, group) `new` did not measure."""
    measured = {(r["arch"], r["resolution"], r["depth"], r["group"]) for r in new["results"]}
    kept = [r for r in old["results"] if (r["arch"], r["resolution"], r["depth"], r["group"]) not in measured]
    runs = old.get("runs") or [
        {
            "command": old.get("command"),
            "machine": old.get("machine"),
            "matmul_peak": old.get("matmul_peak"),
            "args": old.get("args"),
            "started": None,
        }
    ]
    used = {r.get("run") for r in kept}
    runs = [r for r in runs if r.get("started") in used] + new["runs"]
    results = kept + new["results"]
    return {**new, "runs": runs, "results": results, "ratios": ratios(results)}


def row_label(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "?")
    return f"{r['median_ms'] / 1e3:.2f}" + (" (cold)" if r.get("warmup") == 0 else "")


def markdown(report: dict, plot_name: str | None) -> str:
    """The generated section of docs/benchmarks.md."""
    m = report["machine"]
    res_rows = [r for r in report["results"]]
    runs = report.get("runs") or [
        {"command": report["command"], "machine": m, "matmul_peak": report.get("matmul_peak"), "started": None}
    ]
    peaks = {run.get("started"): (run.get("matmul_peak") or {}).get("peak_gflops") for run in runs}
    lines = [
        MARK_BEGIN,
        "<!-- generated by scripts/bench_scaling.py: edit outside the markers -->",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m.get('physical_cores')} physical), "
        f"{m.get('memory_gb')} GB; {m['threads']} threads; onnxruntime {m['versions']['onnxruntime']}, "
        f"torch {m['versions']['torch']}, {m['platform']}. The machine is shared: every ratio below comes from "
        "variants measured interleaved in the same rounds of one run; each row's load average (before / after "
        "its rounds) is in the JSON.",
        "",
    ]
    for run in runs:
        mm, peak = run.get("machine") or {}, run.get("matmul_peak") or {}
        text = (
            f"- Run{' ' + run['started'] if run.get('started') else ''}: `{run['command']}`; load average at start "
            + " / ".join(f"{x:.1f}" for x in mm.get("loadavg_start", []))
            + " (1 / 5 / 15 min)"
        )
        if mm.get("loadavg_end"):
            text += ", at end " + " / ".join(f"{x:.1f}" for x in mm["loadavg_end"])
        if peak.get("gflops_best"):
            text += (
                f"; fp32 matmul peak ({peak['shape'][0]}x{peak['shape'][1]} @ {peak['shape'][1]}x"
                f"{peak['shape'][2]}, best of 8, {peak['threads']} threads): "
                + ", ".join(f"{k} {v:.0f}" for k, v in peak["gflops_best"].items())
                + f" GFLOP/s (GFLOP/s percentages are against {peak['peak_gflops']:.0f})"
            )
        lines.append(text + ".")
    lines += [
        "",
        "### Transformer call latency and peak memory (batch 1, fp32 unless int8)",
        "",
        "| arch | res | tokens | depth | group | variant | median s | p10–p90 s | peak RSS MB | GFLOP/s "
        "(% of peak) | graph MB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res_rows:
        ok = r.get("status") == "ok"
        pk = peaks.get(r.get("run")) or (report.get("matmul_peak") or {}).get("peak_gflops")
        spread = f"{r['p10_ms'] / 1e3:.2f}–{r['p90_ms'] / 1e3:.2f}" if ok else ""
        gf = ""
        if ok and r.get("gflops"):
            gf = f"{r['gflops']:.0f}" + (f" ({100 * r['gflops'] / pk:.0f} %)" if pk else "")
        status = "ok" if ok else f"**{r.get('status')}**: {r.get('message', '')[:140]}"
        mem = r.get("peak_rss_mb")
        lines.append(
            f"| {ARCHS[r['arch']]['title']} | {r['resolution']}² | {r['tokens']} | {r['depth']} | "
            f"{r['group']} | {r['variant']} | {row_label(r) if ok else ''} | {spread} | "
            f"{mem if mem else ''} | {gf} | {r.get('size_mb', '')} | {status} |"
        )
    lines += [
        "",
        "### Ratios (same group, same rounds)",
        "",
        "| arch | res | depth | comparison | speed-up (median) | speed-up (min) | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in report["ratios"]:
        sp = f"{q['speedup']:.2f}×" if q.get("speedup") else (q.get("note") or "")
        lines.append(
            f"| {ARCHS[q['arch']]['title']} | {q['resolution']}² | {q['depth']} | {q['what']} | {sp} | "
            f"{str(q.get('speedup_min', '')) + ('×' if q.get('speedup_min') else '')} | "
            f"{str(q.get('memory_ratio', '')) + ('×' if q.get('memory_ratio') else '')} |"
        )
    profiled = [r for r in res_rows if r.get("profile")]
    if profiled:
        lines += ["", "### Where the time goes (ONNX Runtime profile, kernel ms per call, by block region)", ""]
        for r in profiled:
            p = r["profile"]
            regions = ", ".join(f"{k} {v:.0f}" for k, v in p["by_region_ms"].items())
            ops = ", ".join(f"{k} {v:.0f}" for k, v in list(p["by_op_ms"].items())[:6])
            lines.append(
                f"- {ARCHS[r['arch']]['title']} {r['resolution']}² d{r['depth']} **{r['variant']}** "
                f"({p['kernel_ms_per_call']:.0f} ms): {regions}. Top ops: {ops}."
            )
    if plot_name:
        lines += ["", f"![latency and memory vs tokens]({plot_name})"]
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["group"] in ("attention", "int8", "torch", "optimum")]
    archs = sorted({r["arch"] for r in rows}, key=list(ARCHS).index)
    if not archs:
        return
    fig, axes = plt.subplots(len(archs), 2, figsize=(12, 4.6 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        series, failed = {}, {}
        for r in rows:
            if r["arch"] != arch:
                continue
            key = (r["variant"], r["depth"])
            # one point per (variant, resolution): the first group that measured it
            series.setdefault(key, {}).setdefault(r["tokens"], r)
        for (variant, depth), pts in sorted(series.items()):
            xs = sorted(pts)
            ok = [x for x in xs if pts[x].get("status") == "ok"]
            label = f"{variant} (depth {depth})"
            style = "-" if not variant.startswith("torch") else ":"
            marker = "o" if "int8" not in variant else "s"
            line = axes[i][0].plot(ok, [pts[x]["median_ms"] / 1e3 for x in ok], style, marker=marker, label=label)[0]
            # a failed call's memory is where it stopped, not a peak: only completed calls are plotted
            with_rss = [x for x in ok if pts[x].get("peak_rss_mb")]
            axes[i][1].plot(
                with_rss,
                [pts[x]["peak_rss_mb"] / 1024 for x in with_rss],
                style,
                marker=marker,
                color=line.get_color(),
                label=label,
            )
            for x in xs:
                if pts[x].get("status") not in ("ok", None):
                    failed.setdefault(pts[x]["resolution"], set()).add(f"{variant} {pts[x]['status']}")
        if failed:  # one box listing the calls that did not complete, per resolution
            text = "\n".join(f"{res}²: " + ", ".join(sorted(v)) for res, v in sorted(failed.items()))
            axes[i][0].text(
                0.98,
                0.02,
                text,
                transform=axes[i][0].transAxes,
                fontsize=7,
                ha="right",
                va="bottom",
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
            )
        for r in report["results"]:  # the full-depth call(s): one star each
            if r["arch"] == arch and r["group"].startswith("full-depth") and r.get("status") == "ok":
                label = f"{r['variant']} (depth {r['depth']}, cold call)"
                marker = "*" if r["group"] == "full-depth" else "P"
                axes[i][0].plot([r["tokens"]], [r["median_ms"] / 1e3], marker, ms=11, color="black", label=label)
                axes[i][1].plot([r["tokens"]], [r["peak_rss_mb"] / 1024], marker, ms=11, color="black", label=label)
        title = ARCHS[arch]["title"]
        axes[i][0].set(
            xscale="log",
            yscale="log",
            xlabel="image tokens",
            ylabel="seconds per transformer call",
            title=f"{title}: latency (ONNX Runtime CPU, {report['machine']['threads']} threads)",
        )
        axes[i][1].set(
            xscale="log",
            yscale="log",
            xlabel="image tokens",
            ylabel="peak RSS (GB)",
            title=f"{title}: peak memory of the process",
        )
        limit = report["args"]["mem_limit_gb"]
        axes[i][1].axhline(limit, color="grey", ls="--", lw=0.8)
        axes[i][1].text(axes[i][1].get_xlim()[0], limit, f" limit {limit:.0f} GB", va="bottom", fontsize=8)
        for ax in axes[i]:
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        help="PixArt resolutions of the arena group (default 2048)",
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
        dest="full_depth_2048",
        action="store_false",
        help="skip the 28-layer PixArt-Σ-XL EDiT call at 2048²",
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


def write_report(report: dict, out_dir: Path, docs: bool) -> None:
    """bench_scaling.json, the PNG plot, and the Markdown section: into docs/benchmarks.md with --docs, else into
    benchmarks_section.md beside the JSON."""
    (out_dir / "bench_scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out_dir / "bench_scaling.png")
    section = markdown(report, "bench_scaling.png")
    if docs:
        write_markdown(REPO / "docs" / "benchmarks.md", section)
    else:
        (out_dir / "benchmarks_section.md").write_text(section + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_export", "_worker", "_peak", "_save_sd3"):
        return child_main(argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.archs, args.int8 = ["pixart"], args.int8 and "--no-int8" not in argv
    if args.render_only:
        out_dir = REPO / "docs" if args.docs else Path(args.work_dir).resolve()
        report = json.loads((out_dir / "bench_scaling.json").read_text())
        report["ratios"] = ratios(report["results"])
        write_report(report, out_dir, args.docs)
        return report
    study = Study(args)
    study.machine = machine_description(args.threads)
    study.log(f"machine: {study.machine}")
    study.peak = measure_peak(study)
    steps = plan(args)
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
    out_dir = REPO / "docs" if args.docs else study.work
    if args.merge and (out_dir / "bench_scaling.json").is_file():
        report = merge_reports(json.loads((out_dir / "bench_scaling.json").read_text()), report)
    write_report(report, out_dir, args.docs)
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


def child_main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--arch")
    p.add_argument("--variant")
    p.add_argument("--res", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--src")
    p.add_argument("--spec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    {"_export": child_export, "_worker": child_worker, "_peak": child_peak, "_save_sd3": child_save_sd3}[args.cmd](args)
    return {}


if __name__ == "__main__":
    main()
