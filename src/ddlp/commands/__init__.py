"""Sub-commands of the `ddlp` command line, one module each, found by ddlp.cli.command_modules."""
