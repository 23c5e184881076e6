"""Figure kinds for ``autorecbench plot`` and ``report``: one module per kind or family of kinds, each
registering its drawing functions with ``@figure_kind`` (machinery in ``autorecbench.results.plot``)."""
