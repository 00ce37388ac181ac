"""The scaling study's results: summaries, ratios (only inside a group of one run), merged reports, the graphs'
multiply-adds, ONNX Runtime profiles by block region, and the outputs: JSON, a log-log plot and the generated
section of docs/benchmarks.md.

numpy only (matplotlib inside `plot`): the parent process and the workers import it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .plan import ARCHS

MARK_BEGIN, MARK_END = "<!-- bench_scaling:begin -->", "<!-- bench_scaling:end -->"


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
        ("@s", "softmax-bound", "EDiT step / attention-free bound: EDiT's own overhead (target ≤ 1.10×)"),
        ("softmax", "softmax-bound", "teacher / attention-free bound: the most any self-attention could save"),
        ("softmax-mha", "@s-mha", "EDiT vs teacher, both as `export` ships them (fused MHA + ORT optimizer)"),
        ("@s", "@s-mha", "fused vs plain export (EDiT): plain time / fused time"),
        ("softmax", "softmax-mha", "fused vs plain export (teacher): plain time / fused time"),
        ("@s-mha", "softmax-bound-mha", "EDiT step / attention-free bound, both fused (target ≤ 1.10×)"),
        ("@s-mha", "@s-r8-mha", "ConvFusion C/8 vs C/4 (fused): r = 4 time / r = 8 time"),
        ("@s-mha", "@s-s4-mha", "compressor stride 4 vs 2 (fused): stride 2 time / stride 4 time"),
        ("@s-r8-s4-mha", "softmax-bound-mha", "EDiT r = 8, stride 4 / attention-free bound (fused; target ≤ 1.10×)"),
        ("@s-r8-mha", "softmax-bound-mha", "EDiT r = 8 / attention-free bound (fused)"),
        ("@s", "@s-int8", "int8 vs fp32 EDiT"),
        ("softmax-int8", "@s-int8", "int8 EDiT vs int8 teacher"),
        ("softmax-mha", "@s-mha-int8", "int8 EDiT vs fp32 teacher, both fused (as export + quantize ship them)"),
        ("@s-int8", "@s-mha-int8", "fused vs plain export (int8 EDiT): plain time / fused time"),
        ("torch-@s", "@s", "ONNX Runtime vs PyTorch eager (EDiT): eager time / ORT time"),
        ("torch-softmax", "torch-@s", "EDiT vs softmax in PyTorch eager"),
        ("optimum", "@s", "EDiT vs optimum-onnx teacher"),
        ("@s", "@s+noarena", "ONNX Runtime CPU arena on vs off (EDiT): time on / time off, memory on / off"),
        ("@s-mha", "@s-mha+noarena", "CPU arena on vs off (EDiT, fused): time on / time off, memory on / off"),
        ("softmax-mha+noarena", "@s-mha+noarena", "EDiT vs teacher, both fused, CPU arena off"),
        ("@s-mha+pattern", "@s-mha", "memory pattern on vs off (EDiT, fused): time on / time off, memory on / off"),
        ("softmax-mha+pattern", "softmax-mha", "memory pattern on vs off (fused teacher): time, memory on / off"),
        ("softmax-bound-mha+pattern", "softmax-bound-mha", "memory pattern on vs off (bound, fused): time, memory"),
        ("softmax-mha+pattern", "@s-mha+pattern", "EDiT vs teacher, both fused, memory pattern on (ORT's default)"),
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
                marker = {"full-depth": "*", "full-depth-noarena": "P", "full-depth-fused": "X"}.get(r["group"], "D")
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


def write_report(report: dict, out_dir: Path, docs_markdown: Path | None = None) -> None:
    """bench_scaling.json and the PNG plot into `out_dir`; the Markdown section into `docs_markdown` between its
    markers (--docs: docs/benchmarks.md), else into benchmarks_section.md beside the JSON."""
    (out_dir / "bench_scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out_dir / "bench_scaling.png")
    section = markdown(report, "bench_scaling.png")
    if docs_markdown is not None:
        write_markdown(docs_markdown, section)
    else:
        (out_dir / "benchmarks_section.md").write_text(section + "\n")
