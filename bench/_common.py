"""Shared by the bench scripts: timing stats, peak memory of a worker process, RESULTS.md rows."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nOne row per case per run, appended by the bench/ scripts. "
          "Times are medians (p20-p80) in ms; memory is the peak above the inputs, in MB.\n\n"
          "| date | commit | bench | machine | device | case | result |\n"
          "| --- | --- | --- | --- | --- | --- | --- |\n")


def stats(ms):
    """(median, p20, p80) of a list of times in ms."""
    s = sorted(ms)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
    return statistics.median(s), q[0], q[3]


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores{load}"


def device_name(device):
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {_triton_version()})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True,
                             text=True, timeout=10)
        # the code a row measures: kernels, engine, C++ ops and benches (not RESULTS.md, which they write)
        code = [":/kernels", ":/srlm_engine", ":/csrc", ":/bench", ":(top,exclude)bench/RESULTS.md"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *code], cwd=RESULTS.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_rows(bench, device, rows):
    """rows: [(case, result)] -> appended to RESULTS.md (created with its header if absent)."""
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    date = datetime.date.today().isoformat()
    with RESULTS.open("a") as f:
        for case, result in rows:
            f.write(f"| {date} | {git_commit()} | {bench} | {machine()} | {device} | {case} | {result} |\n")


def reset_peak_rss():
    """Resets the kernel's high-water mark of this process's RSS (Linux); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field):
    """VmRSS or VmHWM of this process, MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_worker(script, args, timeout=1800):
    """Runs `script --worker args...` in a fresh process (clean peak memory) -> its JSON result."""
    proc = subprocess.run([sys.executable, str(script), "--worker", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synced(step, device):
    """`step` then, on CUDA, a device sync: what a timer around the call must wait for (kernels
    are queued, not run, when a CUDA call returns)."""
    import torch

    def call():
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    return call


def measure(step, device, reps, inner=1, warmup=0, prime=None):
    """Run `step` once for its peak memory above the state before it (MB; CUDA allocator or the
    process's RSS high-water mark), `warmup` more times, then `reps` timed rounds of `inner`
    calls. Returns (ms per call for each round, peak MB). `prime`, called first and not measured,
    should run the same code on tiny inputs: a first call's one-time work (lazy imports and
    registrations: ~80 MB of RSS for a first custom-op call on CPU) is then not counted as the
    step's memory."""
    import gc
    import time

    import torch
    if prime is not None:
        prime()
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        base = rss_mb("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
        step()
        peak = rss_mb("VmHWM") - base
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return times, peak
