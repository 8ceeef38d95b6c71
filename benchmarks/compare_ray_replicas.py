"""Throughput of batchproc on Ray Serve with 1 and 2 replicas of the fixed-cost model.

A local Ray instance (``num_cpus=2``) runs ``batched_deployment`` of
``batchproc.bench.models.FixedCost`` (a fixed cost per call behind one lock, whatever the
batch: the shape of one GPU per replica), max batch 64, and ``--clients`` coroutines in
the driver each send one row at a time through a Serve handle (closed loop) for
``--seconds``. For scale, in the same run: a replica that calls the model once per request
(no batching), and one that returns its input at once (Serve's own ceiling on this
machine: its cost per request, router, actor calls and serialization, across the
processes it runs). Each replica's model is its own, so the model's ceiling doubles
with the replicas; Serve's per-request cost is paid on the same cores whatever their
number.

    pip install ".[ray]" && python benchmarks/compare_ray_replicas.py \\
        [--seconds 10] [--clients 256] [--model-ms 5] [--out benchmarks/results/ray_replicas.md]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import shlex
import sys
import time

import numpy as np
import ray
from ray import serve

from batchproc.bench.models import FixedCost
from batchproc.integrations.ray_serve import batched_deployment

FEATURES = 64


@serve.deployment
class Echo:
    """No model: what Serve alone carries."""

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return x


@serve.deployment
class Unbatched:
    """The same model, called once per request."""

    def __init__(self, model_s: float) -> None:
        self.model = FixedCost(model_s)

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)


async def _drive(handle, clients: int, seconds: float) -> tuple[int, float]:
    x = np.ones((1, FEATURES), dtype=np.float32)
    done = 0
    stop_at = 0.0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            out = await handle.remote(x)
            assert out.shape == (1, FEATURES)
            done += 1

    # Warm up (connections, the controller's first fits), then measure.
    stop_at = time.perf_counter() + 2.0
    await asyncio.gather(*(client() for _ in range(clients)))
    done = 0
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(client() for _ in range(clients)))
    return done, time.perf_counter() - t0


def run(label: str, app, clients: int, seconds: float) -> tuple[str, float]:
    handle = serve.run(app, name="bench", route_prefix=None)
    done, elapsed = asyncio.run(_drive(handle, clients, seconds))
    stats = []
    if label.startswith("batchproc"):
        seen: dict[int, dict] = {}
        for _ in range(40):
            s = handle.get_stats.remote().result()
            seen[s["replica_pid"]] = s
        stats = [f"{s['avg_batch_size']:.1f}" for s in seen.values()]
    serve.delete("bench")
    rate = done / elapsed
    print(f"{label}: {rate:,.0f} requests/s ({done:,} in {elapsed:.1f} s), "
          f"mean batch per replica {', '.join(stats) or '-'}", flush=True)
    return ", ".join(stats) or "-", rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--model-ms", type=float, default=5.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_s = args.model_ms / 1000.0
    load_before = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start()
    rows = []
    try:
        actor = {"num_cpus": 0.5}
        for replicas in (1, 2):
            app = Echo.options(num_replicas=replicas, ray_actor_options=actor,
                               max_ongoing_requests=256).bind()
            rows.append((f"echo (Serve alone), {replicas} replica(s)", replicas,
                         *run(f"echo x{replicas}", app, args.clients, args.seconds)))
        for replicas in (1, 2):
            app = Unbatched.options(num_replicas=replicas, ray_actor_options=actor,
                                    max_ongoing_requests=256).bind(model_s)
            rows.append((f"no batching, {replicas} replica(s)", replicas,
                         *run(f"no batching x{replicas}", app, args.clients, args.seconds)))
        for replicas in (1, 2):
            app = batched_deployment(functools.partial(FixedCost, model_s), max_batch_size=64,
                                     batch_timeout=0.005, num_replicas=replicas,
                                     ray_actor_options=actor)
            rows.append((f"batchproc, {replicas} replica(s)", replicas,
                         *run(f"batchproc x{replicas}", app, args.clients, args.seconds)))
    finally:
        serve.shutdown()
        ray.shutdown()
    base = {r[1]: r[3] for r in rows if r[0].startswith("batchproc")}
    limit = 64 / model_s
    lines = [
        f"Ray Serve {ray.__version__}, local instance (num_cpus=2) on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; fixed {args.model_ms:g} ms model, one row per "
        f"request, {args.clients} closed-loop clients through a handle, {args.seconds:g} s "
        f"each after 2 s of warm-up; {time.strftime('%Y-%m-%d')}; load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after (a shared machine).",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        "| deployment | replicas | requests/s | mean batch per replica | model ceiling |",
        "|---|---:|---:|---|---:|",
    ]
    for label, replicas, batches, rate in rows:
        if label.startswith("echo"):
            ceiling_text = "-"
        else:
            ceiling = (replicas / model_s) if label.startswith("no") else replicas * limit
            ceiling_text = f"{ceiling:,.0f}"
        lines.append(f"| {label} | {replicas} | {rate:,.0f} | {batches} | {ceiling_text} |")
    if 1 in base and 2 in base:
        lines += ["", f"2 replicas / 1 replica with batchproc: {base[2] / base[1]:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
