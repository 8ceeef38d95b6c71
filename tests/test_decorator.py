"""@batchproc.batch: a batch function called one item at a time."""

import asyncio
import copy
import dataclasses
import functools
import gc
import inspect
import pickle
import re
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from extras import skip_without

import batchproc
from batchproc import BatchedFunction, BatchedMethod, BatchProcessor, ProcessorStoppedError


@pytest.fixture
def stopped_after():
    """Batched functions made by a test, stopped (and their threads checked) at teardown."""
    made = []
    before = set(threading.enumerate())

    def track(fn):
        made.append(fn)
        return fn

    yield track
    for fn in made:
        fn.stop()
    leaked = [t for t in threading.enumerate()
              if t not in before and t.name.startswith("batchproc") and t.is_alive()]
    assert not leaked, f"threads left behind: {leaked}"


def test_a_function_becomes_a_per_item_callable(stopped_after):
    batches = []

    @batchproc.batch(max_batch_size=8, batch_timeout=0.01)
    def double(items):
        batches.append(len(items))
        return [2 * x for x in items]

    stopped_after(double)
    assert isinstance(double, BatchedFunction)
    assert double.__name__ == "double"
    assert double(21) == 42
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(double, range(200))) == [2 * x for x in range(200)]
    assert sum(batches) == 201
    assert max(batches) <= 8


def test_submit_gives_the_future_and_processor_is_the_processor(stopped_after):
    @batchproc.batch(max_batch_size=4)
    def square(items):
        return [x * x for x in items]

    stopped_after(square)
    processor = square.processor
    assert isinstance(processor, BatchProcessor)
    assert processor.running
    assert processor.config.max_batch_size == 4
    processor.pause()
    futures = [square.submit(i) for i in range(10)]
    assert all(isinstance(f, Future) for f in futures)
    assert not any(f.done() for f in futures)
    processor.resume()
    assert [f.result(10) for f in futures] == [i * i for i in range(10)]
    assert square.processor is processor  # one processor per function


