"""batchproc on Ray Serve: a real local Ray instance, two replicas, a handle and HTTP."""

import asyncio
import functools
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from batchproc.bench.models import MLP  # noqa: E402
from batchproc.integrations.ray_serve import batched_deployment  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # Ray's own modules warn at import and at shutdown; they are not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

FEATURES = 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_batch_requests_from_a_handle_and_http(ray_serve):
    app = batched_deployment(
        functools.partial(MLP, FEATURES), max_batch_size=32, batch_timeout=0.005,
        num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    handle = serve.run(app, name="mlp", route_prefix="/mlp")
    model = MLP(FEATURES)  # the same seed: the expected answers
    rng = np.random.default_rng(1)

    # Through the handle: 400 requests in flight at once, each one row.
    rows = rng.standard_normal((400, FEATURES)).astype(np.float32)
    responses = [handle.remote(rows[i:i + 1]) for i in range(len(rows))]
    results = [r.result(timeout_s=60) for r in responses]
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, model(rows[i:i + 1]), rtol=1e-5, atol=1e-6)

    # Over HTTP through Serve's proxy: 200 concurrent JSON requests.
    http_rows = rng.standard_normal((200, FEATURES)).astype(np.float32)

    async def post_all():
        async with httpx.AsyncClient(base_url=ray_serve, timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(
                client.post("/mlp", json=http_rows[i:i + 1].tolist())
                for i in range(len(http_rows))))

    answers = asyncio.run(post_all())
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json(), model(http_rows[i:i + 1]).tolist(),
                                   rtol=1e-5, atol=1e-6)

    # Both replicas served, and each batched what it was sent.
    stats = {}
    for _ in range(50):
        s = handle.get_stats.remote().result(timeout_s=60)
        stats[s["replica_pid"]] = s
        if len(stats) == 2:
            break
    assert len(stats) == 2
    assert sum(s["total_processed"] for s in stats.values()) == 600
    assert all(s["total_processed"] > 0 for s in stats.values())
    assert max(s["avg_batch_size"] for s in stats.values()) > 1
    serve.delete("mlp")
