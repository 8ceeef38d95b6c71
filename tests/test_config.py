"""BatchProcessorConfig defaults, validation and the small public value types."""

import copy
import dataclasses
import datetime
import math
import pickle
import re
import threading
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from batchproc import (
    BatchPriority,
    BatchProcessingStrategy,
    BatchProcessor,
    BatchProcessorConfig,
    ConfigTypeError,
    PrioritizedItem,
    ProcessorStoppedError,
)
from batchproc._native import request_queue, rolling_window
from batchproc.config import FIELD_NAMES, MAX_SECONDS, MAX_WORKERS, check_keywords

DESIGN_DEFAULTS = dict(
    initial_batch_size=32, min_batch_size=1, max_batch_size=128, batch_timeout=0.1,
    item_timeout=30.0, max_queue_size=1000, enable_priority_queue=False, max_workers=4,
    min_batch_interval=0.0, max_batch_memory_mb=None, enable_memory_optimization=True,
    gc_batch_threshold=100, memory_warning_threshold=80.0, memory_critical_threshold=90.0,
    enable_adaptive_batching=True, processing_strategy=BatchProcessingStrategy.ADAPTIVE,
    reduce_batch_on_failure=True, enable_monitoring=True, monitoring_window=1000,
    enable_health_monitoring=True, health_check_interval=30.0, queue_warning_threshold=500,
    queue_critical_threshold=800, max_retries=3, retry_delay=1.0, debug_mode=False,
    stack_items=False,
    # Batch formats (docs/formats.md)
    pad_value=None, pad_to_multiple_of=None, max_batch_tokens=None, per_token_outputs=False,
    item_size=None,
    # Failure scheduling and deadlines (issue 11).
    retry_on=(Exception,), max_queue_time=None, max_priority_wait=None,
)


def test_defaults_are_the_documented_ones():
    config = BatchProcessorConfig()
    assert dataclasses.asdict(config) == DESIGN_DEFAULTS
    assert {f.name for f in dataclasses.fields(config)} == set(DESIGN_DEFAULTS)


def test_keyword_arguments_only_change_what_they_name():
    config = BatchProcessorConfig(max_batch_size=256, batch_timeout=0.01)
    assert config.max_batch_size == 256 and config.batch_timeout == 0.01
    assert config.initial_batch_size == 32


@pytest.mark.parametrize("field,value", [
    ("initial_batch_size", 0), ("min_batch_size", 0), ("max_batch_size", 0),
    ("max_batch_size", -5), ("max_queue_size", 0), ("max_workers", 0),
    ("monitoring_window", 0), ("gc_batch_threshold", 0), ("queue_warning_threshold", 0),
    ("batch_timeout", -0.1), ("item_timeout", -1.0), ("item_timeout", 0.0),
    ("min_batch_interval", -1.0), ("retry_delay", -1.0), ("health_check_interval", 0.0),
    ("max_retries", -1), ("max_batch_memory_mb", 0), ("max_batch_memory_mb", -1),
    ("memory_warning_threshold", 101.0), ("memory_critical_threshold", 100.5),
    ("memory_warning_threshold", -1.0), ("batch_timeout", float("nan")),
    ("max_batch_size", 2.5), ("max_workers", True), ("enable_priority_queue", "yes"),
    ("processing_strategy", "sideways"),
])
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BatchProcessorConfig(**{field: value})


# Every number field counted in seconds, percent or MiB: with the switch it needs on, and
# what None means where it takes None.
NUMBER_FIELDS = [
    ("batch_timeout", {}, None),
    ("item_timeout", {}, None),
    ("min_batch_interval", {}, None),
    ("retry_delay", {}, None),
    ("health_check_interval", {}, None),
    ("memory_warning_threshold", {}, None),
    ("memory_critical_threshold", {}, None),
    ("max_batch_memory_mb", {}, "no cap"),
    ("max_queue_time", {}, "no limit"),
    ("max_priority_wait", {"enable_priority_queue": True}, "strict priorities"),
]


def test_the_number_fields_listed_are_every_float_field():
    floats = {f.name for f in dataclasses.fields(BatchProcessorConfig)
              if f.type in ("float", "float | None")}
    assert floats == {name for name, _, _ in NUMBER_FIELDS}


@pytest.mark.parametrize("value", [
    float("inf"), float("-inf"), float("nan"), np.float64("inf"), np.float32("nan"),
    Decimal("Infinity"), Decimal("-Infinity"), Decimal("NaN"), Decimal("sNaN")])
