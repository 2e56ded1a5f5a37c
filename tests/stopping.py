"""A training source that sends this process a real SIGTERM when a given batch is drawn, so a test stops a run at
an exact step (the engine handles the signal: a checkpoint after that batch's step, then the stop)."""

from __future__ import annotations

import os
import signal


def stopping_source(train_source, at: tuple[int, int], when=lambda: True):
    """train_source (ImageData.train_source) whose epochs signal at batch at = (epoch, batch), 0-based; a negative
    batch counts from the epoch's end. `when`: whether this process signals (e.g. rank 0 only)."""

    def source_with_stop(self, device):
        source = train_source(self, device)
        batches = source.epoch

        def epoch(e, start=0):
            for b, batch in enumerate(batches(e, start), start=start):
                if (e, b) == (at[0], at[1] % len(source)) and when():
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        source.epoch = epoch
        return source

    return source_with_stop
