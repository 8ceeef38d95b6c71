"""batchproc on Ray Serve: a real local Ray instance, two replicas, a handle and HTTP.

Ray runs in a fresh interpreter (a spawned process): ``ray.init`` changes process-wide
state (logging handlers, signal handlers, threads left after ``shutdown``) that would
otherwise reach every test after this one. The child returns what it got; the checks
are made here.
"""

import dataclasses
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from extras import one_ray_cluster_at_a_time, skip_without

from batchproc import BatchProcessorConfig, ConfigTypeError
from batchproc.bench.models import MLP
from batchproc.integrations.ray_serve import BatchedReplica, batched_deployment

FEATURES = 8


def _serve_and_call(handle_rows, http_rows, out_dir):
    """In a fresh interpreter: start Ray and Serve on the loopback, deploy two replicas,
    send every row through a handle (all in flight at once) and over HTTP (concurrent),
    and return the answers and one replica's stats. Each replica writes the rows of each
    model call to a file named by its process id in ``out_dir``."""
    import asyncio
    import os
    import socket

    import httpx
    import ray
    from ray import serve

    from batchproc.integrations.ray_serve import batched_deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Serve kills an HTTP proxy not ready within 5 s (its default): on a loaded machine
    # that is the test failing for the machine's load, not for batchproc.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        def recording_mlp():
            # Runs in each replica (a nested function: Ray pickles it by value). Who
            # served what is read from the files, not from get_stats(), which Serve
            # routes to whichever replica it likes.
            model = MLP(FEATURES)
            path = os.path.join(out_dir, f"{os.getpid()}.rows")

            def call(batch):
                with open(path, "a") as f:
                    f.write(f"{len(batch)}\n")
                return model(batch)

            return call

        # 4 batches of 32 (128) requests at most in a replica: 400 in flight need both.
        app = batched_deployment(
            recording_mlp, max_batch_size=32, batch_timeout=0.005, num_replicas=2,
            ray_actor_options={"num_cpus": 0.5})
        handle = serve.run(app, name="mlp", route_prefix="/mlp")

        responses = [handle.remote(rows) for rows in handle_rows]
        by_handle = [r.result(timeout_s=120) for r in responses]

        async def post_all():
            limits = httpx.Limits(max_connections=len(http_rows))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                         limits=limits) as client:
                return await asyncio.gather(*(client.post("/mlp", json=rows.tolist())
                                              for rows in http_rows))

        by_http = [(r.status_code, r.json()) for r in asyncio.run(post_all())]

        stats = handle.get_stats.remote().result(timeout_s=60)
        serve.delete("mlp")
        serve.shutdown()
        return by_handle, by_http, stats
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_replicas_batch_requests_from_a_handle_and_http(tmp_path):
    skip_without("ray", "test")  # not imported here: only in the child
    rng = np.random.default_rng(1)
    handle_rows = [rng.standard_normal((1, FEATURES)).astype(np.float32) for _ in range(400)]
    http_rows = [rng.standard_normal((1, FEATURES)).astype(np.float32) for _ in range(200)]
    with (one_ray_cluster_at_a_time(),
          ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool):
        by_handle, by_http, stats = pool.submit(
            _serve_and_call, handle_rows, http_rows, str(tmp_path)).result(timeout=840)
    rows_by_replica = {int(path.stem): [int(n) for n in path.read_text().split()]
                       for path in tmp_path.glob("*.rows")}

    model = MLP(FEATURES)  # the same seed as in the replicas: the expected answers
    assert len(by_handle) == 400
    for rows, result in zip(handle_rows, by_handle):
        np.testing.assert_allclose(result, model(rows), rtol=1e-5, atol=1e-6)
    assert len(by_http) == 200
    for rows, (status, body) in zip(http_rows, by_http):
        assert status == 200, body
        np.testing.assert_allclose(body, model(rows).tolist(), rtol=1e-5, atol=1e-6)
    # Both replicas served every row between them, and batched what they were sent.
    assert len(rows_by_replica) == 2, rows_by_replica
    assert sum(sum(calls) for calls in rows_by_replica.values()) == 600
    assert all(calls for calls in rows_by_replica.values())
    assert max(max(calls) for calls in rows_by_replica.values()) > 1
    # get_stats() answers for the replica Serve sent it to: its count is that replica's.
    assert stats["total_processed"] == sum(rows_by_replica[stats["replica_pid"]])


