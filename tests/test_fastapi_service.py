"""examples/fastapi_service.py, served by uvicorn on the loopback and called over HTTP."""

import asyncio
import contextlib
import importlib.util
import pathlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from extras import require

require("fastapi", "service")
require("uvicorn", "service")
httpx = require("httpx", "test")
require("prometheus_client", "service")

import uvicorn  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from batchproc import BatchProcessorConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "fastapi_service", ROOT / "examples" / "fastapi_service.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@contextlib.contextmanager
def serve(app):
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The keep-alive outlasts any test: a pooled connection the server closes after its
    # idle timeout (5 s by default), as the client sends on it, fails that request with
    # "Server disconnected" on a loaded machine.
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning",
                                           timeout_graceful_shutdown=10,
                                           timeout_keep_alive=600))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn-test", daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def _expected(model, features):
    return model(np.asarray([features], dtype=np.float32))[0]


def test_concurrent_requests_each_get_their_own_answer():
    registry = CollectorRegistry()
    app = example.create_app(registry=registry)
    model = example.make_model()
    n = 200

    async def main(url):
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            bodies = [{"features": [float(i), -float(i), 1, 2, 3, 4, 5, float(i % 7)]}
                      for i in range(n)]
            responses = await asyncio.gather(*(client.post("/predict", json=b)
                                               for b in bodies))
            ready = await client.get("/ready")
            metrics = await client.get("/metrics")
            bad = await client.post("/predict", json={"features": [1.0]})
            return bodies, responses, ready, metrics, bad

    with serve(app) as url:
        bodies, responses, ready, metrics, bad = asyncio.run(main(url))
        processor = app.state.processor
        assert processor.get_stats()["avg_batch_size"] > 1  # they did share batches
    assert not processor.running  # the lifespan stopped it
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["output"],
                                   _expected(model, body["features"]), rtol=1e-5)
    assert ready.status_code == 200
    assert ready.json()["status"] == "healthy"
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'batchproc_requests_total{outcome="completed",processor="model"} 200.0' \
        in metrics.text
    assert 'batchproc_request_latency_seconds_count{processor="model"} 200.0' in metrics.text
    assert bad.status_code == 422


