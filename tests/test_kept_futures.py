"""A future its caller keeps does not keep its processor, nor the model, alive.

Callers keep futures long after their results came (a cache of results, a list of a
burst's futures, a task's result): a processor stopped and dropped meanwhile, as a
service does when it loads a new model, must be freed with its model, whatever way each
kept future ended and whichever door it came through. A future reaches its processor
only to leave the queue when cancelled, through a weak reference.

A failed future is the one exception, as in Python everywhere: its exception's
traceback holds the frames it passed through, the model's call among them.
"""

import asyncio
import concurrent.futures
import gc
import weakref

import numpy as np
import pytest

import batchproc
from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.errors import ProcessorStoppedError, QueueTimeoutError

ROW = np.ones((1, 4), np.float32)


class Model:
    """The identity, watched through a weak reference."""

    def __call__(self, batch):
        return batch


def _processor():
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=4, batch_timeout=0.001))
    model = Model()
    p.start(model)
    return p, model


def _freed_after_stop(make_futures):
    """Run ``make_futures(processor, model)`` (the futures a caller keeps), stop and drop
    the processor; return whether the processor and the model were freed, and the
    futures (still kept)."""
    p, model = _processor()
    kept = make_futures(p, model)
    p.stop()
    for thread in p._threads():  # a stop that gave up at once leaves them exiting
        thread.join(10)
    refs = [weakref.ref(p), weakref.ref(model)]
    del p, model
    gc.collect()
    return [r() is None for r in refs], kept


def _done(p, model):
    futures = [p.enqueue_predict(ROW) for _ in range(3)] + [p.enqueue_predict(ROW, timeout=5)]
    for f in futures:
        f.result(10)
    return futures


def _cancelled_while_queued(p, model):
    p.pause()
    futures = [p.enqueue_predict(ROW), p.enqueue_predict(ROW, timeout=5)]
    for f in futures:
        assert f.cancel()
    p.resume()
    return futures


def _expired_while_queued(p, model):
    p.pause()
    f = p.enqueue_predict(ROW, max_queue_time=1e-6)
    p.resume()
    assert isinstance(f.exception(10), QueueTimeoutError)
    return [f]


def _failed_by_stop(p, model):
    p.pause()  # queued, never taken: stop gives up on them at once
    futures = [p.enqueue_predict(ROW) for _ in range(8)]
    p.stop(timeout=0)
    return futures


def _from_asyncio(p, model):
    async def main():
        known = p.enqueue_predict_async(ROW)  # ROW is known: the native intake's
        other = p.enqueue_predict_async(np.ones((1, 5), np.float32))  # the Python path
        waited = asyncio.ensure_future(p.apredict(ROW, timeout=5))  # the backpressure path
        await asyncio.gather(known, other, waited)
        return [known, other, waited]

    return asyncio.run(main())


def _cancelled_from_asyncio(p, model):
    async def main():
        p.pause()
        futures = [p.enqueue_predict_async(ROW),
                   p.enqueue_predict_async(np.ones((1, 6), np.float32))]
        for f in futures:
            assert f.cancel()
        p.resume()
        return futures

    return asyncio.run(main())


@pytest.mark.parametrize("make_futures", [
    _done, _cancelled_while_queued, _expired_while_queued, _failed_by_stop,
    _from_asyncio, _cancelled_from_asyncio,
], ids=lambda f: f.__name__.strip("_"))
def test_a_kept_future_keeps_neither_its_processor_nor_its_model(make_futures):
    (processor_freed, model_freed), kept = _freed_after_stop(make_futures)
    assert all(f.done() for f in kept)
    assert processor_freed
    assert model_freed


def test_the_futures_keep_their_outcomes_once_their_processor_is_gone():
    def outcomes(p, model):
        return _done(p, model) + _failed_by_stop(p, model)

    _, kept = _freed_after_stop(outcomes)
    assert [f.result().tolist() for f in kept[:4]] == [ROW.tolist()] * 4
    for f in kept[4:]:
        with pytest.raises(ProcessorStoppedError):
            f.result()


def test_cancelling_a_queued_future_of_a_processor_gone_only_cancels_it():
    # Never started: the requests stay queued until the processor is dropped. No worker
    # will see them: wait() and as_completed() are told at once, as on any cancel.
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=4))
    futures = [p.enqueue_predict(ROW), p.enqueue_predict(ROW, timeout=1),
               p.enqueue_predict([[1.0, 2.0, 3.0, 4.0]])]
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None
    assert all(f.cancel() for f in futures)
    assert all(f.cancelled() for f in futures)
    done, not_done = concurrent.futures.wait(futures, timeout=0)
    assert (len(done), len(not_done)) == (3, 0)
    assert len(list(concurrent.futures.as_completed(futures, timeout=0))) == 3


def test_a_second_cancel_finds_it_cancelled_whether_or_not_its_processor_is_gone():
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=4))
    before, after = p.enqueue_predict(ROW), p.enqueue_predict(ROW)
    assert before.cancel()  # its processor still there: taken out of the queue
    assert p.get_stats()["total_cancelled"] == 1
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None
    assert after.cancel() and after.cancel()
    assert before.cancel()
    done, _ = concurrent.futures.wait([before, after], timeout=0)
    assert len(done) == 2


class Embedder:
    @batchproc.batch(max_batch_size=4, batch_timeout=0.001)
    def embed(self, batch):
        return batch


def test_a_kept_future_of_a_decorated_method_keeps_neither_its_instance_nor_its_model():
    # Pending, a request keeps the instance (which the method needs); done, it must not.
    embedder = Embedder()
    done = embedder.embed.submit(ROW)
    assert done.result(10).tolist() == ROW.tolist()
    embedder.embed.processor.pause()
    cancelled = embedder.embed.submit(ROW)
    assert cancelled.cancel()
    embedder.embed.processor.resume()
    ref = weakref.ref(embedder)
    del embedder
    gc.collect()
    assert ref() is None
    assert done.done() and cancelled.cancelled()
