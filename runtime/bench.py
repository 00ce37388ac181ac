"""The bench protocol for artifact packages: one protocol for every backend (numpy + the backend, no torch).

`bench_package(PKG, BenchOptions(...))` measures, in this order and in one process:
  1. cold load: the sha256 check of the package, then each component's backend creation (session creation), timed
     one by one in manifest order;
  2. end to end: the text-to-image loop (`Text2ImagePipeline`, S steps, classifier-free guidance as the package's
     family does it) K times untimed, then N times timed. Every backend call inside the loop is timed too, so
     each run also gives the sum of component times, the runtime overhead (end-to-end minus that sum: tokenizers,
     scheduler, guidance, casts, Python) and each denoising step's transformer time;
  3. per component: K warm-up and N timed calls of every component, round-robin over the components (so slow
     drift of the machine's load spreads over all of them), on the inputs the loop actually fed it (recorded in
     the first loop run; the VAE encoder gets the decoded image);
  4. peak resident memory of the process (getrusage), package size on disk, machine description;
  5. with `memory_phases`: one image in each memory mode (`generate --memory default|low`), each in a fresh
     process, with the peak resident memory of every phase (creating the sessions, text encoding, denoising,
     decoding; Linux: the high-water mark is reset at each phase) and the low / default ratio of the peaks.
Latencies are reported as median, p10, p90 (numpy's linear percentiles), mean, min, max over the N samples.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import backend_class, backend_for_target, component_backend
from .errors import UserError
from .io_specs import to_numpy_dtype
from .ort_backend import check_arena
from .package import Package, installed_version, load_package

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon"


@dataclass(frozen=True)
class BenchOptions:
    backend: str | None = None  # None: the package target's (ONNX Runtime, Core ML, ExecuTorch)
    runs: int = 5  # timed samples per component and end to end (N)
    warmup: int = 1  # untimed calls before them (K)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default, one per physical core)
    steps: int = 20  # denoising steps of the end-to-end loop (S)
    e2e_runs: int | None = None  # timed end-to-end runs (default: runs)
    prompt: str = DEFAULT_PROMPT
    guidance: float | None = None  # None: the family's diffusers default (CFG on)
    seed: int = 0
    memory_phases: bool = False  # also profile memory per phase in both memory modes (two more images)
    cpu_arena: bool = True  # ONNX Runtime's CPU memory arena (runtime/ort_backend.py)
    shared_arena: bool = False  # one CPU arena for every component's session instead of one each
    mem_pattern: bool = False  # ONNX Runtime's pre-planned activation buffers (runtime/ort_backend.py)
    size: str | None = None  # image size "WxH" of a multi-size package (None: its default size)

    def check(self) -> None:
        if self.backend is not None:
            backend_class(self.backend)  # UserError naming the registered backends
        if self.runs < 1:
            raise UserError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.e2e_runs is not None and self.e2e_runs < 1:
            raise UserError(f"--e2e-runs must be >= 1, got {self.e2e_runs}")
        check_arena(self.cpu_arena, self.shared_arena)


def summarize(samples_ms: list[float]) -> dict:
    """median / p10 / p90 / mean / min / max of latency samples in milliseconds (p10 <= median <= p90)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return {
        "median_ms": round(float(med), 3),
        "p10_ms": round(float(p10), 3),
        "p90_ms": round(float(p90), 3),
        "mean_ms": round(float(a.mean()), 3),
        "min_ms": round(float(a.min()), 3),
        "max_ms": round(float(a.max()), 3),
        "runs": int(a.size),
    }


class TimedBackend:
    """Wraps a backend: times every `run` call; records the first inputs / outputs it sees (`capture`)."""

    def __init__(self, backend):
        self.backend = backend
        self.input_specs = backend.input_specs
        self.output_names = backend.output_names
        self.times_ms: list[float] = []
        self.capture = True
        self.calls: list[dict] = []  # recorded inputs while capturing
        self.first_output: dict | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.backend.run(inputs)
        self.times_ms.append((time.perf_counter() - start) * 1e3)
        if self.capture:
            self.calls.append(dict(inputs))
            if self.first_output is None:
                self.first_output = out
        return out