def test_a_full_queue_answers_503_with_retry_after():
    app = example.create_app(
        config=BatchProcessorConfig(max_queue_size=4, max_batch_size=4),
        queue_wait=0.0, registry=CollectorRegistry())
    row = np.zeros((1, example.FEATURES), dtype=np.float32)

    async def request(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await client.post("/predict", json={"features": [0.0] * 8})

    with serve(app) as url:
        processor = app.state.processor
        processor.pause()
        held = [processor.enqueue_predict(row) for _ in range(4)]  # the queue is full
        refused = asyncio.run(request(url))
        processor.resume()
        for future in held:
            future.result(10)
        served = asyncio.run(request(url))
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert served.status_code == 200


def test_a_request_waits_for_room_then_is_served():
    app = example.create_app(
        config=BatchProcessorConfig(max_queue_size=4, max_batch_size=4),
        queue_wait=60.0, registry=CollectorRegistry())
    model = example.make_model()
    row = np.zeros((1, example.FEATURES), dtype=np.float32)
    features = [float(i) for i in range(example.FEATURES)]

    async def request(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await client.post("/predict", json={"features": features})

    with serve(app) as url:
        processor = app.state.processor
        processor.pause()
        held = [processor.enqueue_predict(row) for _ in range(4)]  # the queue is full
        waiters = processor._room_waiters()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(asyncio.run, request(url))
            # Until the handler awaits room in apredict (bounded): then let it in.
            for _ in range(6000):
                if len(waiters) == 1 or pending.done():
                    break
                threading.Event().wait(0.01)
            assert len(waiters) == 1 and not pending.done()
            processor.resume()
            response = pending.result(60)
        for future in held:
            future.result(10)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["output"], _expected(model, features),
                               rtol=1e-5)


def test_ready_is_503_when_unhealthy():
    app = example.create_app(
        config=BatchProcessorConfig(max_queue_size=10, queue_warning_threshold=2,
                                    queue_critical_threshold=3),
        registry=CollectorRegistry())
    row = np.zeros((1, example.FEATURES), dtype=np.float32)

    async def ready(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await client.get("/ready")

    with serve(app) as url:
        processor = app.state.processor
        processor.pause()
        held = [processor.enqueue_predict(row) for _ in range(5)]  # past critical
        response = asyncio.run(ready(url))
        processor.resume()
        for future in held:
            future.result(10)
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"


def test_live_is_503_while_every_worker_is_stuck_in_a_call_then_200_again():
    release = threading.Event()
    entered = threading.Event()

    def model(batch):
        if batch[0, 0] == 1.0:  # the request that hangs
            entered.set()
            release.wait(30)
        return batch[:, :4]

    app = example.create_app(
        model, BatchProcessorConfig(max_workers=1, item_timeout=0.05),
        registry=CollectorRegistry())

    async def live(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await client.get("/live")

    row = np.zeros((1, example.FEATURES), dtype=np.float32)
    with serve(app) as url:
        processor = app.state.processor
        processor.pause()  # not ready, but live: a probe must not restart it
        paused = asyncio.run(live(url))
        processor.resume()
        stuck = processor.enqueue_predict(row + 1.0)
        assert entered.wait(30)
        # Not live once the call is past item_timeout (the health report's own rule).
        deadline = time.monotonic() + 30
        while processor.health()["live"] and time.monotonic() < deadline:
            release.wait(0.01)
        hung = asyncio.run(live(url))
        release.set()
        with pytest.raises(TimeoutError):
            stuck.result(30)
        processor.enqueue_predict(row).result(30)  # a call returns: live again
        recovered = asyncio.run(live(url))
    assert paused.status_code == 200 and paused.json()["ready"] is False
    assert hung.status_code == 503 and hung.json()["live"] is False
    assert recovered.status_code == 200 and recovered.json()["live"] is True


# The overflowing case overflows in the model's matmul, as it would in production.
@pytest.mark.filterwarnings("ignore:.* encountered in matmul:RuntimeWarning")
def test_non_finite_input_and_output_are_refused_with_422():
    app = example.create_app(registry=CollectorRegistry())
    ones = ["1"] * (example.FEATURES - 1)
    refused = {
        # JSON's parser reads an overflowing literal as infinity, and accepts NaN/Infinity.
        "1e400": "1e400", "-1e400": "-1e400", "NaN": "NaN", "Infinity": "Infinity",
        "-Infinity": "-Infinity",
        # Finite in float64 but not in the model's float32.
        "1e39": "1e39", "-3.5e38": "-3.5e38",
        # Not numbers: read as 1.0 and 1000.0 in pydantic's lax mode.
        "true": "true", "a string": '"1e3"', "null": "null",
    }
    accepted = {"3e38": "3e38", "-1e-50": "-1e-50", "0": "0"}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def post(first):
                body = '{"features": [' + ", ".join([first, *ones]) + "]}"
                return await client.post("/predict", content=body,
                                         headers={"content-type": "application/json"})
            answers = {k: await post(v) for k, v in {**refused, **accepted}.items()}
            # Every feature at float32's largest: finite in, but the products overflow.
            big = await client.post("/predict", json={"features": [3.4e38] * example.FEATURES})
            return answers, big

    with serve(app) as url:
        answers, big = asyncio.run(main(url))
    for name in refused:
        assert answers[name].status_code == 422, (name, answers[name].text)
    for name in accepted:
        assert answers[name].status_code == 200, (name, answers[name].text)
        assert all(v is not None for v in answers[name].json()["output"]), name
    out = example.make_model()(np.full((1, example.FEATURES), 3.4e38, dtype=np.float32))
    assert not np.isfinite(out).all()  # the case below is the overflowing one
    assert big.status_code == 422 and "not finite" in big.json()["detail"]
