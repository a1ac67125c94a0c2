"""General utilities every part of the SDK and its plugins uses: atomic writes (``atomic``), stop
signals and time limits (``stopping``), config files and dotted overrides (``config_files``)."""
