"""The ``prepdefense`` command line: one module per sub-command."""