@pytest.mark.parametrize("field,needs,none_means", NUMBER_FIELDS)
def test_non_finite_numbers_are_refused_naming_field_and_value(field, needs, none_means,
                                                               value):
    with pytest.raises(ValueError) as info:
        BatchProcessorConfig(**needs, **{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be a finite number, got {value!r}")
    if none_means is not None:
        assert f"use None for {none_means}" in message
    else:
        assert "None" not in message


def test_fixed_with_an_infinite_batch_timeout_is_refused():
    # It would wait for ever for a full batch: a lone request would never be served.
    with pytest.raises(ValueError, match="batch_timeout must be a finite number, got inf"):
        BatchProcessorConfig(processing_strategy=BatchProcessingStrategy.FIXED,
                             batch_timeout=float("inf"))


@pytest.mark.parametrize("field,needs,none_means", NUMBER_FIELDS)
def test_large_finite_numbers_are_still_accepted(field, needs, none_means):
    value = 100.0 if "threshold" in field else 1e9
    if field == "memory_warning_threshold":
        needs = {**needs, "memory_critical_threshold": 100.0}
    config = BatchProcessorConfig(**needs, **{field: value})
    assert getattr(config, field) == value


@pytest.mark.parametrize("kwargs,named", [
    (dict(min_batch_size=10, max_batch_size=5), "min_batch_size"),
    (dict(memory_warning_threshold=95.0, memory_critical_threshold=90.0),
     "memory_warning_threshold"),
    (dict(queue_warning_threshold=900, queue_critical_threshold=800),
     "queue_warning_threshold"),
])
def test_contradictions_raise_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        BatchProcessorConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(memory_warning_threshold=95.0, memory_critical_threshold=90.0),
     "memory_warning_threshold (95.0) must not exceed memory_critical_threshold (90.0)"),
    (dict(queue_warning_threshold=90, queue_critical_threshold=80),
     "queue_warning_threshold (90) must not exceed queue_critical_threshold (80)"),
    (dict(max_queue_size=100, queue_critical_threshold=150),
     "queue_critical_threshold (150) must not exceed max_queue_size (100)"),
    (dict(max_queue_size=100, queue_warning_threshold=101, queue_critical_threshold=100),
     "queue_warning_threshold (101) must not exceed max_queue_size (100)"),
    (dict(queue_warning_threshold=1001), "queue_warning_threshold (1001) must not exceed "
     "max_queue_size (1000)"),
    (dict(max_batch_size=16, gc_batch_threshold=17),
     "gc_batch_threshold (17) must not exceed max_batch_size (16)"),
    (dict(gc_batch_threshold=129), "gc_batch_threshold (129) must not exceed "
     "max_batch_size (128)"),
    (dict(pad_value=0, pad_to_multiple_of=8, max_batch_tokens=15),
     "max_batch_tokens (15) must be at least twice pad_to_multiple_of (8)"),
])
def test_a_pair_that_can_never_take_effect_is_refused_naming_both(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchProcessorConfig(**kwargs)


@pytest.mark.parametrize("size,warning,critical", [
    (1000, 500, 800), (100, 50, 80), (10, 5, 8), (3, 2, 3), (1, 1, 1)])
def test_queue_thresholds_not_given_follow_max_queue_size(size, warning, critical):
    config = BatchProcessorConfig(max_queue_size=size)
    assert (config.queue_warning_threshold, config.queue_critical_threshold) == (
        warning, critical)


@pytest.mark.parametrize("kwargs,expected", [
    # A threshold not given stays on its side of the one given.
    (dict(queue_warning_threshold=900), (900, 900)),
    (dict(queue_critical_threshold=300), (300, 300)),
    (dict(queue_warning_threshold=100), (100, 800)),
    (dict(max_queue_size=100, queue_warning_threshold=90), (90, 90)),
    (dict(max_queue_size=100, queue_critical_threshold=100), (50, 100)),
    (dict(queue_warning_threshold=None, queue_critical_threshold=None), (500, 800)),
])
def test_a_queue_threshold_not_given_agrees_with_the_given_one(kwargs, expected):
    config = BatchProcessorConfig(**kwargs)
    assert (config.queue_warning_threshold, config.queue_critical_threshold) == expected


@pytest.mark.parametrize("kwargs,expected", [
    (dict(memory_warning_threshold=95.0), (95.0, 95.0)),
    (dict(memory_critical_threshold=70.0), (70.0, 70.0)),
    (dict(memory_warning_threshold=50.0), (50.0, 90.0)),
    (dict(memory_critical_threshold=99.0), (80.0, 99.0)),
])
def test_a_memory_threshold_not_given_agrees_with_the_given_one(kwargs, expected):
    config = BatchProcessorConfig(**kwargs)
    assert (config.memory_warning_threshold, config.memory_critical_threshold) == expected


@pytest.mark.parametrize("max_batch,expected", [(128, 100), (100, 100), (16, 16), (1, 1)])
def test_gc_batch_threshold_not_given_is_at_most_max_batch_size(max_batch, expected):
    assert BatchProcessorConfig(max_batch_size=max_batch).gc_batch_threshold == expected
    assert BatchProcessorConfig(max_batch_size=max_batch,
                                enable_memory_optimization=False).max_batch_size == max_batch


def test_limits_that_can_take_effect_are_accepted():
    config = BatchProcessorConfig(max_queue_size=10, queue_warning_threshold=10,
                                  queue_critical_threshold=10, max_batch_size=16,
                                  gc_batch_threshold=16)
    assert (config.queue_warning_threshold, config.gc_batch_threshold) == (10, 16)
    assert BatchProcessorConfig(pad_value=0, pad_to_multiple_of=8,
                                max_batch_tokens=16).max_batch_tokens == 16
    # Initial sizes are still clamped, not refused: 32 with a max of 16 is 16.
    assert BatchProcessorConfig(max_batch_size=16).initial_batch_size == 16


@pytest.mark.parametrize("initial,expected", [(500, 64), (1, 4), (10, 10)])
def test_initial_size_is_clamped_into_min_max(initial, expected):
    config = BatchProcessorConfig(initial_batch_size=initial, min_batch_size=4,
                                  max_batch_size=64)
    assert config.initial_batch_size == expected


def test_strategy_accepts_its_value_string():
    assert (BatchProcessorConfig(processing_strategy="greedy").processing_strategy
            is BatchProcessingStrategy.GREEDY)


def test_memory_cap_is_in_mebibytes():
    assert BatchProcessorConfig(max_batch_memory_mb=2).max_batch_bytes == 2 * 2**20
    assert BatchProcessorConfig().max_batch_bytes == 0


def test_priority_levels_lower_is_more_urgent():
    assert [(p.name, int(p)) for p in BatchPriority] == [
        ("CRITICAL", 0), ("HIGH", 1), ("NORMAL", 2), ("LOW", 3), ("BACKGROUND", 4)]
    assert BatchPriority.CRITICAL < BatchPriority.BACKGROUND


def test_strategies():
    assert {s.name for s in BatchProcessingStrategy} == {"FIXED", "ADAPTIVE", "GREEDY"}


def test_prioritized_item_orders_by_priority_then_sequence():
    items = [PrioritizedItem(2, 1, "b"), PrioritizedItem(0, 5, "urgent"),
             PrioritizedItem(2, 0, "a")]
    assert [i.item for i in sorted(items)] == ["urgent", "a", "b"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(pad_value="0"), "pad_value must be a number"),
    (dict(pad_value={}), "empty mapping"),
    (dict(pad_value={1: 0}), "keys must be input names"),
    (dict(pad_value={"ids": None}), r"pad_value\['ids'\] must be a number"),
    # Numbers no dtype holds: refused here, not by every padded enqueue.
    (dict(pad_value=Decimal("1.5")), r"pad_value must be a bool, int, float or complex "
                                     r"number that fits 64 bits .* got Decimal\('1.5'\)"),
    (dict(pad_value=Fraction(1, 2)), r"fits 64 bits .* got Fraction\(1, 2\)"),
    (dict(pad_value=2**64), "fits 64 bits .* got 18446744073709551616"),
    (dict(pad_value=-(2**63) - 1), "fits 64 bits .* got -9223372036854775809"),
    (dict(pad_value={"ids": Decimal(0)}), r"pad_value\['ids'\] must be a bool, int"),
    (dict(pad_to_multiple_of=8), "pad_to_multiple_of needs pad_value"),
    (dict(max_batch_tokens=512), "max_batch_tokens needs pad_value"),
    (dict(pad_value=0, max_batch_tokens=0), "max_batch_tokens must be >= 1"),
    (dict(pad_value=0, pad_to_multiple_of=2.0), "pad_to_multiple_of must be an int"),
    (dict(per_token_outputs=True), "per_token_outputs needs pad_value"),
    (dict(pad_value=0, per_token_outputs="logits"), "bool or a collection"),
    (dict(pad_value=0, per_token_outputs=[1.5]), "str .* or int"),
    (dict(item_size=3), "item_size must be callable"),
])
def test_format_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchProcessorConfig(**kwargs)


