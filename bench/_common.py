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
HEADER = ("# Benchmark results\n\nOne section per bench, one table row per case per run. Times are "
          "medians (p20-p80) in ms; memory is the peak above the inputs, in MB.\n")
TABLE = "| date | commit | machine | device | case | result |\n| --- | --- | --- | --- | --- | --- |\n"


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
    return f"{platform.system()} {cpu}{_simd()}, {os.cpu_count()} cores{load}"


def _simd():
    """' (avx512_bf16)', ' (AVX-512)' or ' (AVX2, no AVX-512)' on x86 Linux: the same CPU name
    covers machines whose float32 and bf16 speeds differ severalfold."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    for flag, label in (("avx512_bf16", "avx512_bf16"), ("avx512f", "AVX-512"), ("avx2", "AVX2, no AVX-512")):
        if flag in flags:
            return f" ({label})"
    return ""


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
    """rows: [(case, result)] -> appended to the table of RESULTS.md's section for `bench` (created
    with its header if absent); written to a temporary file and renamed over it."""
    date, commit, host = datetime.date.today().isoformat(), git_commit(), machine()
    lines = [f"| {date} | {commit} | {host} | {device} | {case} | {result} |\n" for case, result in rows]
    text = insert_rows(RESULTS.read_text() if RESULTS.exists() else HEADER, bench, lines)
    tmp = RESULTS.with_name(RESULTS.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)


def insert_rows(text, bench, rows):
    """`text` with `rows` (table lines) after the last table line of the section headed
    "## {bench}" or "## {bench}: ..."; a new section at the end when there is none."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines)
                  if line.rstrip("\n") == f"## {bench}" or line.startswith(f"## {bench}: ")), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n## {bench}\n\n" + TABLE + "".join(rows)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    table = [i for i in range(start + 1, end) if lines[i].startswith("|")]
    if table:
        at, new = table[-1] + 1, rows
    else:  # a section of text only: its table goes after the text
        at, new = end, ["\n", TABLE, *rows]
        while at > start + 1 and not lines[at - 1].strip():
            at -= 1
    if not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines[at:at] = new
    return "".join(lines)


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
