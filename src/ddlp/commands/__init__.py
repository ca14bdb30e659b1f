"""Sub-commands of the `ddlp` command line, one module each, found by ddlp.cli.command_modules."""


def add_precision_option(p, what: str = "the rollout") -> None:
    """--precision (autocast) for the commands other than `ddlp train`, which has its own."""
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help=f"arithmetic of {what}: fp32 (default), bf16 autocast, or auto (bf16 where the "
                   "hardware has it natively); particle positions stay float32")