def test_format_settings_accepted_and_normalised():
    config = BatchProcessorConfig(pad_value={"input_ids": 0, "attention_mask": 0},
                                  pad_to_multiple_of=8, max_batch_tokens=4096,
                                  per_token_outputs=["logits", 0], item_size=len)
    assert config.per_token_outputs == frozenset({"logits", 0})
    assert BatchProcessorConfig(pad_value=-100.5).pad_value == -100.5
    for pad in (True, 2**64 - 1, -(2**63), 1 + 2j, np.float16(0.5), np.uint64(2**64 - 1)):
        assert BatchProcessorConfig(pad_value=pad).pad_value == pad


@pytest.mark.parametrize("name,value,switch", [
    ("max_priority_wait", 0.5, "enable_priority_queue"),
    ("max_priority_wait", 0, "enable_priority_queue"),
    ("gc_batch_threshold", 10, "enable_memory_optimization"),
    ("health_check_interval", 5.0, "enable_health_monitoring"),
])
def test_a_setting_of_a_feature_switched_off_is_refused(name, value, switch):
    with pytest.raises(ValueError, match=f"{name} has no effect while {switch} is False: "
                                         f"set {switch}=True"):
        BatchProcessorConfig(**{name: value, switch: False})
    # With the switch on it is taken; left at its default, the switch may be off.
    assert getattr(BatchProcessorConfig(**{name: value, switch: True}), name) == value
    default = DESIGN_DEFAULTS[name]
    assert getattr(BatchProcessorConfig(**{name: default, switch: False}), name) == default


@pytest.mark.parametrize("workers", [1, 4, MAX_WORKERS])
def test_max_workers_up_to_its_bound_is_accepted(workers):
    assert BatchProcessorConfig(max_workers=workers).max_workers == workers


@pytest.mark.parametrize("workers", [MAX_WORKERS + 1, 10**6])
def test_max_workers_above_its_bound_is_refused_naming_field_value_and_bound(workers):
    with pytest.raises(ValueError, match=rf"max_workers must be <= {MAX_WORKERS}, "
                                         rf"got {workers}"):
        BatchProcessorConfig(max_workers=workers)


def test_the_max_workers_bound_is_1024():
    assert MAX_WORKERS == 1024