def test_arrays_keep_their_format(stopped_after):
    @batchproc.batch(max_batch_size=64)
    def model(batch):
        assert batch.ndim == 2
        return batch * 10

    stopped_after(model)
    out = model(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert out.tolist() == [[10.0, 20.0], [30.0, 40.0]]


def test_acall_from_a_coroutine(stopped_after):
    @batchproc.batch(max_batch_size=16, max_queue_size=4)
    def inc(items):
        return [x + 1 for x in items]

    stopped_after(inc)

    async def main():
        # 500 from one loop through a queue of 4: acall waits for room, never refuses.
        return await asyncio.gather(*(inc.acall(i) for i in range(500)))

    assert asyncio.run(main()) == [i + 1 for i in range(500)]


def test_cancelling_an_acall_takes_its_request_out_of_the_queue_at_once(stopped_after):
    seen = []

    @batchproc.batch(max_batch_size=4)
    def ident(items):
        seen.extend(items)
        return items

    stopped_after(ident)
    ident.processor.pause()

    async def main():
        doomed = asyncio.ensure_future(ident.acall("doomed"))
        await asyncio.sleep(0)  # its first step has queued the request
        assert ident.processor.get_stats()["queue_size"] == 1
        doomed.cancel()
        stats = ident.processor.get_stats()  # no await since the cancel
        assert (stats["queue_size"], stats["total_cancelled"]) == (0, 1)
        ident.processor.resume()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await ident.acall("kept")

    assert asyncio.run(main()) == "kept"
    assert seen == ["kept"]


def test_an_async_batch_function_runs_on_the_processors_loop(stopped_after):
    loops = set()

    @batchproc.batch(max_batch_size=8, max_workers=2)
    async def fetch(items):
        loops.add(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [f"<{x}>" for x in items]

    stopped_after(fetch)
    assert fetch("a") == "<a>"
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(fetch, "xyz" * 20)) == [f"<{c}>" for c in "xyz" * 20]

    async def main():
        return await asyncio.gather(*(fetch.acall(c) for c in "pq"))

    assert asyncio.run(main()) == ["<p>", "<q>"]
    assert len(loops) == 1  # the processor's loop, not the caller's
    (loop,) = loops
    threads = fetch._threads()
    fetch.stop()
    assert loop.is_closed()
    assert not any(t.is_alive() for t in threads)


def test_failures_reach_the_caller_unwrapped(stopped_after):
    @batchproc.batch(max_batch_size=8, max_retries=0)
    def picky(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return items

    stopped_after(picky)
    assert picky(3) == 3
    with pytest.raises(ValueError, match="negative"):
        picky(-1)


def test_a_method_gets_one_processor_per_instance(stopped_after):
    class Model:
        def __init__(self, scale):
            self.scale = scale
            self.calls = 0

        @batchproc.batch(max_batch_size=32)
        def predict(self, items):
            self.calls += 1
            return [self.scale * x for x in items]

    assert isinstance(Model.__dict__["predict"], BatchedMethod)
    a, b = Model(2), Model(3)
    stopped_after(a.predict)
    stopped_after(b.predict)
    assert a.predict(5) == 10
    assert b.predict(5) == 15
    assert a.predict is a.predict  # bound once, then found in the instance
    assert a.predict.processor is not b.predict.processor
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(a.predict, range(100))) == [2 * x for x in range(100)]
    assert a.calls >= 2
    Model.predict.stop()
    assert not a.predict._processor and not b.predict._processor


def test_a_method_of_an_instance_nothing_holds_is_refused_at_once():
    # Model(3).run(1): the instance is gone before the call queues anything, and its
    # batch could only fail (after every retry, 7 s with the defaults). Refused at once,
    # before a processor is started for it.
    class Model:
        def __init__(self, scale):
            self.scale = scale

        @batchproc.batch(max_batch_size=8)
        def run(self, items):
            return [self.scale * x for x in items]

    before = set(threading.enumerate())
    try:
        for call in (lambda: Model(3).run(1), lambda: Model(3).run.submit(1),
                     lambda: asyncio.run(Model(3).run.acall(1))):
            with pytest.raises(ReferenceError, match="keep the instance"):
                call()
        assert not [t for t in set(threading.enumerate()) - before
                    if t.name.startswith("batchproc")]
        kept = Model(3)
        assert kept.run(1) == 3  # a held instance is served as ever
    finally:
        Model.run.stop()


def test_an_async_method(stopped_after):
    class Service:
        @batchproc.batch(max_batch_size=8)
        async def handle(self, items):
            await asyncio.sleep(0)
            return [len(items)] * len(items)

    svc = Service()
    stopped_after(svc.handle)

    async def main():
        return await asyncio.gather(*(svc.handle.acall(i) for i in range(20)))

    assert all(1 <= n <= 8 for n in asyncio.run(main()))


def test_an_instance_that_goes_away_stops_its_processor():
    class Model:
        @batchproc.batch(max_batch_size=4)
        def predict(self, items):
            return items

    model = Model()
    assert model.predict(1) == 1
    processor = model.predict.processor
    threads = processor._threads()
    ref = weakref.ref(model)
    del model
    assert _collected(ref)  # the workers do not keep the instance alive
    assert _all_exit(threads)
    assert not processor.running


def _collected(ref, timeout=10.0):
    """Collect until ``ref``'s object is gone. A worker drops the last batch it ran
    only after delivering it, so its caller may get there a moment first."""
    deadline = time.monotonic() + timeout
    while ref() is not None:
        assert time.monotonic() < deadline, "still alive"
        gc.collect()
        time.sleep(0.001)
    return True


def _all_exit(threads):
    for thread in threads:
        thread.join(10)
    running = threading.enumerate()
    return not any(t.is_alive() or t in running for t in threads)


def _model_class():
    class Model:
        def __init__(self, factor=1):
            self.factor = factor
            self.me = self  # a reference cycle: only the cyclic collector frees it

        @batchproc.batch(max_batch_size=8)
        def predict(self, items):
            return [self.factor * x for x in items]

    return Model


def test_an_instance_freed_through_a_cycle_stops_its_processor_and_threads():
    model = _model_class()(2)
    assert model.predict(1) == 2
    processor = model.predict.processor
    threads = processor._threads()
    assert {t.name for t in threads} >= {"batchproc-supervisor", "batchproc-worker-1"}
    ref = weakref.ref(model)
    del model
    assert _collected(ref)
    assert _all_exit(threads)
    assert not processor.running and processor.shutdown_event.is_set()


def test_functions_made_at_runtime_and_dropped_stop_their_processors():
    def make(k):
        @batchproc.batch(max_batch_size=4)
        def scale(items):
            return [k * x for x in items]
        return scale

    made = [make(k) for k in (2, 3, 4)]
    assert [fn(1) for fn in made] == [2, 3, 4]
    processors = [fn.processor for fn in made]
    threads = [t for fn in made for t in fn._threads()]
    refs = [weakref.ref(fn) for fn in made]
    del made
    assert all(_collected(ref) for ref in refs)
    assert _all_exit(threads)
    assert not any(p.running for p in processors)


def test_pending_requests_keep_a_dropped_function_alive_until_done(recorder):
    model = recorder()

    def make():
        @batchproc.batch(max_batch_size=8)
        def ident(items):
            return model(items)
        return ident

    fn = make()
    processor = fn.processor
    processor.pause()
    fn.submit("dropped")  # fire and forget: held only by the queue
    kept = [fn.submit(i) for i in range(3)]
    ref = weakref.ref(fn)
    del fn
    gc.collect()
    assert ref() is not None and processor.running  # the queued requests hold it
    threads = processor._threads()
    processor.resume()
    assert [f.result(10) for f in kept] == [0, 1, 2]
    assert model.batches == [["dropped", 0, 1, 2]]
    del kept
    assert _collected(ref)
    assert _all_exit(threads)


def test_pending_requests_keep_a_dropped_instance_alive_until_done():
    model = _model_class()(10)
    processor = model.predict.processor
    processor.pause()
    pending = [model.predict.submit(i) for i in range(3)]

    async def from_a_loop(model):
        task = asyncio.ensure_future(model.predict.acall(5))
        await asyncio.sleep(0)  # queued by its first step
        return task

    async def main():
        nonlocal model
        task = await from_a_loop(model)
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is not None  # the pending requests hold it
        processor.resume()
        return ref, await task

    ref, from_acall = asyncio.run(main())
    # Served by the instance, not failed with ReferenceError for want of it.
    assert [f.result(10) for f in pending] == [0, 10, 20] and from_acall == 50
    threads = processor._threads()
    del pending
    assert _collected(ref)
    assert _all_exit(threads)
    assert not processor.running


def test_a_bound_method_gets_one_processor_per_decoration(stopped_after):
    class Scaler:
        def __init__(self, factor):
            self.factor = factor

        def scale(self, items):
            return [self.factor * x for x in items]

    double, triple = Scaler(2), Scaler(3)
    by_two = stopped_after(batchproc.batch(max_batch_size=4)(double.scale))
    by_three = stopped_after(batchproc.batch(max_batch_size=4)(triple.scale))
    again = stopped_after(batchproc.batch(max_batch_size=4)(double.scale))
    assert isinstance(by_two, BatchedFunction)
    assert (by_two(5), by_three(5), again(5)) == (10, 15, 10)
    assert len({id(f.processor) for f in (by_two, by_three, again)}) == 3


def _static_model(order):
    """A class whose static batch method is decorated in ``order`` (in a class body:
    the qualified name is what marks a method)."""
    if order == "batch over staticmethod":
        class Model:
            @batchproc.batch()
            @staticmethod
            def ident(items):
                return list(items)
    elif order == "staticmethod over batch":
        class Model:
            @staticmethod
            @batchproc.batch()
            def ident(items):
                return list(items)
    else:
        class Model:  # taking only the batch, without @staticmethod: static too
            @batchproc.batch()
            def ident(items):
                return list(items)
    assert Model.__dict__["ident"].__qualname__.endswith("Model.ident")
    return Model


@pytest.mark.parametrize("order", ["batch over staticmethod", "staticmethod over batch",
                                   "a class-body function of the batch alone"])
def test_a_static_method_gets_one_processor_for_its_class(stopped_after, order):
    Model = _static_model(order)
    Sub = type("Sub", (Model,), {})
    fn = stopped_after(Model.ident)
    assert isinstance(fn, BatchedFunction)
    assert (Model.ident("a"), Model().ident("b"), Sub.ident("c"), Sub().ident("d")) == (
        "a", "b", "c", "d")
    assert Model().ident.processor is Sub().ident.processor is fn.processor


def test_a_method_called_on_its_class_uses_the_instances_processor(stopped_after):
    Model = _model_class()
    model = Model(3)
    assert Model.predict(model, 2) == 6 == model.predict(2)
    assert Model.predict.__get__(model).processor is model.predict.processor
    Model.predict.stop()


def test_a_classmethod_is_refused_with_what_to_write_instead():
    what = r"classmethod cannot be batched .* @staticmethod .* method taking self"
    # Under @batch: refused when decorating.
    with pytest.raises(TypeError, match=what):
        class Under:
            @batchproc.batch()
            @classmethod
            def predict(cls, items):
                return items

    # Above @batch, @classmethod wraps what @batch made: refused on first use.
    class Above:
        @classmethod
        @batchproc.batch()
        def predict(cls, items):
            return items

    with pytest.raises(TypeError, match=what):
        Above.predict(1)
    with pytest.raises(TypeError, match=what):
        Above().predict(1)


def _two(items, extra):
    return items


async def _two_async(items, extra):
    return items


def _none():
    return []


def _keyword_needed(items, *, scale):
    return items


@pytest.mark.parametrize("func", [_two, _two_async, _none, _keyword_needed])
def test_a_function_that_cannot_take_the_batch_alone_is_refused_when_decorated(func):
    # Called with the batch alone, it would fail on every call (after its retries).
    with pytest.raises(TypeError, match=rf"@batchproc.batch: {func.__qualname__}\(.*\) must "
                                        r"take the batch as its only argument: the processor"):
        batchproc.batch()(func)


class _Scaler:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, items):
        return [x * self.factor for x in items]


