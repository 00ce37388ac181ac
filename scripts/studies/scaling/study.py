"""The scaling study's measurement (parent process, no torch): the work folder's cached graphs and architecture
descriptions, one group of variants measured in interleaved rounds by worker processes, the failures predicted
instead of run, the machine and its matmul peak, and the report of the run (studies/scaling/report.py renders it).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from .optimum import run_optimum_export
from .plan import ARCHS, tokens
from .process import REPO, child_command, child_env
from .report import graph_macs, ratios, summarize
from .worker import Worker


class Study:
    """One run of the study: the work folder (graphs, architecture descriptions, results, log), the interleaved
    measurement of each group of variants, and the report of what was measured."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.log_file = self.work / "study.log"
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.descs: dict[str, dict] = {}
        self.machine: dict = {}
        self.peak: dict | None = None

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}"
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    # --- architectures ------------------------------------------------------------------------------------------
    def desc_file(self, arch: str) -> Path:
        """The architecture description of `arch` (models.describe, from its preset), made once per work folder
        by a child process (it imports torch; this process does not)."""
        path = self.work / "archs" / f"{arch}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.log(f"describe {arch} (the {ARCHS[arch]['preset']} preset's transformer)")
            subprocess.run(
                child_command("_arch", "--arch", arch, "--out", str(path)),
                check=True,
                capture_output=True,
                cwd=REPO,
                env=child_env(),
                timeout=900,
            )
        return path

    def desc(self, arch: str) -> dict:
        if arch not in self.descs:
            self.descs[arch] = json.loads(self.desc_file(arch).read_text())
        return self.descs[arch]

    def set_text_tokens(self, arch: str, tokens: int) -> None:
        """`--text-tokens`: the prompt length of `arch`'s graphs (as `export --max-text-tokens`), written into its
        description, which every child reads. Graphs are cached by variant and size only, so a work folder holds one
        prompt length: another one is refused."""
        path = self.desc_file(arch)
        desc = json.loads(path.read_text())
        if desc["text_tokens"] != tokens and (self.work / "graphs").is_dir():
            raise SystemExit(
                f"--text-tokens {tokens}: {self.work} holds graphs for {desc['text_tokens']} prompt tokens; "
                "give this prompt length a --work-dir of its own"
            )
        desc["text_tokens"] = tokens
        path.write_text(json.dumps(desc, indent=1))
        self.descs.pop(arch, None)

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
        cmd = child_command(
            "_export",
            "--desc",
            str(self.desc_file(arch)),
            "--res",
            str(res),
            "--depth",
            str(depth),
            "--batch",
            str(batch),
            "--out",
            str(folder),
        )
        if variant in ("softmax", student, "softmax-bound") or variant.endswith("-mha"):
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
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=self.args.export_timeout
        )
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
        info = run_optimum_export(
            arch,
            depth,
            from_dir,
            self.desc_file(arch),
            Path(self.args.optimum_venv),
            self.args.export_timeout,
            self.log,
        )
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
                "tokens": tokens(res, self.desc(arch)),
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
                # multiply-adds of the plain fp32 graph of the same math (MHA / int8 graphs count alike); none for
                # EDiT's configuration variants (edit-r8-mha, edit-sep-mha ...: other math; MHA nodes count nothing)
                if graph_variant in ("softmax", "edit", "mm-edit"):
                    base = path
                elif re.search(r"-(r\d|s\d|sep|nocf)", graph_variant):
                    base = None
                else:
                    base = self.graph(arch, base_variant, res, depth)[0]
                row["macs"] = graph_macs(base)["macs"] if base else None
                spec = {
                    "kind": "ort",
                    "path": str(path),
                    "profile": profile,
                    "profile_dir": str(self.work / "profiles"),
                    "arena": option != "noarena",
                    "mem_pattern": option == "pattern",
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
                desc=self.desc(arch),
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
            growth = tokens(res, self.desc(arch)) / tokens(last["resolution"], self.desc(arch))
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
            "matmul_peak": self.peak,
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


def measure_peak(study: Study) -> dict:
    study.log("matmul peak (fp32, best of 8)")
    proc = subprocess.run(
        child_command("_peak", "--threads", str(study.args.threads), "--repeats", "8"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=600,
    )
    try:
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        peak = {"error": proc.stderr[-500:]}
    study.log(f"  {peak}")
    return peak