def test_a_config_made_from_another_derives_its_unset_thresholds_again():
    # dataclasses.replace passes every field on: the derived thresholds follow the new
    # sizes instead of being taken for given ones (which would refuse max_queue_size=100).
    base = BatchProcessorConfig()
    small = dataclasses.replace(base, max_queue_size=100, max_batch_size=16)
    assert (small.queue_warning_threshold, small.queue_critical_threshold) == (50, 80)
    assert small.gc_batch_threshold == 16
    given = dataclasses.replace(BatchProcessorConfig(queue_warning_threshold=10),
                                max_queue_size=100)
    assert (given.queue_warning_threshold, given.queue_critical_threshold) == (10, 80)
    assert dataclasses.replace(small, max_queue_size=1000).queue_critical_threshold == 800
    with pytest.raises(ValueError, match="queue_critical_threshold"):
        dataclasses.replace(BatchProcessorConfig(queue_critical_threshold=800),
                            max_queue_size=100)


@pytest.mark.parametrize("value", ["fixed", "FIXED", "Fixed", BatchProcessingStrategy.FIXED])
def test_strategy_accepts_member_names_and_values_in_any_case(value):
    assert (BatchProcessorConfig(processing_strategy=value).processing_strategy
            is BatchProcessingStrategy.FIXED)


@pytest.mark.parametrize("value", ["sideways", "", "fixed ", 0, None])
def test_a_bad_strategy_is_refused_listing_the_valid_values(value):
    with pytest.raises(ValueError, match=re.escape(
            "processing_strategy must be a BatchProcessingStrategy or one of 'fixed', "
            f"'adaptive', 'greedy' (any case), got {value!r}")):
        BatchProcessorConfig(processing_strategy=value)


@pytest.mark.parametrize("base,changes,expected", [
    # Clamped to a bound that then moves: the value given (or the default) is clamped again.
    (dict(max_batch_size=8), dict(max_batch_size=128), 32),
    (dict(max_batch_size=8), dict(max_batch_size=16), 16),
    (dict(min_batch_size=64), dict(min_batch_size=1), 32),
    (dict(initial_batch_size=500, max_batch_size=64), dict(max_batch_size=256), 256),
    (dict(initial_batch_size=500, max_batch_size=64), dict(max_batch_size=1000), 500),
    (dict(initial_batch_size=2, min_batch_size=4), dict(min_batch_size=1), 2),
    # Not clamped: the value given survives, and is clamped only by new bounds.
    (dict(initial_batch_size=10), dict(max_batch_size=64), 10),
    (dict(initial_batch_size=10), dict(max_batch_size=8), 8),
    (dict(initial_batch_size=10, max_batch_size=8), dict(initial_batch_size=4), 4),
])
def test_a_config_made_from_another_clamps_the_given_initial_size_again(base, changes,
                                                                         expected):
    config = dataclasses.replace(BatchProcessorConfig(**base), **changes)
    assert config.initial_batch_size == expected
    assert config == BatchProcessorConfig(**{**base, **changes})


def test_a_clamped_initial_size_is_an_int_that_survives_copies():
    config = BatchProcessorConfig(max_batch_size=8)
    assert config.initial_batch_size == 8 and repr(config.initial_batch_size) == "8"
    for copied in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert copied == config
        assert dataclasses.replace(copied, max_batch_size=128).initial_batch_size == 32


# Every integer field, with what it needs to take the value 8.
INT_FIELDS = [
    ("initial_batch_size", {}), ("min_batch_size", {}), ("max_batch_size", {}),
    ("max_queue_size", {}), ("max_workers", {}), ("monitoring_window", {}),
    ("gc_batch_threshold", {}), ("queue_warning_threshold", {}),
    ("queue_critical_threshold", {}), ("max_retries", {}),
    ("pad_to_multiple_of", {"pad_value": 0}), ("max_batch_tokens", {"pad_value": 0}),
]
BOOL_FIELDS = [f.name for f in dataclasses.fields(BatchProcessorConfig) if f.type == "bool"]


def test_the_int_fields_listed_are_every_int_field():
    ints = {f.name for f in dataclasses.fields(BatchProcessorConfig)
            if f.type in ("int", "int | None")}
    assert ints == {name for name, _ in INT_FIELDS}


@pytest.mark.parametrize("value", [8, np.int64(8), np.int8(8), np.uint64(8), np.array(8)],
                         ids=repr)
@pytest.mark.parametrize("field,needs", INT_FIELDS)
def test_an_integral_number_is_taken_in_an_int_field_as_a_plain_int(field, needs, value):
    stored = getattr(BatchProcessorConfig(**needs, **{field: value}), field)
    assert stored == 8 and type(stored) is int


@pytest.mark.parametrize("value,expected", [
    (0.5, 0.5), (1, 1.0), (np.float64(0.5), 0.5), (np.float32(0.5), 0.5),
    (np.float16(0.5), 0.5), (np.int64(1), 1.0), (np.uint8(1), 1.0),
    (Fraction(1, 2), 0.5), (Decimal("0.5"), 0.5)], ids=repr)
@pytest.mark.parametrize("field,needs,none_means", NUMBER_FIELDS)
def test_a_real_number_is_taken_in_a_number_field_as_a_plain_float(field, needs, none_means,
                                                                    value, expected):
    stored = getattr(BatchProcessorConfig(**needs, **{field: value}), field)
    assert stored == expected and type(stored) is float


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)], ids=repr)
@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_a_bool_or_numpy_bool_is_taken_in_a_switch_as_a_plain_bool(field, value):
    stored = getattr(BatchProcessorConfig(**{field: value}), field)
    assert stored is bool(value)


