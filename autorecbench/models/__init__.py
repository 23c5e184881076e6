"""Networks: embedding tables (fixed and mixed-dimension), shared layers, and the backbones (prediction networks
on top of embeddings, one module each, registered by name in ``registry.py`` for the ``model=`` config group)."""
