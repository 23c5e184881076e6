"""What a run leaves behind and what reads it: the atomic run folder (``run_folder.py``) and the comparison of
run folders across seeds (``compare.py``). Nothing here runs a method."""