def test_a_config_of_numpy_numbers_runs_a_processor():
    config = BatchProcessorConfig(max_batch_size=np.int64(4), max_queue_size=np.int32(16),
                                  batch_timeout=np.float32(0.01), max_workers=np.uint8(2),
                                  enable_priority_queue=np.bool_(True))
    with BatchProcessor(config) as processor:
        processor.start(lambda batch: batch * 2)
        result = processor.enqueue_predict(np.arange(6.0).reshape(6, 1)).result(timeout=10)
    assert result.ravel().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


INTEGER = "must be an integer (an int or a numpy integer, not a bool or a float)"
REAL = ("must be a real number (an int, a float, a numpy number, a Fraction or a Decimal; "
        "not a bool)")
BOOL = "must be a bool (True or False)"


@pytest.mark.parametrize("field,value,accepted", [
    ("max_batch_size", 2.5, INTEGER), ("max_batch_size", 8.0, INTEGER),
    ("max_batch_size", np.float64(8.0), INTEGER), ("max_batch_size", True, INTEGER),
    ("max_batch_size", np.bool_(True), INTEGER), ("max_batch_size", Fraction(8), INTEGER),
    ("max_batch_size", Decimal(8), INTEGER), ("max_batch_size", "8", INTEGER),
    ("max_batch_size", None, INTEGER), ("max_retries", 1.0, INTEGER),
    ("max_queue_size", float("inf"), INTEGER), ("max_workers", float("nan"), INTEGER),
    ("queue_warning_threshold", 10.0, INTEGER),
    ("batch_timeout", "0.1", REAL), ("batch_timeout", True, REAL),
    ("batch_timeout", np.bool_(False), REAL), ("batch_timeout", 1j, REAL),
    ("batch_timeout", None, REAL), ("max_queue_time", "1", REAL),
    ("memory_warning_threshold", np.complex64(1), REAL),
    ("enable_priority_queue", "yes", BOOL), ("enable_priority_queue", 1, BOOL),
    ("debug_mode", None, BOOL), ("stack_items", np.int64(1), BOOL),
    ("processing_strategy", 0, "must be a BatchProcessingStrategy or one of"),
    ("processing_strategy", None, "must be a BatchProcessingStrategy or one of"),
    ("retry_on", "ValueError", "must be an exception class or a tuple of them"),
    ("retry_on", (ValueError, 3), "must be an exception class or a tuple of them"),
    ("pad_value", "0", "must be a number"),
    ("pad_value", Decimal("1.5"), "must be a bool, int, float or complex number"),
    ("item_size", 3, "must be callable"),
    ("per_token_outputs", "logits", "must be a bool or a collection"),
], ids=repr)
def test_a_wrong_type_is_a_type_error_and_a_value_error_naming_field_value_and_accepted(
        field, value, accepted):
    with pytest.raises(ConfigTypeError) as info:
        BatchProcessorConfig(**{field: value})
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(f"{field} {accepted}")
    assert repr(value) in message


@pytest.mark.parametrize("kwargs,wrong", [
    (dict(pad_value={1: 0}), 1), (dict(pad_value={"ids": "0"}), "0"),
    (dict(pad_value=0, per_token_outputs=[1.5]), 1.5),
    (dict(pad_value=0, per_token_outputs=[True]), True),
    (dict(pad_value=0, pad_to_multiple_of=2.0), 2.0),
])
def test_a_wrong_type_inside_a_format_setting_is_a_config_type_error(kwargs, wrong):
    with pytest.raises(ConfigTypeError, match=re.escape(repr(wrong))):
        BatchProcessorConfig(**kwargs)


