"""The tests of the module documentation batchproc grew from, run as written.

Only the imports change (``modules.engine.batch_processor`` and ``modules.configs`` read
as ``batchproc``), and ``test_ml_pipeline_integration`` submits 1-D samples to a model
expecting ``(n, features)``, so it sets ``stack_items=True``: an array item's leading
axis counts rows unless ``stack_items`` makes each item one sample (docs/formats.md).
"""

import numpy as np
import pytest

from batchproc import BatchPriority, BatchProcessingStrategy, BatchProcessor, BatchProcessorConfig


class TestBatchProcessor:
    @pytest.fixture
    def basic_config(self):
        return BatchProcessorConfig(
            initial_batch_size=4,
            max_batch_size=16,
            batch_timeout=0.1,
            enable_monitoring=True
        )

    @pytest.fixture
    def processor(self, basic_config):
        processor = BatchProcessor(basic_config)
        yield processor
        processor.stop()

    def test_basic_processing(self, processor):
        """Test basic batch processing functionality"""
        def double_func(batch):
            return batch * 2

        processor.start(double_func)

        # Submit test data
        test_data = np.array([1, 2, 3])
        future = processor.enqueue_predict(test_data)
        result = future.result()

        np.testing.assert_array_equal(result, np.array([2, 4, 6]))

    def test_priority_processing(self):
        """Test priority-based processing"""
        config = BatchProcessorConfig(
            initial_batch_size=2,
            max_batch_size=4,
            enable_priority_queue=True
        )

        processor = BatchProcessor(config)
        processor.start(lambda x: x)

        try:
            # Submit normal and high priority items
            normal_future = processor.enqueue_predict(
                np.array([1]), priority=BatchPriority.NORMAL
            )
            high_future = processor.enqueue_predict(
                np.array([2]), priority=BatchPriority.HIGH
            )

            high_result = high_future.result()
            normal_result = normal_future.result()

            assert high_result[0] == 2
            assert normal_result[0] == 1
        finally:
            processor.stop()

    def test_adaptive_batching(self):
        """Test adaptive batch size adjustment"""
        config = BatchProcessorConfig(
            initial_batch_size=4,
            max_batch_size=16,
            enable_adaptive_batching=True,
            processing_strategy=BatchProcessingStrategy.ADAPTIVE
        )

        processor = BatchProcessor(config)

        # Slow processing function to trigger adaptation
        def slow_func(batch):
            import time
            time.sleep(0.1)  # Simulate slow processing
            return batch

        processor.start(slow_func)

        try:
            initial_size = processor._current_batch_size
            assert initial_size == 4

            futures = []
            for _ in range(10):
                future = processor.enqueue_predict(np.array([1]))
                futures.append(future)

            for future in futures:
                future.result()

            final_size = processor._current_batch_size
            assert 1 <= final_size <= 16
        finally:
            processor.stop()

    def test_error_handling(self, processor):
        """Test error handling and recovery"""
        def error_func(batch):
            if len(batch) > 2:
                raise ValueError("Batch too large")
            return batch

        processor.start(error_func)

        # Small batch should work
        small_future = processor.enqueue_predict(np.array([1]))
        result = small_future.result()
        assert result[0] == 1

        # Large batch should fail
        large_future = processor.enqueue_predict(np.array([1, 2, 3, 4]))
        with pytest.raises(ValueError):
            large_future.result()

    def test_statistics_collection(self, processor):
        """Test statistics and monitoring"""
        processor.start(lambda x: x)

        futures = []
        for i in range(5):
            future = processor.enqueue_predict(np.array([i]))
            futures.append(future)

        for future in futures:
            future.result()

        stats = processor.get_stats()
        assert "avg_processing_time" in stats
        assert "throughput" in stats
        assert "current_batch_size" in stats
        assert stats["throughput"] > 0

    @pytest.mark.asyncio
    async def test_concurrent_processing(self, processor):
        """Test concurrent request handling"""
        import asyncio

        processor.start(lambda x: x * 2)

        async def submit_request(value):
            future = processor.enqueue_predict(np.array([value]))
            return await asyncio.wrap_future(future)

        tasks = [submit_request(i) for i in range(10)]
        results = await asyncio.gather(*tasks)

        for i, result in enumerate(results):
            assert result[0] == i * 2


def test_ml_pipeline_integration():
    """Integration test simulating ML pipeline"""

    class MockMLModel:
        def predict(self, X):
            return X.sum(axis=1, keepdims=True)

    model = MockMLModel()

    config = BatchProcessorConfig(
        initial_batch_size=32,
        max_batch_size=128,
        enable_adaptive_batching=True,
        enable_monitoring=True,
        max_batch_memory_mb=256,
        stack_items=True,
    )

    processor = BatchProcessor(config)
    processor.start(model.predict)

    try:
        test_data = [
            np.random.rand(10) for _ in range(100)
        ]

        futures = []
        for data in test_data:
            future = processor.enqueue_predict(data)
            futures.append(future)

        results = [future.result() for future in futures]

        assert len(results) == 100
        for i, result in enumerate(results):
            expected = test_data[i].sum()
            assert abs(result[0] - expected) < 1e-6

        stats = processor.get_stats()
        assert stats["throughput"] > 0
        assert stats["error_rate"] == 0

    finally:
        processor.stop()


def test_load_and_stress():
    """Stress test under high load"""
    config = BatchProcessorConfig(
        initial_batch_size=16,
        max_batch_size=64,
        enable_adaptive_batching=True
    )

    processor = BatchProcessor(config)
    processor.start(lambda x: x)

    try:
        futures = []
        for _ in range(1000):
            data = np.random.rand(5)
            future = processor.enqueue_predict(data)
            futures.append(future)

        for future in futures:
            future.result()

        stats = processor.get_stats()
        assert stats["total_processed"] == 1000
        print(f"Processed 1000 requests with throughput: {stats['throughput']:.2f}/s")

    finally:
        processor.stop()