def _doubling_model():
    return lambda batch: batch * 2


def test_a_replicas_processor_config_is_read_only():
    # A replica made directly (as Serve makes it in its actor): no Ray needed.
    replica = BatchedReplica(_doubling_model, BatchProcessorConfig(max_batch_size=8))
    try:
        config = replica.processor.config
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot set max_batch_size"):
            config.max_batch_size = 16
        assert replica.processor.config.max_batch_size == 8
        variant = dataclasses.replace(config, max_batch_size=16)
        variant.batch_timeout = 0.01
        assert (variant.max_batch_size, variant.batch_timeout) == (16, 0.01)
        assert replica.processor.enqueue_predict(np.ones((1, 2))).result(
            timeout=10).tolist() == [[2.0, 2.0]]
    finally:
        replica.processor.stop(timeout=5.0)


def test_a_handle_call_on_a_full_queue_gets_queue_full_error_after_queue_wait():
    # As HTTP gets a 503: the call waits queue_wait for room, then is refused, instead of
    # waiting as long as the queue stays full. A replica made directly: no Ray needed.
    import asyncio
    import threading

    from batchproc import QueueFullError

    release = threading.Event()

    def blocking_model():
        return lambda batch: release.wait(20) and batch

    replica = BatchedReplica(blocking_model, BatchProcessorConfig(
        max_batch_size=1, max_queue_size=1, max_workers=1), queue_wait=0.05)

    async def until(what):
        while not what(replica.processor.get_stats()):
            await asyncio.sleep(0.001)

    async def calls():
        first = asyncio.ensure_future(replica(1))
        await until(lambda s: s["total_accepted"] == 1 and s["queue_size"] == 0)  # popped
        second = asyncio.ensure_future(replica(2))
        await until(lambda s: s["queue_size"] == 1)  # queued: the queue is full
        with pytest.raises(QueueFullError):
            await asyncio.wait_for(replica(3), 10)
        release.set()
        return await first, await second

    try:
        assert asyncio.run(calls()) == (1, 2)
    finally:
        release.set()
        replica.processor.stop(timeout=5.0)


