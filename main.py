"""Standalone command line for unet_seg: plan / train / evaluate / predict / benchmark / export without a server.

    python main.py train --config unet3d --data ../shared/data/hippocampus --results runs/cli --epochs 5
    python main.py --help        # every flag

The implementation lives in apps/unet_seg/lib/cli.py and uses the same configs, trainers,
inference engine and metrics as the MONAI Label server.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps", "unet_seg"))

from lib.cli import run  # noqa: E402

if __name__ == "__main__":
    code = run()
    # Leave without interpreter teardown: MONAI's cache/loader threads can abort there
    # ("terminate called without an active exception") after an error stopped training early,
    # which would replace our exit code 2 by a crash.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
