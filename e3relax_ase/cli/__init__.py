"""Command-line interface: one entry point (``e3relax-ase``), one module per subcommand."""