@pytest.mark.parametrize(("func", "name"), [
    (_Scaler(2), "_Scaler.__call__"),
    (functools.partial(_two, extra=1), "partial(_two)"),
    (functools.partial(functools.partial(_two, extra=1)), "partial(_two)"),
    (functools.partial(_Scaler(2)), "partial(_Scaler.__call__)"),
    (_Scaler(2).__call__, "_Scaler.__call__"),
])
def test_a_callable_object_is_named_by_its_class_or_function_not_its_repr(func, name):
    # A repr holds the object's address: a different name for every object.
    assert repr(batchproc.batch()(func)) == f"<batched function {name} (idle)>"


@pytest.mark.parametrize(("func", "name"), [
    (functools.partial(_two, 1, 2), "partial(_two)"),
    (functools.partial(_Scaler(2), [1]), "partial(_Scaler.__call__)")])
def test_a_callable_object_that_cannot_take_the_batch_is_refused_by_its_name(func, name):
    with pytest.raises(TypeError, match=rf"@batchproc.batch: {re.escape(name)}\(\) must take "
                                        r"the batch as its only argument"):
        batchproc.batch()(func)


def test_a_method_that_cannot_take_the_instance_and_the_batch_is_refused():
    with pytest.raises(TypeError, match=r"Model.predict\(self, items, extra\) must take the "
                                        r"instance and the batch as its only arguments"):
        class Model:
            @batchproc.batch()
            def predict(self, items, extra):
                return items


def test_a_method_without_the_batch_is_refused():
    with pytest.raises(TypeError, match=r"Model.predict\(self\) must take the instance and "
                                        r"the batch as its only arguments"):
        class Model:
            @batchproc.batch()
            def predict(self):
                return []


def test_a_static_method_needing_two_arguments_is_refused_not_taken_for_a_method():
    with pytest.raises(TypeError, match=r"Model.predict\(items, scale\) must take the batch "
                                        r"as its only argument"):
        class Model:
            @batchproc.batch()
            @staticmethod
            def predict(items, scale):
                return items


