"""Scale out on Ray Serve: each replica batches its own requests with batchproc.

Serve runs the replicas (how many, on which nodes, autoscaling between bounds, restarts,
the HTTP proxy and the handles that route to them); batchproc runs inside each replica,
turning the requests Serve routes to it into batches for the model::

    from ray import serve
    from batchproc.integrations.ray_serve import batched_deployment

    app = batched_deployment("my_models:load_model",     # builds the model in the replica
                             max_batch_size=64, batch_timeout=0.005,
                             num_replicas=2)               # any serve.deployment option
    handle = serve.run(app, route_prefix="/predict")
    handle.remote(x).result()                              # through a handle, or over HTTP

``model`` is a factory called once in each replica (where the weights load), given as a
zero-argument callable or as ``"package.module:attr"``; what it returns is the batch
function (``process_func``). Requests through a handle pass their item as is; over HTTP
the JSON body is ``decode``-d into an item and the result ``encode``-d back (by default a
list of rows becomes a float32 array and an array becomes lists); a body the decoding
refuses is answered 400, an output JSON cannot hold 422. A full queue answers
HTTP with 503 and ``Retry-After``, a handle call with ``QueueFullError``, each after
waiting ``queue_wait`` seconds for room. Serve's own ``max_ongoing_requests`` (5 by
default in Serve, too few to batch) is set to four batches' worth unless given.

``BatchedReplica`` is the replica class, for subclassing (an endpoint of your own,
another health rule) under ``@serve.deployment``.

Ray is imported only here, and only when a deployment is made: ``pip install ".[ray]"``
in a checkout.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import collecting
from ..config import (
    BatchProcessorConfig,
    check_keywords,
    checked_copy,
    keyword_only,
    require_number,
)
from ..errors import ProcessorStoppedError, QueueFullError
from ..processor import BatchProcessor
from .decorator import stop_in_background

ModelFactory = Callable[[], Callable[[Any], Any]]


def decode_rows(body: Any) -> Any:
    """Default HTTP decoding: a JSON list of rows (``[[1, 2], [3, 4]]``), or an object
    whose ``"inputs"`` is one, becomes a float32 array of shape ``(rows, features)``.
    ``ValueError`` (answered 400) for anything else, and for rows of different lengths,
    none, empty ones, or values that are not finite within float32's range (JSON's
    ``1e400`` parses as infinity, and Python's parser takes ``NaN``): the model would
    fail on them, after a search for the bad request that healthy ones wait behind.
    Pass ``decode=`` for other bodies."""
    if isinstance(body, dict) and "inputs" in body:
        body = body["inputs"]
    if not (isinstance(body, list) and body and all(isinstance(row, list) for row in body)):
        raise ValueError('expected a JSON list of rows ([[1.0, 2.0], ...]) or '
                         '{"inputs": [[...], ...]}')
    if not all(type(value) in (int, float) for row in body for value in row):
        # numpy would read "1.5" and true as numbers
        raise ValueError("rows must hold numbers only (not strings, booleans or lists)")
    if not body[0] or any(len(row) != len(body[0]) for row in body):
        raise ValueError("rows must be non-empty lists of numbers of one length")
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: refused below
            rows = np.asarray(body, dtype=np.float32)
    except OverflowError:  # an int beyond even a float's range
        rows = None
    if rows is None or not np.isfinite(rows).all():
        raise ValueError("values must be finite numbers within float32's range")
    return rows


def encode_rows(result: Any) -> Any:
    """Default HTTP encoding: arrays (and tuples/dicts of them) become lists."""
    if isinstance(result, np.ndarray):
        return result.tolist()
    if isinstance(result, dict):
        return {k: encode_rows(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [encode_rows(v) for v in result]
    if isinstance(result, np.generic):
        return result.item()
    return result


def _resolve(model: ModelFactory | str) -> ModelFactory:
    if isinstance(model, str):
        module_name, _, attr = model.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        model = obj
    if not callable(model):
        raise TypeError(f"model must be a factory (a callable) or 'module:attr', got {model!r}")
    return model


class BatchedReplica:
    """A Serve replica holding one model behind one ``BatchProcessor``."""

    def __init__(self, model: ModelFactory | str, config: BatchProcessorConfig | None = None,
                 decode: Callable[[Any], Any] = decode_rows,
                 encode: Callable[[Any], Any] = encode_rows, queue_wait: float = 0.1,
                 metrics_name: str | None = None) -> None:
        check_replica_settings(decode, encode, queue_wait, metrics_name)
        collector = None
        if metrics_name is not None:
            from ..observe.prometheus import PrometheusMetrics

            collector = PrometheusMetrics(metrics_name)
        self.processor: BatchProcessor[Any, Any] = BatchProcessor(config, collector)
        self.processor.start(_resolve(model)())
        self._decode = decode
        self._encode = encode
        self._queue_wait = queue_wait
        self._retry_after = str(max(1, math.ceil(queue_wait)))

    async def __call__(self, request: Any) -> Any:
        """A handle call: the item in, its result out. An HTTP request (a Starlette
        ``Request``): the decoded JSON body in, the encoded result out as JSON."""
        from starlette.requests import Request

        if not isinstance(request, Request):
            return await self.processor.apredict(request, timeout=self._queue_wait)
        from starlette.responses import JSONResponse

        try:
            item = self._decode(await request.json())
        except Exception as exc:
            return JSONResponse({"detail": f"bad request: {exc}"}, status_code=400)
        try:
            result = await self.processor.apredict(item, timeout=self._queue_wait)
        except (QueueFullError, ProcessorStoppedError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503,
                                headers={"Retry-After": self._retry_after})
        encoded = self._encode(result)
        try:
            return JSONResponse(encoded)
        except (ValueError, TypeError) as exc:
            # NaN or infinity (never answered as nulls), a complex number, a numpy scalar
            # encode left as it was, an int of more digits than Python converts.
            return JSONResponse({"detail": f"the model's output has no JSON form: {exc}"},
                                status_code=422)

    def get_stats(self) -> dict[str, Any]:
        """This replica's ``get_stats()``, with its process id as ``replica_pid``."""
        stats = self.processor.get_stats()
        stats["replica_pid"] = os.getpid()
        return stats

    def check_health(self) -> None:
        """Serve's health check, which restarts a replica when it raises: its processor
        stopped, or it can no longer serve in this process (``health()["live"]`` false:
        as many calls stuck past ``item_timeout`` as workers, none returning; workers
        missing). ``RuntimeError`` naming the critical checks."""
        if not self.processor.running:
            raise RuntimeError("batchproc processor is not running")
        health = self.processor.health()
        if not health["live"]:
            critical = ", ".join(f"{name}: {check['value']}"
                                 for name, check in health["checks"].items()
                                 if check["status"] == "critical")
            raise RuntimeError(f"batchproc processor is not live ({critical})")

    def __del__(self) -> None:
        # Serve calls __del__ when it shuts a replica down: finish what is queued. Run by
        # a garbage collection (a replica dropped in a reference cycle), on a thread that
        # may hold a lock stop() takes, the stop goes to a thread of its own.
        processor = getattr(self, "processor", None)
        if processor is None:
            return
        if collecting.on_this_thread():
            stop_in_background(processor)
        else:
            processor.stop(timeout=10.0)


