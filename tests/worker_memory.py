"""What does a gunicorn worker keep after the benchmark's load? tracemalloc inside the worker says.

    python tests/worker_memory.py              # about 40 s; wrk from the Debian package
    python tests/worker_memory.py --top 25

Starts ``./gateway serve`` with deploy/gunicorn.conf.py as tests/benchmark.py does (one worker,
its fake upstream), plus tracemalloc in the worker. After the benchmark's warm-up and settle,
the worker writes a snapshot ("idle"); then come the 200 slow streams and 3 s of 5 MB bodies,
8 s of settling (RSS sampled every 0.5 s; the benchmark reads its "after load" row at 5 s),
and a second snapshot. Printed: the worker's RSS at both points and as it settles, its RSS by
kind of mapping, what Python objects still hold that they did not hold idle (the largest
growths by traceback). RSS growth that no Python object holds is memory Python freed but an
allocator kept: CPython's 1 MB object arenas (anonymous mappings), each kept while any object
in it lives, and glibc's heap. (sys._debugmallocstats() would count the arenas, but it
reports nothing while tracemalloc is on.) docs/performance.md quotes its output.
"""
import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402

#: The gunicorn config the worker runs: the shipped one, plus tracemalloc from the worker's
#: start, and a snapshot written on SIGUSR2 (gunicorn's workers leave that signal alone).
TRACING_CONFIG = """\
import runpy as _runpy
globals().update({name: value for name, value in _runpy.run_path(%(deployed)r).items()
                  if not name.startswith("__")})
_deployed_post_worker_init = post_worker_init


def post_worker_init(worker):
    import signal
    import tracemalloc
    tracemalloc.start(%(frames)d)
    _deployed_post_worker_init(worker)
    taken = []

    def snapshot(signum, frame):
        taken.append(1)
        tracemalloc.take_snapshot().dump(%(directory)r + "/snapshot-%%d" %% len(taken))

    signal.signal(signal.SIGUSR2, snapshot)
"""


#: How long the worker may settle after the load: longer than the benchmark's settle_after, to
#: see whether the memory that comes back comes back later.
SETTLE_SECONDS = 8


def rss_mb(pid):
    with open("/proc/%d/smaps_rollup" % pid) as file:
        return next(int(line.split()[1]) for line in file if line.startswith("Rss:")) / 1024


def mappings_mb(pid):
    """The process's RSS by kind of mapping (/proc/<pid>/smaps): glibc's main heap
    ("[heap]"), anonymous mappings (CPython's arenas, thread stacks, big blocks; the kernel
    merges neighbouring ones, so their sizes do not tell them apart), files (code, libraries)."""
    kinds, kind = {}, None
    with open("/proc/%d/smaps" % pid) as file:
        for line in file:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                name = fields[5] if len(fields) > 5 else ""
                kind = name if name.startswith("[") else "files" if name else "anonymous"
            elif fields[0] == "Rss:":
                kinds[kind] = kinds.get(kind, 0) + int(fields[1]) / 1024
    return kinds


def snapshot(worker, directory, number):
    """Ask the worker for a snapshot and load it (bounded wait)."""
    path = os.path.join(directory, "snapshot-%d" % number)
    os.kill(worker, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, EOFError, ValueError):
            if os.path.getsize(path):
                time.sleep(0.5)  # written in one go; give it a moment to finish
                return tracemalloc.Snapshot.load(path)
        time.sleep(0.2)
    raise SystemExit("the worker wrote no snapshot")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="growths to print (15)")
    parser.add_argument("--frames", type=int, default=8, help="frames per traceback (8)")
    args = parser.parse_args(argv)
    plan = benchmark.PLANS["full"]
    proxy_core, load_core = ("0", "1") if os.cpu_count() >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as workdir, \
            contextlib.ExitStack() as stack:
        config = os.path.join(workdir, "tracing.conf.py")
        with open(config, "w") as file:
            file.write(TRACING_CONFIG % {
                "deployed": os.path.join(benchmark.ROOT, "deploy", "gunicorn.conf.py"),
                "frames": args.frames, "directory": workdir})
        bodies = {"small": os.path.join(workdir, "small.json"),
                  "big": os.path.join(workdir, "big.json")}
        with open(bodies["small"], "wb") as file:
            file.write(benchmark.small_body())
        with open(bodies["big"], "wb") as file:
            file.write(benchmark.image_body(5 * 1024 * 1024))
        upstream_log = os.path.join(workdir, "upstream.log")
        upstream = subprocess.Popen(benchmark.pinned(load_core, [
            sys.executable, benchmark.__file__, "--upstream", "0"]),
            stdout=open(upstream_log, "wb"))
        stack.callback(benchmark.stop, upstream)
        upstream_port = benchmark.logged_port(upstream_log, r"listening on (\d+)", upstream)
        process, port, _ = benchmark.start_gateway(workdir, upstream_port, proxy_core, config)
        stack.callback(benchmark.stop, process)
        worker = benchmark.process_tree(process.pid)[-1]

        benchmark.wrk(port, bodies["small"], 4, 1, load_core, workdir)  # the warm-up
        benchmark.streams(port, 2, 1, 4, 1, 30)
        time.sleep(plan["settle"])
        idle_rss, idle_maps = rss_mb(worker), mappings_mb(worker)
        idle = snapshot(worker, workdir, 1)

        benchmark.streams(port, plan["slow_streams"], 1, plan["slow_events"], 250, 120)
        benchmark.wrk(port, bodies["big"], 1, 3, load_core, workdir)
        settling = []  # (seconds since the load ended, RSS): when memory comes back
        ended = time.monotonic()
        while time.monotonic() - ended < SETTLE_SECONDS:
            settling.append((time.monotonic() - ended, rss_mb(worker)))
            time.sleep(0.5)
        after_rss, after_maps = rss_mb(worker), mappings_mb(worker)
        after = snapshot(worker, workdir, 2)

    traced = [sum(trace.size for trace in taken.traces) for taken in (idle, after)]
    print("worker RSS: idle %.1f MB, after load %.1f MB (+%.1f MB)"
          % (idle_rss, after_rss, after_rss - idle_rss))
    print("worker RSS as the load ends (s: MB):", ", ".join(
        "%.1f: %.1f" % point for point in settling))
    print("RSS by mapping, idle -> after (MB):")
    for kind in sorted(set(idle_maps) | set(after_maps)):
        print("    %-26s %6.1f -> %6.1f" % (kind, idle_maps.get(kind, 0),
                                             after_maps.get(kind, 0)))
    print("held by Python objects (tracemalloc): idle %.1f MB, after %.1f MB (+%.2f MB)"
          % (traced[0] / 2**20, traced[1] / 2**20, (traced[1] - traced[0]) / 2**20))
    print("\nlargest growths, by where they were allocated:")
    for stat in after.compare_to(idle, "traceback")[:args.top]:
        if stat.size_diff <= 0:
            break
        print("\n%+.1f KB in %+d blocks" % (stat.size_diff / 1024, stat.count_diff))
        for line in stat.traceback.format(most_recent_first=True)[:2 * args.frames]:
            print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