def _supplying(scale):
    """A functools.wraps decorator whose wrapper supplies the wrapped function's
    second argument: the processor calls the wrapper."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(items):
            return fn(items, scale)
        return wrapper
    return decorate


def _needing_context(fn):
    @functools.wraps(fn)
    def wrapper(items, context):
        return fn(items)
    return wrapper


def test_a_wrapped_function_is_checked_as_the_wrapper_takes_its_arguments(stopped_after):
    @_supplying(5)
    def scaled(items, scale):
        return [x * scale for x in items]

    fn = stopped_after(batchproc.batch(max_batch_size=4)(scaled))
    assert fn(2) == 10

    @_needing_context
    def plain(items):
        return items

    with pytest.raises(TypeError, match=r"plain\(items, context\) must take the batch"):
        batchproc.batch()(plain)


def test_a_method_whose_batch_is_optional_or_starred_gets_the_instance(stopped_after):
    class Model:
        def __init__(self, scale):
            self.scale = scale

        @batchproc.batch(max_batch_size=4)
        def optional(self, items=None):
            return [x * self.scale for x in items]

        @batchproc.batch(max_batch_size=4)
        def starred(self, *batches):
            return [x * self.scale for x in batches[0]]

    model = Model(3)
    stopped_after(model.optional)
    stopped_after(model.starred)
    assert model.optional(2) == 6
    assert model.starred(2) == 6


def _defaulted(items, scale=2):
    return [x * scale for x in items]


def _star(*batches):
    return list(batches[0])


@pytest.mark.parametrize("func, expected", [(_defaulted, 6), (_star, 3), (len, None)])
def test_functions_that_take_the_batch_alone_are_accepted(stopped_after, func, expected):
    fn = stopped_after(batchproc.batch(max_batch_size=4)(func))
    if expected is not None:  # len answers one number per batch: only accepted here
        assert fn(3) == expected


def test_a_call_after_stop_raises_instead_of_restarting(stopped_after):
    @batchproc.batch()
    def ident(items):
        return items

    stopped_after(ident)
    first = ident.processor
    assert ident(7) == 7
    ident.stop()
    assert not first.running
    for call in (lambda: ident(7), lambda: ident.submit(7), lambda: ident.processor,
                 lambda: asyncio.run(ident.acall(7))):
        with pytest.raises(ProcessorStoppedError, match="ident was stopped"):
            call()
    assert ident._processor is None and ident._threads() == []
    assert "stopped" in repr(ident)
    ident.stop()  # idempotent


def test_stop_before_the_first_call_is_final_too(stopped_after):
    @batchproc.batch()
    def ident(items):
        return items

    stopped_after(ident)
    ident.stop()
    with pytest.raises(ProcessorStoppedError):
        ident(1)
    assert ident._processor is None


def test_a_stopped_method_refuses_every_instance_also_later_ones(stopped_after):
    Model = _model_class()
    before = Model(2)
    assert before.predict(1) == 2
    stopped_after(before.predict)
    Model.predict.stop()
    with pytest.raises(ProcessorStoppedError):
        before.predict(1)
    later = Model(3)
    stopped_after(later.predict)
    with pytest.raises(ProcessorStoppedError):
        later.predict(1)
    with pytest.raises(ProcessorStoppedError):
        Model.predict(later, 1)


def test_stopping_one_instance_leaves_the_others_running(stopped_after):
    Model = _model_class()
    a, b = Model(2), Model(3)
    stopped_after(a.predict)
    stopped_after(b.predict)
    a.predict.stop()
    with pytest.raises(ProcessorStoppedError):
        a.predict(1)
    assert b.predict(1) == 3
    # Kept until the method is stopped, which stops it then: an instance collected first
    # has its processor stopped on a thread of its own, perhaps after teardown looked.
    later = Model(4)
    assert later.predict(1) == 4  # the method itself was not stopped
    Model.predict.stop()


def test_a_call_after_the_exit_hook_is_refused():
    # In a child interpreter: after the atexit hook stopped every function, a late call
    # (from a hook that runs after it) must not start a processor nobody would stop.
    code = (
        "import atexit\n"
        "atexit.register(lambda: late())  # before batchproc's hook, so it runs after it\n"
        "import batchproc\n"
        "@batchproc.batch(max_batch_size=4)\n"
        "def ident(items):\n"
        "    return items\n"
        "def late():\n"
        "    try:\n"
        "        ident(1)\n"
        "    except batchproc.ProcessorStoppedError:\n"
        "        print('refused', flush=True)\n"
        "    else:\n"
        "        print('restarted', flush=True)\n"
        "print(ident(5), flush=True)\n"
    )
    out = _script_output(code)
    assert out.splitlines() == ["5", "refused"]


def test_an_instance_first_called_after_the_exit_hook_is_refused():
    # A method binds a new processor per instance: one first bound after the hook (a
    # late hook's new instance) must be refused as the functions stopped by it are.
    code = (
        "import atexit\n"
        "atexit.register(lambda: late())  # before batchproc's hook, so it runs after it\n"
        "import batchproc\n"
        "class Model:\n"
        "    @batchproc.batch(max_batch_size=4)\n"
        "    def ident(self, items):\n"
        "        return items\n"
        "def late():\n"
        "    late_model = Model()\n"
        "    try:\n"
        "        late_model.ident(1)\n"
        "    except batchproc.ProcessorStoppedError:\n"
        "        print('refused', flush=True)\n"
        "    else:\n"
        "        print('restarted', flush=True)\n"
        "model = Model()\n"
        "print(model.ident(5), flush=True)\n"
    )
    out = _script_output(code)
    assert out.splitlines() == ["5", "refused"]


def test_a_processor_started_after_the_exit_hook_is_refused():
    # It would never be stopped (its queued work lost), and from CPython 3.12 on its
    # threads cannot start: refused as stopped, not as a thread limit.
    code = (
        "import atexit\n"
        "atexit.register(lambda: late())  # before batchproc's hook, so it runs after it\n"
        "import batchproc\n"
        "def late():\n"
        "    p = batchproc.BatchProcessor(batchproc.BatchProcessorConfig())\n"
        "    try:\n"
        "        p.start(lambda items: items)\n"
        "    except batchproc.ProcessorStoppedError as exc:\n"
        "        print('refused:', exc, flush=True)\n"
        "    else:\n"
        "        print('started', flush=True)\n"
        "p = batchproc.BatchProcessor(batchproc.BatchProcessorConfig())\n"
        "p.start(lambda items: items)\n"
        "print(p.enqueue_predict('5').result(10), flush=True)\n"
    )
    out = _script_output(code)
    assert out.splitlines() == [
        "5", "refused: the interpreter is exiting (batchproc's exit hook has run): no "
        "processor starts now"]


def test_a_processor_stopped_through_its_property_is_final(stopped_after):
    @batchproc.batch(max_batch_size=4)
    def ident(items):
        return items

    stopped_after(ident)
    assert ident(1) == 1
    processor = ident.processor
    processor.stop()
    with pytest.raises(batchproc.ProcessorStoppedError, match="stop\\(\\) is final"):
        ident(2)
    with pytest.raises(batchproc.ProcessorStoppedError):
        ident.processor  # noqa: B018 - the property starts nothing either
    assert processor.get_stats()["total_rejected"] == 1


def test_config_fields_are_checked_when_decorating():
    with pytest.raises(TypeError, match=r"^batch\(\) got an unexpected keyword argument "
                       r"'max_batch_sise' \(did you mean 'max_batch_size'\?\)\. batch\(\) "
                       r"takes BatchProcessorConfig's fields as keywords"):
        batchproc.batch(max_batch_sise=8)
    with pytest.raises(ValueError, match="max_batch_size"):
        batchproc.batch(max_batch_size=0)
    with pytest.raises(TypeError, match="either config or its fields"):
        batchproc.batch(config=batchproc.BatchProcessorConfig(), max_batch_size=4)


@pytest.mark.parametrize(("keywords", "named"), [
    ({"max_batch_siz": 64}, "'max_batch_siz' (did you mean 'max_batch_size'?)"),
    ({"metric_collector": None}, "'metric_collector' (did you mean 'metrics_collector'?)"),
    ({"nothing_like_it": 1}, "'nothing_like_it'. "),
    # An unknown name is reported before a config given with it is refused.
    ({"config": batchproc.BatchProcessorConfig(), "batch_timout": 0.1},
     "'batch_timout' (did you mean 'batch_timeout'?)"),
])
def test_an_unknown_keyword_names_batch_the_closest_setting_and_what_batch_takes(
        keywords, named):
    with pytest.raises(TypeError) as info:
        batchproc.batch(**keywords)
    message = str(info.value)
    assert message.startswith("batch() got an unexpected keyword argument ")
    assert named in message
    assert message.endswith("as keywords (help(batchproc.BatchProcessorConfig) lists them), "
                            "and config, metrics_collector, name")


def test_functions_still_running_at_exit_finish_their_work():
    # A child interpreter: queued work is finished by the atexit hook, not dropped.
    # (Each batch writes its line at once: once stop has closed the queue, a free worker
    # may start the second batch beside the first, whose usual time is not known yet.)
    code = (
        "import batchproc, sys\n"
        "@batchproc.batch(max_batch_size=4)\n"
        "def slow(items):\n"
        "    import time; time.sleep(0.01)\n"
        "    sys.stdout.write(f'batch {len(items)}\\n'); sys.stdout.flush()\n"
        "    return items\n"
        "slow.processor.pause()\n"
        "futures = [slow.submit(i) for i in range(8)]\n"
        "slow.processor.resume()\n"
        "futures[0].add_done_callback(lambda f: None)\n"
        "print('exiting', flush=True)\n"
    )
    out = _script_output(code)
    assert out.startswith("exiting")
    assert sum(int(line.split()[1]) for line in out.splitlines()[1:]) == 8


def test_a_forked_child_starts_its_own_processor():
    # A pre-forking server that called the function before forking: the child must not
    # queue into the parent's processor, whose threads it does not have (it would wait
    # for ever). In a child interpreter, so that the fork leaves this one's threads alone.
    code = (
        "import os, batchproc\n"
        "@batchproc.batch(max_batch_size=4)\n"
        "def double(items):\n"
        "    return [2 * i for i in items]\n"
        "assert double(1) == 2\n"
        "parent = double.processor\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    code = 1\n"
        "    try:\n"
        "        ok = double.submit(3).result(timeout=10) == 6\n"
        "        code = 0 if ok and double.processor is not parent else 2\n"
        "    finally:\n"
        "        os._exit(code)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n"
        "print('parent', double(2), double.processor is parent)\n"
    )
    out = _script_output(code)
    assert out.splitlines() == ["child 0", "parent 4 True"]


TYPED = '''
import numpy as np
import numpy.typing as npt
from concurrent.futures import Future
from typing import Any
import batchproc
from batchproc import BatchProcessor

@batchproc.batch(max_batch_size=8)
def lengths(items: list[str]) -> list[int]:
    return [len(s) for s in items]

@batchproc.batch(max_batch_size=8)
async def alengths(items: list[str]) -> list[int]:
    return [len(s) for s in items]

Array = npt.NDArray[np.float32]

@batchproc.batch(max_batch_size=8)
def model(batch: Array) -> Array:
    return batch

class Service:
    @batchproc.batch(max_batch_size=8)
    def predict(self, items: list[float]) -> list[str]:
        return [str(x) for x in items]

async def use() -> None:
    reveal_type(lengths("abc"))
    reveal_type(await lengths.acall("abc"))
    reveal_type(lengths.submit("abc"))
    reveal_type(lengths.processor)
    reveal_type(alengths("abc"))
    reveal_type(model(np.zeros((1, 2), np.float32)))
    reveal_type(Service().predict(1.0))
    reveal_type(Service.predict)
    lengths(3)
'''


def test_mypy_infers_item_and_result_types(tmp_path):
    skip_without("test")  # mypy
    path = tmp_path / "typed.py"
    path.write_text(TYPED)
    # batchproc's optional integrations import torch and matplotlib for their types:
    # reading them is most of mypy's time, and none of the types revealed here is theirs.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n[mypy-torch.*,matplotlib.*]\nfollow_imports = skip\n")
    # In a child process: mypy raises the garbage collector's thresholds for good in the
    # process it runs in (later load tests would see memory grow).
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--strict",
         "--no-incremental", "--cache-dir", "/dev/null", "--hide-error-context", str(path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path).stdout
    # Written the way mypy 1.x and 2.x both can be read: without "builtins."
    reveals = [line.split("Revealed type is ", 1)[1].strip('"').replace("builtins.", "")
               for line in out.splitlines() if "Revealed type is" in line]
    assert len(reveals) == 8, out
    assert reveals[:5] == [
        "int",
        "int",
        "concurrent.futures._base.Future[int]",
        "batchproc.processor.BatchProcessor[str, int]",
        "int",
    ], out
    assert reveals[5].startswith("numpy.ndarray[") and "32" in reveals[5], out
    assert reveals[6:] == [
        "str",
        "batchproc.integrations.decorator.BatchedMethod[typed.Service, float, str]",
    ], out
    # The only error: an int where the function takes str items.
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and '"BatchedFunction"' in errors[0], out
    assert 'type "int"; expected "str"' in errors[0], out


def test_without_parentheses_the_error_says_how_to_write_it():
    def lengths(items):
        return [len(s) for s in items]

    with pytest.raises(TypeError, match=r"@batchproc.batch\(\)"):
        batchproc.batch(lengths)


def test_a_config_given_positionally_is_refused_showing_the_keyword():
    with pytest.raises(TypeError, match=re.escape(
            "batch takes its config as a keyword: "
            "@batchproc.batch(config=BatchProcessorConfig(...))")):
        batchproc.batch(batchproc.BatchProcessorConfig(max_batch_size=8))


def _script_output(code: str) -> str:
    """What a fresh interpreter running ``code`` prints (it must exit 0)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def test_a_config_changed_into_a_bad_value_is_refused_when_decorating():
    config = batchproc.BatchProcessorConfig()
    config.batch_timeout = "x"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="batch_timeout"):
        batchproc.batch(config=config)