def check_replica_settings(decode: Any, encode: Any, queue_wait: Any,
                           metrics_name: Any) -> None:
    """``TypeError`` unless ``decode`` and ``encode`` are callables and ``metrics_name``
    is None or a string; ``ConfigTypeError``/``ValueError`` unless ``queue_wait`` is a
    finite number of seconds at or above 0. A bad one would deploy, then fail every
    request (or every replica as it starts)."""
    for what, value in (("decode", decode), ("encode", encode)):
        if not callable(value):
            raise TypeError(f"{what} must be a callable, got {value!r}")
    if metrics_name is not None and not isinstance(metrics_name, str):
        raise TypeError(f"metrics_name must be None or a str, got {metrics_name!r}")
    require_number("queue_wait", queue_wait, minimum=0.0)


# What batched_deployment's model is, for its errors.
_A_MODEL = "a factory (a callable returning the batch function) or 'package.module:factory'"
# Serve's deployment options that may be given directly as keywords.
_SERVE_OPTIONS = ("num_replicas", "autoscaling_config", "ray_actor_options",
                  "max_ongoing_requests", "max_queued_requests", "health_check_period_s")


def batched_deployment(model: ModelFactory | str | None = None, *,
                       config: BatchProcessorConfig | None = None,
                       decode: Callable[[Any], Any] = decode_rows,
                       encode: Callable[[Any], Any] = encode_rows, queue_wait: float = 0.1,
                       metrics_name: str | None = None, name: str = "batchproc",
                       deployment_options: dict[str, Any] | None = None,
                       **fields: Any) -> Any:
    """A Serve application (pass it to ``serve.run``) whose replicas batch with batchproc.

    ``fields`` are ``BatchProcessorConfig`` fields (or pass ``config``); Serve options
    (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``,
    ``max_ongoing_requests``, ...) go in ``deployment_options`` or, for the common ones,
    directly as keywords: ``num_replicas``, ``autoscaling_config``, ``ray_actor_options``,
    ``max_ongoing_requests``, ``max_queued_requests``. ``metrics_name`` records the
    Prometheus series of each replica's processor in that replica process's default
    registry, which Ray does not export: serve it from the replica (docs/services.md).

    The settings are checked here, before Ray is imported: ``TypeError`` for a ``config``
    that is not a ``BatchProcessorConfig`` or a keyword that is neither a field nor one
    of these (naming the closest; reported first, as ``batch(...)`` does), or no
    ``model``; ``ValueError`` (`ConfigTypeError` for a wrong
    type) naming the field for a bad setting. Each replica's ``processor.config`` is its
    own read-only copy.
    """
    options = dict(deployment_options or {})
    for key in _SERVE_OPTIONS:
        if key in fields:
            options[key] = fields.pop(key)
    check_keywords("batched_deployment", fields,
                   (*keyword_only(batched_deployment), *_SERVE_OPTIONS))
    # After the keywords: a misspelt one is the more useful error than a model left out.
    if model is None:
        raise TypeError(f"batched_deployment() missing its model: {_A_MODEL}")
    if not (callable(model) or isinstance(model, str)):
        # Refused here, not in every replica at deploy time (a string is imported there).
        raise TypeError(f"batched_deployment() model must be {_A_MODEL}, got {model!r}")
    if config is not None and fields:
        raise TypeError("pass either config or its fields, not both")
    check_replica_settings(decode, encode, queue_wait, metrics_name)
    if not (isinstance(name, str) and name):
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    # Checked (and copied) here, before it sizes the deployment, not in each replica.
    config = BatchProcessorConfig(**fields) if config is None else checked_copy(config)
    from ray import serve

    options.setdefault("max_ongoing_requests", 4 * config.max_batch_size)
    deployment: Any = serve.deployment(BatchedReplica, name=name, **options)
    return deployment.bind(model, config, decode, encode, queue_wait, metrics_name)
