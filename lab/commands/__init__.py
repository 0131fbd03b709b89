"""Lab subcommands of the ``edge`` CLI: ``demo``, ``train``, ``bench`` (registered as entry points)."""
