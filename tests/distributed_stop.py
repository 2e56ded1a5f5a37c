"""`python -m torch.distributed.run ... tests/distributed_stop.py train image ...`: the CLI, with rank 0 sending itself
a real SIGTERM when batch STOP_BATCH of epoch STOP_EPOCH (0-based; a negative batch counts from the epoch's end)
is drawn, so a test can stop a multi-process run at an exact step (an outside signal lands where timing puts it)."""

from __future__ import annotations

import os
import sys

from stopping import stopping_source

from nnforge import cli
from nnforge.data.images import ImageData

ImageData.train_source = stopping_source(ImageData.train_source,
                                         (int(os.environ["STOP_EPOCH"]), int(os.environ["STOP_BATCH"])),
                                         when=lambda: os.environ.get("RANK") == "0")
sys.exit(cli.main(sys.argv[1:]))
