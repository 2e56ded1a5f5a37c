"""`python -m torch.distributed.run ... tests/distributed_stop.py train image ...`: the CLI, with rank 0 sending itself
a real SIGTERM when batch STOP_BATCH of epoch STOP_EPOCH (0-based; a negative batch counts from the epoch's end)
is drawn, so a test can stop a multi-process run at an exact step (an outside signal lands where timing puts it)."""

from __future__ import annotations

import os
import signal
import sys

from nnforge import cli
from nnforge.data.images import ImageData

STOP = int(os.environ["STOP_EPOCH"]), int(os.environ["STOP_BATCH"])
_original = ImageData.train_source


def _stopping_source(self, device):
    source = _original(self, device)
    batches = source.epoch

    def epoch(e, start=0):
        for b, batch in enumerate(batches(e, start), start=start):
            if os.environ.get("RANK") == "0" and (e, b) == (STOP[0], STOP[1] % len(source)):
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the engine: a stop after this batch's step
            yield batch

    source.epoch = epoch
    return source


ImageData.train_source = _stopping_source
sys.exit(cli.main(sys.argv[1:]))
