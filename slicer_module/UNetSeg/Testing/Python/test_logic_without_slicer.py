"""Run inside Slicer's Python or plain Python: the module's own self-test."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from UNetSeg import UNetSegTest  # noqa: E402

if __name__ == "__main__":
    UNetSegTest().runTest()
    print("UNetSeg self-test passed")
