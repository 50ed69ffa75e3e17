"""Put on PYTHONPATH of a run that a test kills mid-stage, with HOLD_AT naming a point below and HELD a file path:
Python loads this at start-up, and when the run reaches that point it writes HELD and waits there. A kill keyed on
that file lands while the stage runs, however fast the machine, once the stage has done the work named:
- `pairs`: the pairs stage (about 0.1 s in all) has built its pairs, and not written them;
- `process`: the process stage's engines have answered their first round of prompts (its output comes at its end)."""

import os
import time
from pathlib import Path


def hold(work):
    def held(*args, **kwargs):
        out = work(*args, **kwargs)
        Path(os.environ["HELD"]).touch()
        time.sleep(600)  # the test kills the run here
        return out
    return held


if os.environ.get("HOLD_AT") == "pairs":
    import selfimprove.pairs

    selfimprove.pairs.process_pairs = hold(selfimprove.pairs.process_pairs)
elif os.environ.get("HOLD_AT") == "process":
    import selfimprove.reward.mc_prm

    selfimprove.reward.mc_prm.pool_complete = hold(selfimprove.reward.mc_prm.pool_complete)