def test_the_decorator_keeps_its_own_copy_of_the_config():
    config = batchproc.BatchProcessorConfig(max_batch_size=4)

    @batchproc.batch(config=config)
    def double(items):
        return [2 * item for item in items]

    try:
        config.max_batch_size = 0
        config.batch_timeout = "x"  # type: ignore[assignment]
        assert double.submit(3).result(timeout=10) == 6  # makes the processor
        assert double.processor.config.max_batch_size == 4
        assert double.processor.config.batch_timeout == 0.1
    finally:
        double.stop()


def test_the_decorated_functions_processor_config_is_read_only():
    @batchproc.batch(max_batch_size=4)
    def double(items):
        return [2 * item for item in items]

    try:
        config = double.processor.config
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot set max_batch_size"):
            config.max_batch_size = 8
        assert double.processor.config.max_batch_size == 4
        # A config taken from it decorates another function, and stays the caller's.
        variant = dataclasses.replace(config, max_batch_size=2)
        variant.batch_timeout = 0.01

        @batchproc.batch(config=variant)
        def triple(items):
            return [3 * item for item in items]

        try:
            assert triple(2) == 6
            assert (triple.processor.config.max_batch_size,
                    triple.processor.config.batch_timeout) == (2, 0.01)
            variant.max_batch_size = 1  # the caller's object: changeable, changes nothing
            assert triple.processor.config.max_batch_size == 2
        finally:
            triple.stop()
        identity = batchproc.batch(config=config)(lambda items: items)
        try:
            assert identity(5) == 5
        finally:
            identity.stop()
    finally:
        double.stop()


