"""Planted-truth validation (``autorecbench validate``): the harness in ``base.py`` and one module per method that
defines its cases (planted and control data), its oracle and null references, and the statistics it is judged on."""
