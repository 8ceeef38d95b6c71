"""A processor inherited by a forked child refuses requests at once, with an error that
says why, instead of queueing them for workers that did not survive the fork. Each test
forks a real child, which reports through a pipe and leaves with os._exit."""

import asyncio
import json
import os
import select
import signal
import time
import traceback
import warnings

import numpy as np
import pytest
from extras import skip_without

import batchproc.processor
from batchproc import ProcessorForkedError, ProcessorStoppedError, shielded

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

HANG = 20.0  # seconds: a guard against a hung child, never a speed assertion


def in_child(body):
    """Run ``body()`` in a forked child; return what it returned (JSON), or fail with
    the child's traceback. A child that hangs is killed after HANG seconds."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock the child:
        # what these tests check is that batchproc's part of it does not.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            try:
                payload = {"ok": body()}
            except BaseException:
                payload = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(payload).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + HANG
    try:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(0.0, remaining))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the forked child hung for {HANG} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in payload, payload.get("error")
    assert "ok" in payload, "the child reported nothing"
    return payload["ok"]


def refusal(call):
    try:
        call()
    except ProcessorForkedError as exc:
        return {"type": "ProcessorForkedError", "stopped": isinstance(exc, ProcessorStoppedError),
                "message": str(exc)}
    except BaseException as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def test_a_started_processor_refuses_in_a_forked_child(make_processor):
    p = make_processor(lambda batch: batch, max_workers=2)
    assert p.enqueue_predict(["warm"]).result(timeout=HANG) == ["warm"]
    parent = os.getpid()

    def child():
        started = time.monotonic()
        report = p.health()
        out = {
            "predict": refusal(lambda: p.enqueue_predict(["x"])),
            "start": refusal(lambda: p.start(lambda batch: batch)),
            "stats": refusal(p.get_stats),
            "async": refusal(lambda: asyncio.run(_submit_async(p))),
            "health": [report["state"], report["ready"], report["live"], report["status"]],
            "running": p.running,
        }
        p.enqueue(["fire and forget"])  # refused, logged, never raised
        p.pause()
        p.resume()
        p.stop(timeout=HANG)  # the parent's queue and threads: not touched, no wait
        out["seconds"] = time.monotonic() - started
        return out

    out = in_child(child)
    predict = out["predict"]
    assert predict["type"] == "ProcessorForkedError" and predict["stopped"]
    assert "fork" in predict["message"] and str(parent) in predict["message"]
    assert out["start"]["type"] == "ProcessorForkedError"
    assert out["stats"]["type"] == "ProcessorForkedError"
    assert out["async"]["type"] == "ProcessorForkedError"
    assert out["health"] == ["forked", False, False, "unhealthy"]
    assert out["running"] is False
    assert out["seconds"] < HANG / 2  # nothing waited for a thread of the parent
    # The parent's processor is untouched by its child's fork.
    assert p.running and p.health()["state"] == "running"
    assert p.enqueue_predict(["after"]).result(timeout=HANG) == ["after"]


def test_a_forked_child_inherits_no_callbacks_thread(make_processor):
    # The parent's callbacks thread (done-callbacks of the requests its supervisor
    # failed) runs a callback as the fork happens: the child has no such thread, keeps no
    # reference to it, and its stop() waits for nothing.
    import threading

    p = make_processor(lambda batch: batch, max_workers=1)
    p.pause()
    entered, release, ran_on = threading.Event(), threading.Event(), []

    def blocking(future):
        ran_on.append(threading.current_thread().name)
        entered.set()
        release.wait(HANG)

    p.enqueue_predict(["expires"], max_queue_time=0.05).add_done_callback(blocking)
    try:
        assert entered.wait(HANG)
        assert ran_on == ["batchproc-callbacks"]

        def child():
            started = time.monotonic()
            names = [t.name for t in p._threads()]
            p.stop(timeout=HANG)
            return {"names": names, "seconds": time.monotonic() - started}

        out = in_child(child)
    finally:
        release.set()
    assert "batchproc-callbacks" not in out["names"]
    assert out["seconds"] < HANG / 2
    p.resume()
    assert p.enqueue_predict(["after"]).result(timeout=HANG) == ["after"]


async def _submit_async(p):
    return await p.enqueue_predict_async(["x"])


def test_an_async_model_processor_refuses_in_a_forked_child(make_processor):
    async def model(batch):
        return batch

    p = make_processor(model)
    assert p.enqueue_predict(["warm"]).result(timeout=HANG) == ["warm"]
    out = in_child(lambda: refusal(lambda: p.enqueue_predict(["x"])))
    assert out["type"] == "ProcessorForkedError"
    assert p.enqueue_predict(["after"]).result(timeout=HANG) == ["after"]


def test_a_processor_never_started_before_the_fork_serves_in_the_child(make_processor):
    # gunicorn --preload: built at import in the parent, started in each worker.
    p = make_processor(max_workers=2)

    def child():
        p.start(lambda batch: [x * 2 for x in batch])
        try:
            return p.enqueue_predict(21).result(timeout=HANG)
        finally:
            p.stop(timeout=HANG)

    assert in_child(child) == 42
    assert p.health()["state"] == "new"  # the parent's copy was never started


def test_intake_makes_no_system_call_to_notice_a_fork(make_processor, monkeypatch):
    p = make_processor(lambda batch: batch)

    def no_getpid():
        raise AssertionError("os.getpid() on the request path")

    monkeypatch.setattr(batchproc.processor.os, "getpid", no_getpid)
    assert p.enqueue_predict(["x"]).result(timeout=HANG) == ["x"]


def test_a_prometheus_scrape_in_a_forked_child_leaves_out_the_parents_processor(
        make_processor):
    # gunicorn's preload: the child serves /metrics before (or without) a processor of its
    # own; the inherited one's gauges read a queue that is not the child's, and asking it
    # raised ProcessorForkedError, which failed the whole scrape.
    skip_without("prometheus")
    from prometheus_client import CollectorRegistry, generate_latest

    from batchproc.observe.prometheus import PrometheusMetrics

    registry = CollectorRegistry()
    p = make_processor(lambda batch: batch, metrics_collector=PrometheusMetrics("svc", registry))
    p.enqueue_predict("x").result(timeout=HANG)
    assert b'batchproc_queue_depth{processor="svc"}' in generate_latest(registry)

    def child():
        text = generate_latest(registry).decode()
        return {"counted": 'batchproc_requests_total{outcome="completed",processor="svc"}'
                           in text, "gauge": "batchproc_queue_depth{" in text}

    assert in_child(child) == {"counted": True, "gauge": False}


def test_a_forked_child_keeps_a_standby_thread_of_its_own(monkeypatch):
    # The thread parked for the exit hook (CPython 3.12+) stays in the parent at a fork.
    monkeypatch.setattr(shielded, "THREADS_AT_EXIT", False)
    monkeypatch.setattr(shielded, "_standby", None)
    shielded.keep_standby()
    parents = shielded._standby

    def child():
        shielded.keep_standby()
        own = shielded._standby
        return own is not parents and own.pid == os.getpid()

    assert in_child(child) is True


def test_a_fork_while_another_thread_keeps_the_standby_lock_does_not_hang_the_child(
        monkeypatch):
    monkeypatch.setattr(shielded, "THREADS_AT_EXIT", False)
    monkeypatch.setattr(shielded, "_standby", None)
    with shielded._standby_lock:  # as a thread starting the standby holds it at the fork

        def child():
            shielded.keep_standby()  # would wait for ever on the lock copied held
            return shielded._standby is not None

        assert in_child(child) is True


def test_a_child_forked_from_a_coroutine_serves_its_own_loop(make_processor):
    # A processor made (and used from asyncio, before start) in the parent, started in
    # a child forked from inside a coroutine: the child's requests go to the child's
    # loop, not to the parent's loop the child inherited.
    row = np.zeros((1, 4), np.float32)
    later = make_processor()

    def child():
        async def main():
            later.start(lambda batch: batch + 1)
            return (await asyncio.wait_for(later.enqueue_predict_async(row), 10)).tolist()

        return asyncio.run(main())

    async def parent():
        queued = later.enqueue_predict_async(row)  # the parent's loop, used last
        try:
            return in_child(child)
        finally:
            queued.cancel()

    assert asyncio.run(parent()) == [[1.0] * 4]