@pytest.mark.parametrize("config", ["max_batch_size=4", {"max_batch_size": 4}, 4])
def test_a_config_that_is_not_a_config_is_refused_when_decorating(config):
    with pytest.raises(TypeError, match="config must be a BatchProcessorConfig, got "):
        batchproc.batch(config=config)


# -- methods: subclasses, copies, pickles ---------------------------------------------


class _Base:
    @batchproc.batch(max_batch_size=4)
    def predict(self, items):
        return [("base", x) for x in items]


class _Overrides(_Base):
    def predict(self, item):  # a plain override that calls the batched one
        return ("child", super().predict(item))


class _BatchedToo(_Base):
    @batchproc.batch(max_batch_size=4)
    def predict(self, items):
        return [("batched too", x) for x in items]


class _Multiplier:
    def __init__(self, k):
        self.k = k

    @batchproc.batch(max_batch_size=4)
    def scale(self, items):
        return [self.k * x for x in items]


@batchproc.batch(max_batch_size=4)
def module_level_double(items):
    return [2 * x for x in items]


def test_a_subclass_override_is_not_hidden_by_the_batched_method_it_calls():
    child = _Overrides()
    try:
        assert child.predict(1) == ("child", ("base", 1))
        assert child.predict(2) == ("child", ("base", 2))  # the override still runs
    finally:
        _Base.predict.__get__(child).stop()


def test_each_class_s_batched_method_runs_on_an_instance_whichever_ran_first():
    for first in ("base", "subclass"):
        obj = _BatchedToo()
        try:
            if first == "base":
                assert _Base.predict(obj, 1) == ("base", 1)
            assert obj.predict(1) == ("batched too", 1)
            assert _Base.predict(obj, 1) == ("base", 1)
            assert obj.predict(2) == ("batched too", 2)
        finally:
            _Base.predict.__get__(obj).stop()
            obj.predict.stop()


def test_a_copy_of_an_instance_binds_its_own_processor():
    a = _Multiplier(2)
    try:
        assert a.scale(1) == 2
        b = copy.copy(a)
        b.k = 3
        assert b.scale(1) == 3
        assert b.scale is not a.scale and b.scale.processor is not a.scale.processor
        c = copy.deepcopy(a)
        c.k = 5
        assert c.scale(1) == 5 and c.scale.processor is not a.scale.processor
        ref = weakref.ref(a)
        del a
        assert _collected(ref)
        assert b.scale(2) == 6  # the original gone: the copy is not
    finally:
        for obj in (b, c):  # (not _Multiplier.scale.stop(): final for the class's later ones)
            obj.scale.stop()


def test_an_instance_used_once_pickles_and_binds_anew_when_unpickled():
    a = _Multiplier(4)
    try:
        assert a.scale(1) == 4
        b = pickle.loads(pickle.dumps(a))
        assert b.k == 4 and b.scale(2) == 8
        assert b.scale.processor is not a.scale.processor
        threads = b.scale._threads()
        ref = weakref.ref(b)
        del b  # the unpickled binding holds its instance: a cycle, collected as one
        assert _collected(ref)
        assert _all_exit(threads)
    finally:
        a.scale.stop()