# --- process and machine ------------------------------------------------------------------------------------------
def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MB (None where the platform does not say).

    Linux: VmHWM, the high-water mark of this process image's memory. getrusage's ru_maxrss is kept across
    fork + exec, so a process started by a large parent would report at least the parent's RSS."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return round(psutil.Process().memory_info().peak_wset / 2**20, 1)
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    rss = _proc_status_mb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux: "5" to /proc/self/clear_refs); False where
    the platform has no such reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


MEMORY_PHASES = ("load", "text_encoding", "denoising", "decoding")


def phase_memory(package_dir: str, memory: str, options: BenchOptions) -> dict:
    """One image in memory mode `memory` in this process: {phase: peak RSS MB during it, or None where the peak
    cannot be reset}, plus "peak_rss_mb" (the process's whole-run peak) and "baseline_mb" (before loading)."""
    from .pipeline import Text2ImagePipeline

    out: dict = {"baseline_mb": current_rss_mb()}
    resettable = reset_peak_rss()
    current = ["load"]

    def phase(name: str) -> None:
        out[current[0]] = _proc_status_mb("VmHWM") if resettable else None
        if resettable:
            reset_peak_rss()
        current[0] = name

    kw = {
        "backend": options.backend,
        "threads": options.threads,
        "progress": False,
        "cpu_arena": options.cpu_arena,
        "shared_arena": options.shared_arena,
    }
    package = load_package(package_dir).at_size(options.size)
    pipe = Text2ImagePipeline(package, memory=memory, mem_pattern=options.mem_pattern, **kw)
    pipe(options.prompt, steps=options.steps, guidance=options.guidance, seed=options.seed, phase=phase)
    out["peak_rss_mb"] = max((out[p] for p in MEMORY_PHASES if out.get(p) is not None), default=peak_rss_mb())
    return out


def memory_phases(package_dir: str | Path, options: BenchOptions) -> dict:
    """`phase_memory` for both modes, each in a fresh process (memory a process has freed is not always returned
    to the system, so one process cannot measure the second mode fairly), and the low / default peak ratio."""
    import multiprocessing

    from .pipeline import MEMORY_MODES

    context = multiprocessing.get_context("spawn")  # a clean interpreter: nothing loaded but the runtime
    report = {}
    for mode in MEMORY_MODES:
        with context.Pool(1) as pool:
            report[mode] = pool.apply(phase_memory, (str(package_dir), mode, options))
    report["low_vs_default_peak"] = round(report["low"]["peak_rss_mb"] / report["default"]["peak_rss_mb"], 3)
    return report


