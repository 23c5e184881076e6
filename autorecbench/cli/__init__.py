"""The ``autorecbench`` command line (Typer): ``app.py`` holds run, compare, methods and data; ``reproduce.py``
adds one ``reproduce`` command per registered reproduction; ``plot.py``, ``report.py``, ``export.py`` and
``tune.py`` one command each. Commands parse options and call below them."""
