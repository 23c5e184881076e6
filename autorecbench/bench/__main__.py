"""``python -m autorecbench.bench``: the streaming benchmark (kept as the short name; see ``streaming.py``)."""

from autorecbench.bench.streaming import main

main()