@pytest.mark.parametrize("config,match", [
    ("max_batch_size=8", "config must be a BatchProcessorConfig, got str"),
    ({"max_batch_size": 8}, "config must be a BatchProcessorConfig, got dict"),
])
def test_a_deployment_refuses_what_is_not_a_config_before_importing_ray(config, match,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing it would raise ImportError
    with pytest.raises(TypeError, match=match):
        batched_deployment(_doubling_model, config=config)


def test_a_deployment_checks_a_changed_config_and_its_fields_before_importing_ray(
        monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    config = BatchProcessorConfig()
    config.max_batch_size = 8.0  # type: ignore[assignment]
    with pytest.raises(ConfigTypeError, match=r"max_batch_size must be an integer .* 8\.0"):
        batched_deployment(_doubling_model, config=config)
    with pytest.raises(ValueError, match=r"batch_timeout must be >= 0\.0"):
        batched_deployment(_doubling_model, batch_timeout=-1)


def test_a_deployment_names_an_unknown_keyword_and_the_closest_before_importing_ray(
        monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TypeError) as info:
        batched_deployment(_doubling_model, max_batch_siz=64)
    message = str(info.value)
    assert message.startswith("batched_deployment() got an unexpected keyword argument "
                              "'max_batch_siz' (did you mean 'max_batch_size'?). ")
    assert "BatchProcessorConfig.__init__" not in message
    # Its own keywords and Serve's options are valid names too, and close matches.
    assert "num_replicas" in message and "metrics_name" in message
    with pytest.raises(TypeError, match=r"'num_replica' \(did you mean 'num_replicas'\?\)"):
        batched_deployment(_doubling_model, num_replica=2)
    with pytest.raises(TypeError, match=r"argument 'zzz'\. batched_deployment\(\) takes"):
        batched_deployment(_doubling_model, zzz=1)


@pytest.mark.parametrize("call", [
    lambda: batched_deployment(max_batch_siz=4),
    lambda: batched_deployment(max_batch_siz=4, batch_timeout=-1),
    lambda: batched_deployment(None, max_batch_siz=4),
    lambda: batched_deployment(max_batch_siz=4, config=BatchProcessorConfig()),
])
def test_an_unknown_keyword_is_reported_before_the_missing_model(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TypeError, match=r"^batched_deployment\(\) got an unexpected keyword "
                       r"argument 'max_batch_siz' \(did you mean 'max_batch_size'\?\)"):
        call()


@pytest.mark.parametrize("call", [
    lambda: batched_deployment(),
    lambda: batched_deployment(max_batch_size=4),
    lambda: batched_deployment(None, num_replicas=2),
    lambda: batched_deployment(model=None, batch_timeout=-1),
])
def test_a_deployment_without_its_model_is_refused_before_importing_ray(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TypeError, match=r"^batched_deployment\(\) missing its model: a "
                       r"factory \(a callable returning the batch function\) or "
                       r"'package\.module:factory'$"):
        call()


@pytest.mark.parametrize("model", [5, 1.5, b"pkg.mod:factory", ["pkg.mod:factory"]])
def test_a_model_that_is_neither_a_factory_nor_a_path_is_refused_before_importing_ray(
        monkeypatch, model):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TypeError, match=r"^batched_deployment\(\) model must be a factory "
                       r".*got " + re.escape(repr(model)) + "$"):
        batched_deployment(model)


def test_a_replica_collected_in_a_cycle_stops_its_processor_without_taking_a_lock_there():
    # Serve calls __del__ to shut a replica down, and it stops the processor then. Run by
    # a garbage collection instead (a replica dropped in a reference cycle), on a thread
    # that may hold a lock stop() takes (here the processor's own lifecycle lock), it
    # must not stop it there: the stop goes to a thread of its own.
    import gc

    from waiting import collected_holding, wait_for

    replica = BatchedReplica(lambda: (lambda batch: batch))
    processor = replica.processor
    gc.disable()  # the collection below is the one that finds the replica
    try:
        replica.cycle = replica
        del replica
        assert collected_holding(processor._lifecycle), (
            "the collection deadlocked in the replica's __del__")
    finally:
        gc.enable()
    wait_for(lambda: not processor.running, "the collected replica's processor stopped")
    assert processor.get_stats()["total_processed"] == 0


def test_the_health_check_fails_a_replica_that_cannot_serve_so_serve_replaces_it():
    # It looked at `running` only: a replica whose one worker was stuck in a call that
    # never returns passed it, so Serve never replaced it (health() said not live).
    import threading

    from waiting import wait_for

    release = threading.Event()

    def wedging():
        def model(batch):
            release.wait(30)
            return batch
        return model

    replica = BatchedReplica(wedging, BatchProcessorConfig(
        max_batch_size=4, item_timeout=0.2, max_workers=1, max_retries=0))
    try:
        replica.check_health()  # running and live
        replica.processor.enqueue_predict(np.ones((1, 2), dtype=np.float32))
        wait_for(lambda: not replica.processor.health()["live"], "the call stuck")
        with pytest.raises(RuntimeError) as failed:
            replica.check_health()
        assert str(failed.value) == "batchproc processor is not live (stuck_batches: 1)"
    finally:
        release.set()
        replica.processor.stop(timeout=10)
    with pytest.raises(RuntimeError, match=r"^batchproc processor is not running$"):
        replica.check_health()


@pytest.mark.parametrize("settings,error,match", [
    ({"queue_wait": -1}, ValueError, "queue_wait"),
    ({"queue_wait": float("nan")}, ValueError, "queue_wait"),
    ({"queue_wait": "abc"}, ConfigTypeError, "queue_wait"),
    ({"queue_wait": True}, ConfigTypeError, "queue_wait"),
    ({"decode": 5}, TypeError, "decode must be a callable"),
    ({"encode": None}, TypeError, "encode must be a callable"),
    ({"metrics_name": 5}, TypeError, "metrics_name must be None or a str"),
    ({"name": ""}, TypeError, "name must be a non-empty str"),
])
def test_a_deployment_refuses_its_own_bad_settings_before_importing_ray(settings, error,
                                                                       match, monkeypatch):
    # Accepted, each deployed and then failed every request, or every replica as it
    # started.
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(error, match=match):
        batched_deployment(_doubling_model, **settings)
    if "name" not in settings:  # a replica made directly checks them too
        with pytest.raises(error, match=match):
            BatchedReplica(_doubling_model, **settings)


def _post(replica, body: bytes):
    """``replica`` answering an HTTP POST of ``body`` (JSON) as Serve's proxy hands it
    over: its status code and decoded JSON."""
    import asyncio
    import json

    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    response = asyncio.run(replica(Request(scope, receive)))
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize("body", [
    b"[1, 2]",                  # a row without its batch axis
    b"[]", b"[[]]", b"[[1, 2], [3]]", b'"text"', b'{"x": [[1, 2]]}', b"3",
    b"[[NaN, 1]]", b"[[1e39, 1]]", b"[[1e400, 1]]", b'[["a", 1]]', b'[["1.5", "2"]]',
    b"[[true, false]]", b"[[[1, 2]]]", b"[[" + b"9" * 400 + b", 1]]",
], ids=["flat", "empty", "empty row", "ragged", "str", "no inputs", "number", "nan",
        "beyond float32", "infinity", "not a number", "numeric strings", "booleans",
        "nested", "int beyond a float"])
def test_http_input_the_default_decoding_refuses_is_answered_400_without_a_model_call(body):
    skip_without("service")
    calls = []

    def model():
        return lambda batch: calls.append(batch) or batch * 2

    replica = BatchedReplica(model, BatchProcessorConfig(max_batch_size=4))
    try:
        assert _post(replica, b'{"inputs": [[1, 2]]}') == (200, [[2.0, 4.0]])
        status, answer = _post(replica, body)
        assert status == 400 and answer["detail"].startswith("bad request: "), answer
        assert len(calls) == 1
    finally:
        replica.processor.stop(timeout=5.0)


@pytest.mark.parametrize("value", [b"1e39", b"-1e400", b"9" * 400], ids=["float", "inf", "int"])
def test_http_values_beyond_float32_are_refused_saying_so(value):
    skip_without("service")
    replica = BatchedReplica(_doubling_model, BatchProcessorConfig(max_batch_size=4))
    try:
        assert _post(replica, b"[[" + value + b", 1]]") == (400, {
            "detail": "bad request: values must be finite numbers within float32's range"})
    finally:
        replica.processor.stop(timeout=5.0)


def test_an_http_answer_json_cannot_hold_is_422():
    skip_without("service")
    replica = BatchedReplica(lambda: lambda batch: batch.astype(np.complex64),
                             BatchProcessorConfig(max_batch_size=4), encode=lambda r: r[0, 0])
    try:
        status, answer = _post(replica, b"[[1, 2]]")
        assert status == 422 and answer["detail"].startswith("the model's output has no JSON "
                                                             "form: ")
    finally:
        replica.processor.stop(timeout=5.0)


def test_an_http_answer_that_is_not_finite_is_422_never_nulls():
    skip_without("service")
    def model(batch):
        with np.errstate(divide="ignore", invalid="ignore"):
            return batch / batch[:, :1]

    replica = BatchedReplica(lambda: model, BatchProcessorConfig(max_batch_size=4))
    try:
        assert _post(replica, b"[[1, 2]]") == (200, [[1.0, 2.0]])
        status, answer = _post(replica, b"[[0, 2]]")
        assert status == 422, answer
        assert answer["detail"] == ("the model's output has no JSON form: Out of range float "
                                    "values are not JSON compliant")
    finally:
        replica.processor.stop(timeout=5.0)
