"""Host-side ``edge`` subcommands (they export, quantize or train models). Each module has ``register(subparsers)``
and joins the ``edge`` command through the ``edge.commands`` entry-point group in pyproject.toml."""
