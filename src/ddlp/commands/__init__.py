"""Subcommands of the `ddlp` command line, one module each (see ddlp.cli.PLUGIN_COMMANDS)."""
