"""Click commands of `crowdllm.inference`, added to the `crowdllm` group by `crowdllm.cli`."""

from __future__ import annotations

import click

#: the commands this subpackage adds to `crowdllm`
COMMANDS: list[click.Command] = []
