"""The scaling study's child processes, and the parent side of a measuring worker.

Every child runs as `python -m studies.scaling.worker COMMAND ...` (process.py: scripts/ on PYTHONPATH):
  _arch      describe one architecture (from its preset) into a JSON file
  _export    write one variant's graph (model.onnx + info.json)
  _worker    load one variant, answer "run" with one timed call and "quit" with the peak RSS (and profile)
  _peak      best-of-N fp32 matmul throughput
  _save_sd3  the SD3 teacher pipeline at reduced depth, saved for optimum-onnx (studies/scaling/optimum.py)
`Worker` is the parent's handle on one `_worker` process: start, wait ready, timed calls, RSS watchdog, quit.
This module imports no torch at the top: the parent and the ONNX Runtime workers stay torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .models import ROLE_ALIASES, build_model, describe, timing_inputs, transformer_spec
from .process import REPO, child_command, child_env
from .report import summarize_profile


def read_desc(path: str) -> dict:
    return json.loads(Path(path).read_text())


# ==================================================================================================================
# Children
# ==================================================================================================================
def child_arch(args) -> None:
    """`_arch`: the architecture description (models.describe) of args.arch, written to args.out."""
    Path(args.out).write_text(json.dumps(describe(args.arch), indent=1))


def child_export(args) -> None:
    """`_export`: write one variant's graph into args.out (model.onnx + info.json)."""
    import logging

    from .models import export_fused_variant, optimize_ortopt

    logging.basicConfig(level=logging.WARNING)
    desc = read_desc(args.desc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kind = args.variant
    if kind in ("softmax", "edit", "mm-edit", "softmax-bound"):
        from edit_mobile.export.onnx_export import export_onnx

        model = build_model(desc, kind.removeprefix("softmax-"), args.res, args.depth)
        info = {"parameters": sum(p.numel() for p in model.parameters())}
        export_onnx(transformer_spec(desc, model, args.res, args.batch), out)
    elif kind.endswith("-mha"):  # the fused graph of the same family
        family = kind.removesuffix("-mha")
        info = export_fused_variant(desc, family.removeprefix("softmax-"), args.res, args.depth, args.batch, out)
    elif kind == "softmax-ortopt":
        info = optimize_ortopt(desc, Path(args.src), out)
    elif kind == "int8":
        from edit_mobile.export import quantize_onnx as qo

        info = qo.quantize_dynamic_int8(Path(args.src), out / "model.onnx", qo.QuantOptions())
    else:
        raise SystemExit(f"unknown export kind {kind}")
    info["export_s"] = round(time.perf_counter() - start, 1)
    (out / "info.json").write_text(json.dumps(info, indent=1))


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
    desc = spec["desc"]
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
        feeds = timing_inputs(desc, spec["res"], spec["batch"])
        if spec["kind"] == "ort":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = spec["threads"]
            if spec.get("arena") is False:  # "+noarena" variants: plain malloc / free instead of the BFC arena
                opts.enable_cpu_mem_arena = False
            # as our runtime runs a package (runtime/ort_backend.py): ONNX Runtime's memory pattern off, unless a
            # "+pattern" variant asks for it
            opts.enable_mem_pattern = bool(spec.get("mem_pattern", False))
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
            model = build_model(desc, spec["family"], spec["res"], spec["depth"])
            spec_ = transformer_spec(desc, model, spec["res"], spec["batch"])
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


def child_save_sd3(args) -> None:
    """`_save_sd3`: the SD3 preset pipeline with `depth` transformer blocks, saved as a diffusers folder."""
    from .optimum import save_sd3_pipeline

    save_sd3_pipeline(read_desc(args.desc), args.depth, Path(args.out))


CHILDREN = {
    "_arch": child_arch,
    "_export": child_export,
    "_worker": child_worker,
    "_peak": child_peak,
    "_save_sd3": child_save_sd3,
}


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.scaling.worker")
    p.add_argument("cmd", choices=list(CHILDREN))
    p.add_argument("--arch")
    p.add_argument("--desc", help="the architecture description (JSON file written by _arch)")
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
    CHILDREN[args.cmd](args)


# ==================================================================================================================
# Parent side of one `_worker` process
# ==================================================================================================================
class Worker:
    """Parent side of one worker process: start, wait ready, timed calls, RSS watchdog, quit."""

    def __init__(self, variant: str, spec: dict, mem_limit_gb: float, timeout_s: float):
        import psutil

        self.variant, self.timeout_s, self.limit = variant, timeout_s, mem_limit_gb * 2**30
        self.status, self.message, self.times, self.result = "ok", "", [], {}
        self.killed_for_memory = False
        self.proc = subprocess.Popen(
            child_command("_worker", "--spec", json.dumps(spec)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=child_env(),
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

    def _send(self, command: str) -> bool:
        """Write a command; False (and the worker failed) when it died meanwhile, e.g. killed by the kernel's
        out-of-memory killer while another worker of its group ran."""
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait()
            self._fail(
                "oom" if self.proc.returncode in (-9, 137) else "failed",
                f"worker exited with code {self.proc.returncode} between calls",
            )
            return False
        return True

    def run(self) -> None:
        if not self._send("run"):
            return
        msg = self._read(self.timeout_s)
        if msg:
            self.times.append(msg["ms"])

    def quit(self) -> None:
        if self.alive and self._send("quit"):
            msg = self._read(120)
            if msg:
                self.result.update({k: v for k, v in msg.items() if k != "event"})
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    child_main(sys.argv[1:])
