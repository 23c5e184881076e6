"""What a run leaves behind and what reads it: the atomic run folder (``run_folder.py``), the comparison of run
folders across seeds (``compare.py``), and the views of them: the complete runs and their tables
(``collect.py``), figures (``plot.py`` with one module per figure family in ``figures/``), the HTML report
(``report.py``) and the experiment-tracker export (``tracking.py``). Nothing here runs a method."""