def _proc_status_mb(field: str) -> float | None:
    """A memory field of Linux's /proc/self/status (given in kB), in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def folder_size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or platform.processor()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, the threads the benchmark used, OS, library versions, load average."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads if threads is not None else "default (ONNX Runtime: one per physical core)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: installed_version(name)
            for name in ("edit-mobile", "numpy", "onnxruntime", "coremltools", "tokenizers")
        },
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- the protocol -------------------------------------------------------------------------------------------------
def _fallback_inputs(specs, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        dtype = to_numpy_dtype(s.dtype)
        shape = tuple(int(d) for d in s.shape)
        out[s.name] = (
            rng.standard_normal(shape).astype(dtype)
            if np.issubdtype(dtype, np.floating)
            else np.zeros(shape, dtype=dtype)
        )
    return out


def _component_inputs(
    name: str, timed: dict[str, TimedBackend], pkg: Package, steps: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Realistic inputs of one component: what the loop fed it (transformer: a call of the middle step)."""
    t = timed[name]
    if t.calls:
        if name == "transformer":
            per_step = max(len(t.calls) // steps, 1)
            return t.calls[(steps // 2) * per_step]
        return t.calls[-1]  # text encoders: the conditional prompt (CFG encodes the negative prompt first)
    if name == "vae_encoder" and timed.get("vae_decoder") is not None and timed["vae_decoder"].first_output:
        image = next(iter(timed["vae_decoder"].first_output.values()))
        spec = pkg.input_specs(name)[0]
        return {spec.name: np.ascontiguousarray(image, dtype=to_numpy_dtype(spec.dtype))}
    return _fallback_inputs(pkg.input_specs(name), rng)


def bench_package(package_dir: str | Path, options: BenchOptions = BenchOptions(), progress=None) -> dict:
    """Run the protocol on the package in `package_dir`; returns the report (see the module docstring).

    `progress`: optional callable(str) told what is being measured."""
    from .pipeline import Text2ImagePipeline

    options.check()
    say = progress or (lambda msg: None)
    loadavg_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    whole = load_package(package_dir, verify=True)  # UserError on a missing / broken package
    pkg = whole.at_size(options.size)  # ... or a size it lacks
    verify_s = time.perf_counter() - start
    # backends without these settings (Core ML) ignore them
    kw = {
        "threads": options.threads,
        "mem_pattern": options.mem_pattern,
        "cpu_arena": options.cpu_arena,
        "shared_arena": options.shared_arena,
    }

    # 1. cold load, one component at a time
    timed: dict[str, TimedBackend] = {}
    load_s: dict[str, float] = {}
    for name in pkg.components:
        say(f"loading {name}")
        start = time.perf_counter()
        backend = component_backend(pkg, name, options.backend, **kw)
        load_s[name] = time.perf_counter() - start
        timed[name] = TimedBackend(backend)
    rss_after_load = current_rss_mb()

    # 2. end to end
    pipe = Text2ImagePipeline(
        pkg,
        backend=options.backend,
        progress=False,
        backends=timed,  # the loop takes the components it runs (the family's text encoders, transformer, decoder)
        **kw,
    )
    guidance = pipe.family_spec.default_guidance if options.guidance is None else float(options.guidance)
    e2e_runs = options.e2e_runs or options.runs
    e2e, overhead, in_loop, step_ms = [], [], [], []
    transformer_calls = 0
    for i in range(options.warmup + e2e_runs):
        timed_run = i >= options.warmup
        say(f"end to end {'run' if timed_run else 'warm-up'} {i + 1 - options.warmup if timed_run else i + 1}")
        marks = {n: len(t.times_ms) for n, t in timed.items()}
        start = time.perf_counter()
        pipe(options.prompt, steps=options.steps, guidance=guidance, seed=options.seed)
        wall = (time.perf_counter() - start) * 1e3
        for t in timed.values():
            t.capture = False  # the first run's inputs are the ones kept
        calls = {n: t.times_ms[marks[n] :] for n, t in timed.items()}
        transformer_calls = len(calls["transformer"])
        if timed_run:
            components_ms = sum(sum(c) for c in calls.values())
            e2e.append(wall)
            in_loop.append(components_ms)
            overhead.append(wall - components_ms)
            per_step = max(transformer_calls // options.steps, 1)
            tr = calls["transformer"]
            step_ms += [sum(tr[j : j + per_step]) for j in range(0, len(tr), per_step)]

    # 3. per component, round-robin
    rng = np.random.default_rng(options.seed)
    inputs = {name: _component_inputs(name, timed, pkg, options.steps, rng) for name in timed}
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(options.warmup + options.runs):
        say(
            f"components {'run' if i >= options.warmup else 'warm-up'} "
            f"{i + 1 - options.warmup if i >= options.warmup else i + 1}"
        )
        for name, t in timed.items():
            start = time.perf_counter()
            t.backend.run(inputs[name])
            if i >= options.warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)

    # 4. report
    calls_per_image = {name: 0 for name in timed}
    for name in calls_per_image:
        n = len(timed[name].times_ms)  # every loop run calls each component equally often
        calls_per_image[name] = n // (options.warmup + e2e_runs)
    components = {}
    for name, comp in pkg.components.items():
        components[name] = {
            **summarize(samples[name]),
            "load_s": round(load_s[name], 3),
            "size_mb": folder_size_mb(pkg.root / comp.entry.folder),
            "precision": comp.precision,
            "calls_per_image": calls_per_image[name],
        }
    e2e_summary = {**summarize(e2e), "steps": options.steps}
    overhead_ms = float(np.median(overhead))
    return {
        "package": {
            "path": str(pkg.root),
            "family": pkg.family,
            "architecture": pkg.architecture,
            "target": pkg.target,
            "resolution": list(pkg.resolution),
            "sizes": whole.sizes,
            "batch": pkg.batch,
            "latent_shape": list(pkg.latent_shape),
        },
        "protocol": {
            **asdict(options),
            "backend": options.backend or backend_for_target(pkg.target),
            "e2e_runs": e2e_runs,
            "guidance": guidance,
            "cfg": guidance > 1.0,
            "transformer_calls_per_step": max(transformer_calls // options.steps, 1),
        },
        "machine": {**machine_info(options.threads), "loadavg_before": loadavg_before},
        "verify_s": round(verify_s, 3),
        "load_s": round(sum(load_s.values()), 3),
        "components": components,
        "transformer_step": summarize(step_ms),
        "end_to_end": e2e_summary,
        "components_in_loop_ms": round(float(np.median(in_loop)), 3),
        "overhead_ms": round(overhead_ms, 3),
        "overhead_pct": round(100.0 * overhead_ms / e2e_summary["median_ms"], 3),
        "overhead": summarize(overhead),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "size_mb": folder_size_mb(pkg.root),
        "memory_phases": memory_phases(package_dir, options) if options.memory_phases else None,
    }


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    p, m = report["package"], report["machine"]
    lines = [
        f"package   {p['path']}  ({p['family']}, {p['architecture']}, {p['target']}, "
        f"size {p['resolution'][1]}x{p['resolution'][0]} of {', '.join(p['sizes'])}, batch {p['batch']})",
        f"machine   {m['cpu']}, {m['logical_cores']} logical cores, threads {m['threads']}, "
        f"onnxruntime {m['versions']['onnxruntime']}, load average {_loadavg(m.get('loadavg'))}",
        f"protocol  backend {report['protocol']['backend']}, {report['protocol']['warmup']} warm-up + "
        f"{report['protocol']['runs']} runs per component, {report['protocol']['e2e_runs']} end-to-end runs of "
        f"{report['end_to_end']['steps']} steps",
        "",
        f"{'component':<16}{'load s':>9}{'median ms':>12}{'p10 ms':>11}{'p90 ms':>11}{'calls/img':>11}"
        f"{'size MB':>10}  precision",
    ]
    for name, c in report["components"].items():
        lines.append(
            f"{name:<16}{c['load_s']:>9.2f}{c['median_ms']:>12.1f}{c['p10_ms']:>11.1f}{c['p90_ms']:>11.1f}"
            f"{c['calls_per_image']:>11d}{c['size_mb']:>10.1f}  {c['precision']}"
        )
    ts, e = report["transformer_step"], report["end_to_end"]
    lines += [
        f"{'transformer/step':<16}{'':>9}{ts['median_ms']:>12.1f}{ts['p10_ms']:>11.1f}{ts['p90_ms']:>11.1f}",
        f"{'end to end':<16}{report['load_s']:>9.2f}{e['median_ms']:>12.1f}{e['p10_ms']:>11.1f}{e['p90_ms']:>11.1f}",
        "",
        f"runtime overhead {report['overhead_ms']:.1f} ms ({report['overhead_pct']:.2f} % of end to end); "
        f"peak RSS {report['peak_rss_mb']} MB; package {report['size_mb']:.1f} MB on disk; "
        f"sha256 check {report['verify_s']:.2f} s",
    ]
    phases = report.get("memory_phases")
    if phases:
        lines += ["", f"{'peak RSS MB':<16}" + "".join(f"{p:>15}" for p in (*MEMORY_PHASES, "whole run"))]
        for mode in ("default", "low"):
            values = [phases[mode].get(p) for p in (*MEMORY_PHASES, "peak_rss_mb")]
            lines.append(f"{'--memory ' + mode:<16}" + "".join(f"{'n/a' if v is None else v:>15}" for v in values))
        lines.append(f"low / default peak: {phases['low_vs_default_peak']}")
    return "\n".join(lines)


def _loadavg(values) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "n/a"
