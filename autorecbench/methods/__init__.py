"""Method plugins. Each module in this package defines one method and registers it by name; adding a
method means adding one module here and one YAML in ``conf/method/``."""
