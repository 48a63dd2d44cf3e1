"""Peak memory and time of the tiled contrastive loss against open_clip's ClipLoss, forward + backward.

    python bench/loss_memory.py [--sizes 4096,8192,16384,32768] [--dim 512] [--tiles 1024] [--reps 3]
                                [--time-cap 900] [--mem-limit-gib G] [--threads N] [--device auto|cpu|cuda]
                                [--out results.json]

Every (batch size, loss) point runs in a FRESH subprocess, so that one point's allocations cannot hide in
another's peak.  The subprocess makes unit-length image and text features [B, D] fp32 (leaves with grad) and
a logit scale, runs one tiny warm-up loss, then measures:

- CPU: "extra memory" = peak RSS (VmHWM, the high-water mark behind getrusage's ru_maxrss, reset through
  /proc/self/clear_refs right before the first timed call; ru_maxrss where /proc is unavailable) minus the
  RSS at that moment; the feature gradients count, the inputs do not.  glibc's free heap is trimmed
  (malloc_trim, untimed) before and between calls, so that retained chunks do not creep into the peak.
- CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the first call; sizes keep doubling
  past --sizes until ClipLoss runs out of memory.
- time: the median over --reps forward+backward calls (fewer if the first ones use up half the time cap).

A point that runs out of memory (MemoryError, torch's allocator error, the OOM killer, or --mem-limit-gib,
an address-space limit that makes allocation fail instead of swapping a shared machine) or exceeds
--time-cap is recorded as such; the bench carries on.  ClipLoss(local_loss=True) is the same computation
in a world of one (its get_logits ignores local_loss when world_size == 1), so one column covers both.

Targets: ≥ 10× less extra memory than ClipLoss at B = 16384, and time ≤ 1.5× ClipLoss's on CPU.  Always
exits 0 (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEMORY_TARGET = (16384, 10.0)  # (batch, ClipLoss extra ÷ fused extra at least)
TIME_TARGET = 1.5  # fused time ÷ ClipLoss time at most, on CPU
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4096,8192,16384,32768", help="comma-separated batch sizes B")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--tiles", default="1024", help="tile sizes of the fused loss (comma-separated)")
    p.add_argument("--reps", type=int, default=3, help="timed forward+backward calls per point")
    p.add_argument("--time-cap", type=float, default=900.0, help="seconds per point, then it is a timeout")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="address-space limit per point above its start (default: 90%% of MemAvailable)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one point, as JSON (internal)
    args = p.parse_args(argv)
    if args.reps < 1 or args.dim < 1:
        p.error("--reps and --dim must be >= 1")
    return args


# ---- one point, in its own process ---------------------------------------------------------------------


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The RSS high-water mark: VmHWM (the counter behind getrusage's ru_maxrss, and the one clear_refs
    resets; ru_maxrss can keep an older, higher value in the process's signal struct), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux ≥ 4.0; may be refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """glibc keeps freed [B, D]-sized chunks in its heap; hand them back, so each call's peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_loss(loss: str, tile: int):
    if loss == "clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    from kclip_ds.kernels import TiledContrastiveLoss

    return TiledContrastiveLoss(tile)


def measure(point: dict) -> dict:
    import torch
    import torch.nn.functional as F

    if point["mem_limit"]:
        with open("/proc/self/status") as f:
            vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm_size + point["mem_limit"], resource.RLIM_INFINITY))
    if point["threads"]:
        torch.set_num_threads(point["threads"])
    device = torch.device(point["device"])
    cuda = device.type == "cuda"
    loss_fn = make_loss(point["loss"], point["tile"])

    def features(batch: int) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        v, t = (F.normalize(torch.randn(batch, point["dim"], device=device, generator=g), dim=-1)
                for _ in range(2))
        return [v.requires_grad_(), t.requires_grad_(), torch.tensor(14.3, device=device, requires_grad=True)]

    def step(leaves: list[torch.Tensor]) -> float:
        for leaf in leaves:
            leaf.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(*leaves).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(features(64))  # warm-up: kernels, thread pool, allocator
    leaves = features(point["batch"])
    if not cuda:
        release_free_heap()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_was_reset = reset_peak_rss()
        base = current_rss()
        floor = peak_rss() - base  # > 0 when the reset was refused: extra memory below this is not seen
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < point["reps"] and (not times or time.perf_counter() - started < point["time_cap"] / 2):
        times.append(step(leaves))
        if not cuda:
            release_free_heap()  # untimed
    result = {"status": "ok", "times_s": times, "median_s": statistics.median(times)}
    if cuda:
        result["extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        result.update(extra_bytes=peak_rss() - base, base_rss_bytes=base, peak_reset=peak_was_reset,
                      unseen_below_bytes=max(floor, 0))
    return result


