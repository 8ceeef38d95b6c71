"""A model behind batchproc in a FastAPI service.

    pip install ".[service]"
    uvicorn examples.fastapi_service:app --port 8000
    curl -s localhost:8000/predict -H 'content-type: application/json' \\
         -d '{"features": [1, 2, 3, 4, 5, 6, 7, 8]}'

- The processor is started and stopped in the app's lifespan: requests still queued at
  shutdown are finished (or failed) before the server exits.
- ``POST /predict`` is an async endpoint: ``await processor.apredict(x, timeout=...)``
  waits (without blocking the event loop) up to ``queue_wait`` seconds for room in a full
  queue, then answers 503 with ``Retry-After``: the service sheds load instead of letting
  latency grow without bound. Concurrent requests share batches.
- A request's features must be JSON numbers, finite and within float32's range (422
  otherwise: a boolean or a string is not a feature),
  and an output that is not finite is answered 422, never as JSON nulls.
- ``GET /ready`` answers 200 while ``processor.health()["ready"]`` (running, not paused,
  no critical check), 503 otherwise: a readiness probe takes the replica out of rotation.
- ``GET /live`` answers 200 while ``processor.health()["live"]``, 503 once the processor
  cannot serve in this process (every worker stuck in a call that does not return): a
  liveness probe restarts the container.
- ``GET /metrics`` serves the Prometheus exposition (``batchproc.observe.prometheus``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, field_validator

from batchproc import (
    BatchProcessor,
    BatchProcessorConfig,
    ProcessorStoppedError,
    QueueFullError,
)
from batchproc.observe.prometheus import PrometheusMetrics

FEATURES, OUTPUTS = 8, 4


def make_model() -> Callable[[np.ndarray], np.ndarray]:
    """Stands in for a real model: a batch of rows in, a batch of rows out."""
    weights = np.random.default_rng(0).standard_normal((FEATURES, OUTPUTS)).astype(np.float32)

    def model(batch: np.ndarray) -> np.ndarray:
        return batch @ weights

    return model


FLOAT32_MAX = float(np.finfo(np.float32).max)


class PredictRequest(BaseModel):
    # Strict: JSON numbers only (an integer is a float); lax mode would read true as 1.0
    # and "1e3" as 1000.0.
    model_config = ConfigDict(strict=True)
    features: list[float]

    @field_validator("features")
    @classmethod
    def _finite_in_float32(cls, features: list[float]) -> list[float]:
        # The model computes in float32; JSON's 1e400 parses as infinity, and Python's
        # parser accepts NaN and Infinity: refuse them (422) rather than answer nulls.
        if not all(math.isfinite(f) and abs(f) <= FLOAT32_MAX for f in features):
            raise ValueError(f"features must be finite numbers within +-{FLOAT32_MAX:.4g}")
        return features


class PredictResponse(BaseModel):
    output: list[float]


def create_app(model: Callable[[np.ndarray], np.ndarray] | None = None,
               config: BatchProcessorConfig | None = None, *, queue_wait: float = 0.1,
               registry: CollectorRegistry = REGISTRY, name: str = "model") -> FastAPI:
    """The service, with its model, batching settings, how long a request may wait for
    room in a full queue, and the Prometheus registry ``/metrics`` serves."""
    config = config or BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005,
                                            max_queue_size=1024)
    process = model or make_model()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        processor: BatchProcessor[np.ndarray, np.ndarray] = BatchProcessor(
            config, metrics_collector=PrometheusMetrics(name, registry))
        processor.start(process)
        app.state.processor = processor
        try:
            yield
        finally:
            # Drains what is queued; from a thread, since stop() blocks while it drains.
            await asyncio.to_thread(processor.stop, 10.0)

    app = FastAPI(title="batchproc example", lifespan=lifespan)
    retry_after = str(max(1, math.ceil(queue_wait)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which JSON cannot hold when a number in
        # it is not finite: say where and why, without it.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest, request: Request) -> Any:
        processor: BatchProcessor[np.ndarray, np.ndarray] = request.app.state.processor
        if len(body.features) != FEATURES:
            return JSONResponse({"detail": f"expected {FEATURES} features"}, status_code=422)
        x = np.asarray(body.features, dtype=np.float32)[None, :]  # one row
        try:
            out = await processor.apredict(x, timeout=queue_wait)
        except QueueFullError:
            return JSONResponse({"detail": "overloaded, retry later"}, status_code=503,
                                headers={"Retry-After": retry_after})
        except ProcessorStoppedError:
            return JSONResponse({"detail": "shutting down"}, status_code=503,
                                headers={"Retry-After": retry_after})
        if not np.isfinite(out).all():  # JSON has no infinity: never answer nulls
            return JSONResponse({"detail": "the model's output is not finite for this input"},
                                status_code=422)
        return {"output": out[0].tolist()}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        processor: BatchProcessor[Any, Any] = request.app.state.processor
        report = processor.health()
        return JSONResponse(_jsonable(report), status_code=200 if report["ready"] else 503)

    @app.get("/live")
    async def live(request: Request) -> JSONResponse:
        processor: BatchProcessor[Any, Any] = request.app.state.processor
        report = processor.health()
        return JSONResponse(_jsonable(report), status_code=200 if report["live"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


app = create_app()
