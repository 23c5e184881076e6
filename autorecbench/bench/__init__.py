"""What `make bench` runs: throughput and memory benchmarks that print numbers and ratios, never tests.
``streaming.py``: the streaming methods on a synthetic stream; ``ctr.py``: CTR preprocessing and training."""
