"""Training pieces the methods share, independent of any one method: optimisers (``optim.py``: lazy/split
Adam, flat fused Adam; ``grda.py``), the Gumbel-softmax (``gumbel.py``) and the candidate losses (``losses.py``)."""