def worker(spec: str) -> int:
    point = json.loads(spec)
    try:
        result = measure(point)
    except MemoryError:
        result = {"status": "oom", "error": "MemoryError"}
    except RuntimeError as exc:  # torch: "DefaultCPUAllocator: not enough memory", CUDA out of memory
        message = str(exc)
        if "out of memory" not in message.lower() and "not enough memory" not in message.lower():
            raise
        result = {"status": "oom", "error": message.splitlines()[0][:200]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- the sweep ------------------------------------------------------------------------------------------


def run_point(point: dict, time_cap: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(point)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=time_cap + 60)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {time_cap:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode < 0:  # a signal; SIGKILL is what the OOM killer sends
        return {"status": "oom" if proc.returncode == -9 else "crashed",
                "error": f"killed by signal {-proc.returncode}"}
    return {"status": "crashed", "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def cpu_info() -> dict:
    model_name = ""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model_name = names[0] if names else ""
    except OSError:
        pass
    return {"model_name": model_name, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform()}


def cell(rec: dict, key: str) -> str:
    if rec["status"] != "ok":
        return rec["status"]
    return f"{rec['extra_bytes'] / MIB:.0f}" if key == "mem" else f"{rec['median_s']:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    import open_clip
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    sizes = [int(s) for s in args.sizes.split(",")]
    tiles = [int(t) for t in args.tiles.split(",")]
    limit = (int(args.mem_limit_gib * 2**30) if args.mem_limit_gib else int(0.9 * mem_available())) \
        if device == "cpu" else 0
    losses = [("clip", 0)] + [("fused", tile) for tile in tiles]
    versions = {"torch": torch.__version__, "open_clip": open_clip.__version__,
                "python": platform.python_version()}
    print(f"torch {versions['torch']}, open_clip {versions['open_clip']}; device {device}; "
          f"cpu: {cpu_info()['model_name']} ×{os.cpu_count()}; threads {args.threads or 'default'}; "
          f"D = {args.dim}"
          + (f"; address-space limit {limit / 2**30:.1f} GiB per point" if limit else ""))

    points = []
    queue = list(sizes)
    while queue:
        batch = queue.pop(0)
        row = {"batch": batch}
        for loss, tile in losses:
            spec = {"loss": loss, "tile": tile, "batch": batch, "dim": args.dim, "reps": args.reps,
                    "time_cap": args.time_cap, "threads": args.threads, "device": device, "mem_limit": limit}
            rec = run_point(spec, args.time_cap)
            row[f"{loss}{tile or ''}"] = rec
            print(f"  B={batch} {loss}{f' tile {tile}' if tile else ''}: {cell(rec, 'mem')} MiB extra, "
                  f"{cell(rec, 'time')} s", flush=True)
        points.append(row)
        if device == "cuda" and not queue and row["clip"]["status"] == "ok":
            queue.append(batch * 2)  # on a GPU, go up until ClipLoss runs out of memory

    print(f"\n{'B':>6} {'ClipLoss MiB':>13} {'s':>8} | " + " | ".join(
        f"{'fused t' + str(t) + ' MiB':>16} {'s':>8} {'mem ×':>7} {'time ×':>7}" for t in tiles))
    verdicts = []
    for row in points:
        clip = row["clip"]
        line = f"{row['batch']:>6} {cell(clip, 'mem'):>13} {cell(clip, 'time'):>8} | "
        cells = []
        for tile in tiles:
            fused = row[f"fused{tile}"]
            mem_ratio = time_ratio = None
            if clip["status"] == "ok" and fused["status"] == "ok":
                mem_ratio = clip["extra_bytes"] / max(fused["extra_bytes"], 1)
                time_ratio = fused["median_s"] / clip["median_s"]
            fused.update(mem_ratio=mem_ratio, time_ratio=time_ratio)
            mem_text = f"{mem_ratio:.1f}" if mem_ratio else "-"
            time_text = f"{time_ratio:.2f}" if time_ratio else "-"
            cells.append(f"{cell(fused, 'mem'):>16} {cell(fused, 'time'):>8} {mem_text:>7} {time_text:>7}")
            if tile == tiles[0] and row["batch"] == MEMORY_TARGET[0]:
                met = mem_ratio is not None and mem_ratio >= MEMORY_TARGET[1]
                verdicts.append(("memory", met, mem_ratio))
            if tile == tiles[0] and device == "cpu" and time_ratio is not None:
                verdicts.append((f"time B={row['batch']}", time_ratio <= TIME_TARGET, time_ratio))
        print(line + " | ".join(cells))
    print("mem × = ClipLoss extra ÷ fused extra; time × = fused ÷ ClipLoss.  "
          f"Targets (tile {tiles[0]}): mem × ≥ {MEMORY_TARGET[1]:.0f} at B={MEMORY_TARGET[0]}, "
          f"time × ≤ {TIME_TARGET}.")
    for name, ok, value in verdicts:
        print(f"  {name}: {'PASS' if ok else 'FAIL'} ({value if value is None else round(value, 2)})")
    if not any(name == "memory" for name, _, _ in verdicts):
        print(f"  memory: not measured (B={MEMORY_TARGET[0]} not in --sizes)")

    if args.out:
        result = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "cpu": cpu_info(), "device": device, "threads": args.threads,
            "dim": args.dim, "tiles": tiles, "reps": args.reps, "time_cap_s": args.time_cap,
            "address_space_limit_bytes": limit, "points": points,
            "verdicts": [{"target": n, "pass": ok, "value": v} for n, ok, v in verdicts],
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
