"""The ``autorecbench`` command line (Typer): ``app.py`` holds run, compare, methods and data; ``reproduce.py``
adds one ``reproduce`` command per registered reproduction. Commands parse options and call below them."""
