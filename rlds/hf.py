"""One rule for the Hugging Face libraries everywhere in rlds: no loading or saving bars. Every
sampler, learner and reward actor loads models, and their bars would bury the run's own in the log."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def no_progress_bars():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for m, _ in bars:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in bars:
            if enabled:
                m.enable_progress_bar()
