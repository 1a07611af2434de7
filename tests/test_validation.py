"""The validation split's pieces that need no Ray: which prompts, and when a run stops."""
import math

from rlds.distributed.protocol import ValidationResult
from rlds.distributed.validation import EarlyStopping, validation_set


def test_validation_set_spreads_its_prompts_and_gives_each_a_whole_group():
    prompts = [f"p{i}" for i in range(10)]
    assert validation_set(prompts, 8, 4) == ["p0"] * 4 + ["p5"] * 4
    assert validation_set(prompts, 4, 1) == ["p0", "p2", "p5", "p7"]
    assert validation_set(prompts[:2], 16, 1) == ["p0", "p1"]  # never more prompts than the split has


def test_early_stopping_counts_validations_without_a_rise_and_a_nan_is_not_one():
    stop = EarlyStopping("val/mean", patience=2, min_delta=0.01)
    figures = [0.5, 0.6, 0.605, 0.7, math.nan, 0.705]
    decisions = [stop.should_stop(ValidationResult(i, {"val/mean": x}, 1.0)) for i, x in enumerate(figures)]
    assert decisions == [False, False, False, False, False, True]
    assert stop.best == 0.7 and stop.best_version == 3 and "val/mean" in stop.reason()