def test_a_batched_method_pickles_with_its_instance_as_a_bound_method_does():
    a = _Multiplier(3)
    b = None
    try:
        assert a.scale(1) == 3
        b, method = pickle.loads(pickle.dumps((a, a.scale)))
        assert method is b.scale and method(2) == 6  # the unpickled instance's own
        assert method.processor is not a.scale.processor
        alone = pickle.loads(pickle.dumps(a.scale))  # its instance, unpickled, held by none
        with pytest.raises(ReferenceError, match="unpickled without its instance"):
            alone(1)
    finally:
        a.scale.stop()
        if b is not None:
            b.scale.stop()


def test_a_batched_method_reached_through_super_pickles_as_the_base_s():
    child = _Overrides()
    copy_of_child = None
    try:
        assert child.predict(1) == ("child", ("base", 1))
        copy_of_child, base_method = pickle.loads(
            pickle.dumps((child, _Base.predict.__get__(child))))
        assert base_method(2) == ("base", 2)
        assert copy_of_child.predict(3) == ("child", ("base", 3))
    finally:
        _Base.predict.__get__(child).stop()
        if copy_of_child is not None:
            _Base.predict.__get__(copy_of_child).stop()


class _Pinned:
    __slots__ = ("__dict__",)  # no __weakref__: its binding holds it

    def __init__(self):
        self.k = 2

    @batchproc.batch(max_batch_size=4)
    def scale(self, items):
        return [self.k * x for x in items]


class _Late:
    pass


class _Donor:
    def negate(self, items):
        return [-x for x in items]


# Under another name than the function's, and no __set_name__ tells the descriptor.
_Late.scale = batchproc.batch(max_batch_size=4)(_Donor.negate)


@pytest.mark.parametrize("kind", [_Pinned, _Late], ids=["no weakref", "assigned later"])
def test_instances_of_every_kind_pickle_with_their_methods(kind):
    a = kind()
    b = None
    try:
        first = a.scale(1)
        b, method = pickle.loads(pickle.dumps((a, a.scale)))
        assert method is b.scale and method(1) == first
        assert pickle.loads(pickle.dumps(a)).scale is not a.scale
    finally:
        a.scale.stop()
        if b is not None:
            b.scale.stop()


def test_an_unpickled_instance_dropped_is_freed_at_once_with_its_processor():
    a = _Multiplier(4)
    try:
        assert a.scale(1) == 4
        gc.disable()  # freed by its reference count: no cycle waits for a collection
        try:
            b = pickle.loads(pickle.dumps(a))
            assert b.scale(2) == 8
            threads = b.scale._threads()
            ref = weakref.ref(b)
            del b
            assert ref() is None
        finally:
            gc.enable()
        assert _all_exit(threads)
    finally:
        a.scale.stop()


def test_the_worker_that_answered_a_method_call_holds_no_reference_to_its_instance():
    # The worker that completed a call's future may still hold it (here: in a done
    # callback) after the caller woke with its result; the instance dropped then is
    # freed at once all the same.
    b = _Multiplier(3)
    bound = b.scale
    assert b.scale(1) == 3  # starts its processor
    processor = bound._processor
    threads = bound._threads()
    in_callback, release = threading.Event(), threading.Event()

    def hold(_future):
        in_callback.set()
        release.wait(10)

    def submit_held(item, timeout, priority, submit=bound._submit):
        processor.pause()  # the callback goes on before the worker can complete it
        future = submit(item, timeout, priority)
        future.add_done_callback(hold)
        processor.resume()
        return future

    bound._submit = submit_held  # what a call submits through
    del submit_held  # the function holds it, and it the function: one cycle
    ref = weakref.ref(b)
    gc.disable()  # freed by its reference count: no cycle waits for a collection
    try:
        assert b.scale(2) == 6
        assert in_callback.wait(10)  # the worker holds the completed future
        del b, bound
        assert ref() is None
    finally:
        release.set()
        gc.enable()
    gc.collect()  # the function and the wrapper set on it hold each other
    assert _all_exit(threads)  # and its processor stopped with it


def test_a_deep_copied_graph_holding_a_method_holds_it_bound_to_the_copy():
    a, b = _Multiplier(1), _Multiplier(2)
    a.other, b.other = b, a
    a.fn = b.scale
    a2 = copy.deepcopy(a)
    try:
        assert a2.fn._bound_instance() is a2.other and a2.other is not b
        assert a2.fn(3) == 6
        b.scale.stop()
        assert a2.fn(4) == 8  # the original's stop is not the copy's
    finally:
        a2.other.scale.stop()
        a.scale.stop()


def test_one_function_decorated_twice_in_a_class_keeps_two_bindings():
    class Model:
        def _embed(self, items):
            return list(items)

        small = batchproc.batch(max_batch_size=2)(_embed)
        big = batchproc.batch(max_batch_size=64)(_embed)

    model = Model()
    try:
        small = model.small
        assert model.big(1) == 1 and model.small(2) == 2
        assert model.small is small and model.big.processor is not small.processor
    finally:
        Model.small.stop()
        Model.big.stop()


def test_completed_requests_keep_no_dropped_binding_s_processor_alive():
    model = _Multiplier(3)
    before = {t for t in threading.enumerate() if t.name.startswith("batchproc")}
    done = []
    for i in range(5):
        done.append(model.scale.submit(i))
        assert done[-1].result(10) == 3 * i
        model.__dict__.clear()  # the binding goes: its processor must stop
        model.k = 3
    gc.collect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {t for t in threading.enumerate()
                if t.name.startswith("batchproc") and t.is_alive()} - before
        if not left:
            break
        time.sleep(0.01)
    assert not left, left
    assert all(f.done() for f in done)


@pytest.mark.parametrize("func", [functools.partial(lambda k, items: items, 2),
                                  type("Callable", (), {"__call__": lambda s, items: items})()],
                         ids=["partial", "callable object"])
