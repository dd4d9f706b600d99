"""PyTorch baseline for the bucket all-reduce of `examples/bench_data_parallel.rs`:
`torch.distributed.all_reduce` (in place, as DDP reduces its buckets) with the gloo backend on
the CPU, 2 processes on this machine, float32 buffers of the given sizes.

For each size: 2 untimed warm-up calls, then `--reps` timed repetitions of `--iters` calls
each (after a barrier); every repetition's time per call is reported (the Rust side takes the
median). Prints exactly one line of JSON on stdout:

    {"torch": "...", "ranks": 2, "sizes": [bytes...], "secs": [[per-call seconds per rep]...]}

CI never runs it; see bench_moe_torch.py for the virtual env.

    /work/venv-torch/bin/python scripts/bench_allreduce_torch.py --sizes 16777216,67108864
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, sizes, reps, iters, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = []
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(buf)
        times = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(buf)
            times.append((time.perf_counter() - t) / iters)
        out.append(times)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16777216,67108864,268435456")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--port", type=int, default=29517)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(r, a.ranks, sizes, a.reps, a.iters, a.port, queue))
        for r in range(a.ranks)
    ]
    for p in procs:
        p.start()
    secs = queue.get()
    for p in procs:
        p.join()
    print(json.dumps({"torch": torch.__version__, "ranks": a.ranks, "sizes": sizes, "secs": secs}))


if __name__ == "__main__":
    main()
