"""Put on PYTHONPATH of a run a test kills mid-pairs: Python loads it at start-up, and it makes the pairs stage
(about 0.1 s) wait a minute before its work, so that the kill lands while the stage runs."""

import time

import selfimprove.pairs

_process_pairs = selfimprove.pairs.process_pairs


def process_pairs(*args, **kwargs):
    time.sleep(60)
    return _process_pairs(*args, **kwargs)


selfimprove.pairs.process_pairs = process_pairs