def test_a_batched_partial_or_callable_object_says_it_cannot_pickle(func):
    batched = batchproc.batch(max_batch_size=4)(func)
    with pytest.raises(pickle.PicklingError, match="pickles by reference"):
        pickle.dumps(batched)


def test_pending_requests_keep_their_method_s_binding_even_if_the_instance_drops_it():
    model = _Multiplier(5)
    processor = model.scale.processor
    processor.pause()
    futures = [model.scale.submit(i) for i in range(3)]
    model.__dict__.clear()  # the binding leaves the instance: the requests still hold it
    model.k = 5
    gc.collect()
    processor.resume()
    try:
        assert [f.result(10) for f in futures] == [0, 5, 10]
    finally:
        processor.stop()


def test_methods_of_classes_alike_in_name_but_not_module_keep_their_own_bindings():
    def model_class(module, base=object):
        def embed(self, items):
            return [(module, x) for x in items]
        embed.__module__ = module
        embed.__qualname__ = "Model.embed"
        return type("Model", (base,), {"embed": batchproc.batch(max_batch_size=4)(embed),
                                       "__module__": module})

    base = model_class("pkg_a")
    sub = model_class("pkg_b", base)
    model = sub()
    try:
        assert model.embed(1) == ("pkg_b", 1)
        first = model.embed
        assert base.embed(model, 2) == ("pkg_a", 2)
        assert model.embed(3) == ("pkg_b", 3) and model.embed is first  # not bound anew
    finally:
        model.embed.stop()
        base.embed.__get__(model).stop()


def test_a_processor_stopped_through_its_property_reads_stopped(stopped_after):
    @batchproc.batch(max_batch_size=4)
    def ident(items):
        return items

    stopped_after(ident)
    ident(1)
    ident.processor.stop()
    assert "(stopped)" in repr(ident)


def test_a_dropped_function_s_stop_in_the_background_survives_no_thread_to_start(monkeypatch):
    # At exit on CPython 3.12+ no thread starts: the exit hook stops it instead.
    from batchproc.integrations.decorator import stop_in_background

    p = BatchProcessor(batchproc.BatchProcessorConfig())
    p.start(lambda items: items)

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    try:
        stop_in_background(p)  # no error
    finally:
        monkeypatch.undo()
        p.stop()


def test_a_module_level_function_pickles_by_reference():
    assert pickle.loads(pickle.dumps(module_level_double)) is module_level_double
    try:
        assert module_level_double(3) == 6
    finally:
        module_level_double.stop()


def test_a_function_made_at_runtime_that_names_itself_is_collected():
    def make(k):
        @batchproc.batch(max_batch_size=4)
        def scale(items):
            assert scale.name  # the body refers to the decorated function itself
            return [k * x for x in items]
        return scale

    fn = make(2)
    assert fn(1) == 2
    threads = fn._threads()
    ref = weakref.ref(fn)
    del fn
    assert _collected(ref)
    assert _all_exit(threads)


def test_timeout_and_priority_are_keywords_so_a_second_input_is_refused():
    # f(a, b) reads as two inputs: it must not run f(a) with b as its timeout.
    @batchproc.batch(max_batch_size=4, batch_timeout=0.001)
    def double(items):
        return [2 * x for x in items]

    class Tripler:
        @batchproc.batch(max_batch_size=4, batch_timeout=0.001)
        def scale(self, items):
            return [3 * x for x in items]

    m = Tripler()
    try:
        calls = [(lambda: double(1, 2), "double()"),
                 (lambda: double.submit(1, 2), "double.submit()"),
                 (lambda: asyncio.run(double.acall(1, 2)), "double.acall()"),
                 (lambda: m.scale(1, 2), "Tripler.scale()"),
                 (lambda: Tripler.scale(m, 1, 2), "Tripler.scale()")]
        for call, called in calls:
            with pytest.raises(TypeError) as info:
                call()
            assert (f"{called} takes one item, got 2 positional arguments: a batched "
                    "function is called with one item") in str(info.value)  # qualified name
            assert "timeout= and priority= are keywords" in str(info.value)
        assert double(1, timeout=2, priority=batchproc.BatchPriority.HIGH) == 2
        assert double.submit(1, timeout=2).result(10) == 2
        assert asyncio.run(double.acall(1, timeout=2)) == 2
        assert m.scale(1, timeout=2) == 3
        assert Tripler.scale(m, 1, timeout=2) == 3
    finally:
        double.stop()
        Tripler.scale.stop()


def test_a_method_on_its_instance_shows_as_the_method_bound():
    # As Python shows a bound method: its name, docstring and signature without self;
    # not those of the call that reaches the instance weakly.
    class Scorer:
        @batchproc.batch(max_batch_size=4, batch_timeout=0.001)
        def score(self, items: list[int]) -> list[int]:
            """One score per item."""
            return [len(str(x)) for x in items]

        @batchproc.batch(max_batch_size=4, batch_timeout=0.001)
        async def ascore(self, items: list[int], /) -> list[int]:
            """The same, async."""
            return [len(str(x)) for x in items]

    s = Scorer()
    try:
        for method, name, doc in [(s.score, "score", "One score per item."),
                                  (s.ascore, "ascore", "The same, async.")]:
            assert (method.__name__, method.__doc__) == (name, doc)
            assert method.__qualname__.endswith(f"Scorer.{name}")
            assert list(inspect.signature(method).parameters) == ["items"]
            assert inspect.signature(method).return_annotation == list[int]
        assert s.score(123) == 3
        ref = weakref.ref(s)
        del s, method
        gc.collect()
        assert ref() is None  # what it shows holds no instance
    finally:
        Scorer.score.stop()
        Scorer.ascore.stop()


@pytest.mark.parametrize("name", [3, b"f", ["f"]])
def test_a_name_that_is_not_a_str_is_refused_when_decorating(name):
    with pytest.raises(TypeError, match="name must be a str"):
        batchproc.batch(name=name)