@pytest.mark.parametrize("field,value,message", [
    ("max_batch_size", np.int64(0), "max_batch_size must be >= 1, got np.int64(0)"),
    ("max_retries", np.int8(-1), "max_retries must be >= 0, got np.int8(-1)"),
    ("max_workers", np.int64(MAX_WORKERS + 1), f"max_workers must be <= {MAX_WORKERS}"),
    ("batch_timeout", np.float64(-1.0), "batch_timeout must be >= 0.0"),
    ("batch_timeout", Fraction(-1, 2), "batch_timeout must be >= 0.0, got Fraction(-1, 2)"),
    ("item_timeout", Decimal(0), "item_timeout must be > 0.0, got Decimal('0')"),
    ("memory_warning_threshold", np.float32(100.5), "must be a percentage in [0, 100]"),
    ("batch_timeout", 10**400, "batch_timeout must be a number a float holds"),
    ("max_queue_time", Fraction(10**400, 3), "max_queue_time must be a number a float holds"),
    ("retry_delay", Decimal("1e400"), "retry_delay must be a number a float holds"),
    ("processing_strategy", "sideways", "processing_strategy must be a"),
    ("pad_value", 2**64, "pad_value must be a bool, int, float or complex number that "
                         "fits 64 bits"),
])
def test_a_wrong_value_of_the_right_type_is_a_value_error_only(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        BatchProcessorConfig(**{field: value})
    assert not isinstance(info.value, TypeError)


def test_numpy_numbers_are_taken_in_format_settings():
    config = BatchProcessorConfig(pad_value=np.bool_(False),
                                  per_token_outputs=[np.int64(0), "logits"])
    assert config.per_token_outputs == frozenset({0, "logits"})
    assert {type(output) for output in config.per_token_outputs} == {int, str}
    assert BatchProcessorConfig(pad_value={"mask": np.bool_(False)}).pad_value == {
        "mask": False}


# The native limits the settings that size native structures must stay within.
QUEUE_MOST = request_queue.MAX_CAPACITY
WINDOW_MOST = rolling_window.MAX_CAPACITY
# The largest max_batch_memory_mb: its bytes, 2**63 - 2**10, fit an int64.
MIB_MOST = math.nextafter(2.0**43, 0)


def test_the_native_limits_are_those_of_the_native_structures():
    assert (QUEUE_MOST, WINDOW_MOST) == (2**24, 2**26)
    with pytest.raises(ValueError, match="capacity"):
        request_queue.RequestQueue(QUEUE_MOST + 1)
    with pytest.raises(ValueError, match="capacity"):
        rolling_window.RollingWindow(WINDOW_MOST + 1)


@pytest.mark.parametrize("field,most,value", [
    ("max_queue_size", QUEUE_MOST, QUEUE_MOST + 1),
    ("max_queue_size", QUEUE_MOST, np.int64(QUEUE_MOST + 1)),
    ("max_queue_size", QUEUE_MOST, 2**70),
    ("monitoring_window", WINDOW_MOST, WINDOW_MOST + 1),
    ("monitoring_window", WINDOW_MOST, 2**70),
    ("max_workers", MAX_WORKERS, MAX_WORKERS + 1),
    # Accepted before, then an OverflowError (map) or a ValueError on every request.
    ("max_batch_size", 2**31 - 1, 10**30),
    ("max_batch_size", 2**31 - 1, 2**31),
    ("pad_to_multiple_of", 2**20, 2**40),
    ("pad_to_multiple_of", 2**20, 10**30),
], ids=repr)
def test_a_size_above_its_native_limit_is_refused_naming_field_and_limit(field, most, value):
    with pytest.raises(ValueError, match=re.escape(
            f"{field} must be <= {most}, got {int(value)}")) as info:
        BatchProcessorConfig(**{field: value})
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("value", [2.0**43, 1e308, np.float64(1e300), Decimal("1e300"),
                                   Fraction(2**63, 2**20), 10**300], ids=repr)
def test_a_memory_cap_whose_bytes_do_not_fit_64_bits_is_refused_naming_the_largest(value):
    with pytest.raises(ValueError, match=re.escape(
            f"max_batch_memory_mb must be <= {MIB_MOST!r}")) as info:
        BatchProcessorConfig(max_batch_memory_mb=value)
    assert not isinstance(info.value, TypeError)
    assert "use None for no cap" in str(info.value)


@pytest.mark.parametrize("value,nbytes", [
    (MIB_MOST, 2**63 - 2**10), (2**42, 2**62), (1e-9, 1), (1, 2**20)], ids=repr)
def test_a_memory_cap_just_inside_the_limit_is_kept_in_bytes(value, nbytes):
    assert BatchProcessorConfig(max_batch_memory_mb=value).max_batch_bytes == nbytes


def test_the_largest_settings_accepted_construct_and_run_a_processor():
    config = BatchProcessorConfig(
        max_queue_size=QUEUE_MOST, monitoring_window=WINDOW_MOST,
        max_batch_memory_mb=MIB_MOST, max_batch_size=2**31 - 1, initial_batch_size=2**70,
        max_batch_tokens=2**70, pad_value=0, pad_to_multiple_of=2**20, max_retries=2**70,
        batch_timeout=1e308, max_queue_time=1e308)
    with BatchProcessor(config) as processor:
        processor.start(lambda batch: batch[:, :1] * 2)
        result = processor.enqueue_predict(np.arange(3.0).reshape(3, 1)).result(timeout=10)
        mapped = list(processor.map(np.arange(3.0).reshape(3, 1, 1)))  # chunks too
    assert result.ravel().tolist() == [0.0, 2.0, 4.0]
    assert [m.ravel().tolist() for m in mapped] == [[0.0], [2.0], [4.0]]


class _FloatFails(Fraction):
    """A real number whose conversion to float breaks."""

    def __float__(self) -> float:
        raise ZeroDivisionError("no float for this one")


class _IndexFails:
    """An object whose conversion to an integer breaks with a ValueError."""

    def __index__(self) -> int:
        raise ValueError("no index for this one")

    def __repr__(self) -> str:  # the same test id in every process (pytest-xdist's workers)
        return "_IndexFails()"


def _unitless_timedeltas() -> list[np.timedelta64]:
    """numpy's timedelta64 without a unit, where it still exists: made quietly (numpy 2.5
    deprecates it, and this suite turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return [np.timedelta64(10)]
        except (TypeError, ValueError):  # a numpy that no longer makes them
            return []


UNITLESS = _unitless_timedeltas()
DURATIONS = [np.timedelta64(10, "ms"), *UNITLESS, np.timedelta64("NaT", "ms"),
             datetime.timedelta(milliseconds=10)]


@pytest.mark.parametrize("value", [*DURATIONS, np.datetime64(10, "ms"), _FloatFails(1, 2)],
                         ids=repr)
@pytest.mark.parametrize("field,needs,none_means", NUMBER_FIELDS)
def test_what_fails_the_conversion_to_a_number_is_a_config_type_error_naming_the_field(
        field, needs, none_means, value):
    with pytest.raises(ConfigTypeError) as info:
        BatchProcessorConfig(**needs, **{field: value})
    assert str(info.value).startswith(f"{field} {REAL}, got {value!r}")


@pytest.mark.parametrize("value", DURATIONS, ids=repr)
def test_a_duration_is_refused_asking_for_seconds(value):
    with pytest.raises(ConfigTypeError, match="give a duration in seconds, as a number"):
        BatchProcessorConfig(batch_timeout=value)


@pytest.mark.parametrize("value", [_IndexFails(), *UNITLESS, np.timedelta64(10, "ms")], ids=repr)
@pytest.mark.parametrize("field,needs", INT_FIELDS)
def test_what_fails_the_conversion_to_an_integer_is_a_config_type_error_naming_the_field(
        field, needs, value):
    with pytest.raises(ConfigTypeError) as info:
        BatchProcessorConfig(**needs, **{field: value})
    assert str(info.value).startswith(f"{field} {INTEGER}, got {value!r}")


# -- unknown keywords ----------------------------------------------------------------------


def test_check_keywords_names_the_function_each_unknown_name_and_the_closest() -> None:
    check_keywords("f", ["max_batch_size", "own"], ["own"])  # all known: nothing raised
    with pytest.raises(TypeError) as info:
        check_keywords("f", ["max_batch_siz", "queue_wait", "zzz", "retry_delay"],
                       ["queue_wait", "decode"])
    assert str(info.value) == (
        "f() got unexpected keyword arguments 'max_batch_siz' (did you mean "
        "'max_batch_size'?), 'zzz'. f() takes BatchProcessorConfig's fields as keywords "
        "(help(batchproc.BatchProcessorConfig) lists them), and queue_wait, decode")
    # The function's own keywords are candidates too.
    with pytest.raises(TypeError, match=r"'decod' \(did you mean 'decode'\?\)"):
        check_keywords("f", ["decod"], ["decode"])
    assert set(FIELD_NAMES) == {f.name for f in dataclasses.fields(BatchProcessorConfig)}


@pytest.mark.parametrize(("given", "meant"), [
    ("MAX_BATCH_SIZE", "max_batch_size"),
    ("Max_Batch_Size", "max_batch_size"),
    ("max-batch-size", "max_batch_size"),
    ("MAX-BATCH-SIZE", "max_batch_size"),
    ("Max_Batch_Siz", "max_batch_size"),
    ("max-batch-siz", "max_batch_size"),
    ("Batch-Timeout", "batch_timeout"),
    ("Processing_Strategy", "processing_strategy"),
    ("max_batch_sizE", "max_batch_size"),
    ("MAX_BATCH_SIZ", "max_batch_size"),
    ("BATCH-TIMEOUT", "batch_timeout"),
    ("MAX_WORKERS", "max_workers"),
])
def test_the_closest_name_is_found_in_any_case_and_with_dashes(given, meant) -> None:
    with pytest.raises(TypeError) as info:
        BatchProcessorConfig(**{given: 8})
    assert str(info.value).startswith(
        f"BatchProcessorConfig() got an unexpected keyword argument {given!r} (did you "
        f"mean {meant!r}?). ")


def test_a_function_s_own_keywords_are_found_in_any_case_and_with_dashes() -> None:
    with pytest.raises(TypeError, match=r"'Queue-Wait' \(did you mean 'queue_wait'\?\)"):
        check_keywords("f", ["Queue-Wait"], ["queue_wait"])
    # Far from every name in every case: no hint.
    with pytest.raises(TypeError, match=r"argument 'ZZZ'\. f\(\) takes"):
        check_keywords("f", ["ZZZ"], ["queue_wait"])


@pytest.mark.parametrize("build", [
    lambda: BatchProcessorConfig(max_batch_siz=64),
    lambda: dataclasses.replace(BatchProcessorConfig(), max_batch_siz=64),
], ids=["config", "replace"])
def test_a_config_names_an_unknown_field_and_the_closest(build) -> None:
    with pytest.raises(TypeError) as info:
        build()
    assert str(info.value) == (
        "BatchProcessorConfig() got an unexpected keyword argument 'max_batch_siz' (did you "
        "mean 'max_batch_size'?). BatchProcessorConfig() takes its fields as keywords "
        "(help(batchproc.BatchProcessorConfig) lists them)")
    assert not isinstance(info.value, ConfigTypeError)


@pytest.mark.parametrize("model", [lambda batch: batch, np.negative, print],
                         ids=["lambda", "ufunc", "builtin"])
def test_a_model_given_where_the_config_goes_is_refused_saying_where_it_goes(model) -> None:
    with pytest.raises(TypeError, match=r"BatchProcessor takes a BatchProcessorConfig, got "
                       r"the callable .*: the model goes to start\(process_func\)"):
        BatchProcessor(model)


@pytest.mark.parametrize("config", ["max_batch_size=8", {"max_batch_size": 8, "x": 1}, {},
                                    {1: 2}, 8])
def test_what_is_no_config_is_refused_naming_its_type(config) -> None:
    with pytest.raises(TypeError, match="config must be a BatchProcessorConfig, got "
                       + type(config).__name__):
        BatchProcessor(config)


def test_config_fields_given_as_keywords_are_refused_showing_the_call_to_write() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "BatchProcessor takes a BatchProcessorConfig, not its fields as keywords: "
            "BatchProcessor(BatchProcessorConfig(max_batch_size=8, batch_timeout=0.002))")):
        BatchProcessor(max_batch_size=8, batch_timeout=0.002)


def test_a_dict_of_config_fields_is_refused_showing_the_call_to_write() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "got a dict of its fields: BatchProcessor(BatchProcessorConfig(**fields))")):
        BatchProcessor({"max_batch_size": 8, "batch_timeout": 0.002})


def test_fields_given_beside_a_config_are_refused_showing_replace() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "to change a config's fields, BatchProcessor(dataclasses.replace(config, "
            "max_batch_size=8))")):
        BatchProcessor(BatchProcessorConfig(batch_timeout=0.002), max_batch_size=8)


def test_a_misspelt_field_given_as_a_keyword_is_refused_naming_the_field() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "unexpected keyword argument 'max_batchsize' (did you mean 'max_batch_size'?)")):
        BatchProcessor(max_batchsize=8)


def test_a_subclass_may_add_fields_and_attributes() -> None:
    @dataclasses.dataclass
    class ServingConfig(BatchProcessorConfig):
        model_name: str = "ranker"

        def __post_init__(self) -> None:
            super().__post_init__()
            self.cache = {}

    config = ServingConfig(model_name="scorer", max_batch_size=8)
    config.owner = "team"
    assert (config.model_name, config.cache, config.owner) == ("scorer", {}, "team")
    processor = BatchProcessor(config)
    assert type(processor.config) is ServingConfig
    assert processor.config.model_name == "scorer"


@pytest.mark.parametrize(("keywords", "name", "hint"), [
    ({"metric_collector": None}, "metric_collector", " (did you mean 'metrics_collector'?)"),
    ({"max_batch_size": 8, "workers": 2}, "workers", " (did you mean 'max_workers'?)"),
    ({"colour": 1}, "colour", ""),
])
def test_an_unknown_keyword_is_refused_naming_it_and_what_is_taken(keywords, name,
                                                                   hint) -> None:
    with pytest.raises(TypeError, match=re.escape(
            f"BatchProcessor() got an unexpected keyword argument {name!r}{hint}: it takes "
            "config (a BatchProcessorConfig) and metrics_collector")):
        BatchProcessor(**keywords)


def test_config_and_metrics_collector_are_still_taken_as_keywords() -> None:
    processor = BatchProcessor(config=BatchProcessorConfig(max_batch_size=8),
                               metrics_collector=None)
    assert processor.config.max_batch_size == 8


@pytest.mark.parametrize(("name", "hint"), [("max_batchsize", " (did you mean 'max_batch_size'?)"),
                                            ("MAX_BATCH_SIZE", " (did you mean 'max_batch_size'?)"),
                                            ("colour", "")])
def test_assigning_a_field_that_does_not_exist_is_refused_naming_the_closest(name,
                                                                             hint) -> None:
    config = BatchProcessorConfig()
    with pytest.raises(AttributeError, match=re.escape(
            f"BatchProcessorConfig has no field {name!r}{hint}; "
            "help(batchproc.BatchProcessorConfig) lists them")):
        setattr(config, name, 8)
    assert not hasattr(config, name)
    config.max_batch_size = 8  # a field still can be
    assert config.max_batch_size == 8


def test_a_config_keeps_its_signature_and_positional_fields() -> None:
    import inspect

    parameters = list(inspect.signature(BatchProcessorConfig).parameters)
    assert parameters == list(FIELD_NAMES)
    assert BatchProcessorConfig(16).initial_batch_size == 16


# -- the largest time settings -------------------------------------------------------------


@pytest.mark.parametrize("field", ["min_batch_interval", "retry_delay"])
@pytest.mark.parametrize("value", [math.nextafter(MAX_SECONDS, math.inf), 1e12, 1e308,
                                   10**400, Decimal("1e400")])
def test_a_wait_longer_than_a_thread_can_make_is_refused(field, value) -> None:
    with pytest.raises(ValueError) as info:
        BatchProcessorConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be ")
    if isinstance(value, float) and value < 1e300:
        assert message == (f"{field} must be <= {MAX_SECONDS!r} seconds (MAX_SECONDS, "
                           f"threading.TIMEOUT_MAX: the longest a thread can wait), got "
                           f"{value!r}")


@pytest.mark.parametrize("field", ["min_batch_interval", "retry_delay"])
def test_the_longest_wait_a_thread_can_make_is_accepted(field) -> None:
    assert MAX_SECONDS == threading.TIMEOUT_MAX
    assert getattr(BatchProcessorConfig(**{field: MAX_SECONDS}), field) == MAX_SECONDS


@pytest.mark.parametrize(("field", "needs"), [
    ("batch_timeout", {}), ("item_timeout", {}), ("health_check_interval", {}),
    ("max_queue_time", {}), ("max_priority_wait", {"enable_priority_queue": True}),
])
def test_deadlines_take_any_finite_value(field, needs) -> None:
    # Compared with the clock, never waited for as one wait: longer than the process
    # lives means never.
    assert getattr(BatchProcessorConfig(**needs, **{field: 1e308}), field) == 1e308


def test_the_most_time_settings_work_in_a_processor(make_processor) -> None:
    # Every time setting at its largest: the requests are served (the first batch has no
    # pacing to wait for), and stop ends the pacing wait of the second at once.
    p = make_processor(lambda batch: batch, batch_timeout=1e308, item_timeout=1e308,
                       health_check_interval=1e308, max_queue_time=1e308,
                       enable_priority_queue=True, max_priority_wait=1e308,
                       retry_delay=MAX_SECONDS, min_batch_interval=MAX_SECONDS,
                       processing_strategy="greedy", max_workers=1)
    assert p.enqueue_predict([1]).result(timeout=10) == [1]
    second = p.enqueue_predict([2])
    p.stop(timeout=0.1)
    with pytest.raises(ProcessorStoppedError):
        second.result(timeout=10)
