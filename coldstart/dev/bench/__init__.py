"""`coldstart bench …`: where the time goes, measured side by side in one run; one module per benchmark.

Each sub-benchmark prints a table and, with --json, one JSON object on its last
line. Absolute times drift on shared machines; read the ratios. Results go in
BENCHMARKS.md.
"""

from __future__ import annotations

import click

from coldstart.dev.bench import actions, burst, encoder, lookup, pipeline, retrieve, rollout, scale, startup


@click.group()
def bench() -> None:
    """Benchmarks: encoder, pipeline, lookup, actions, burst, startup, retrieve, rollout, scale. Results go in BENCHMARKS.md."""


for _module in (encoder, pipeline, lookup, actions, burst, startup, retrieve, scale):
    bench.add_command(getattr(_module, _module.__name__.rsplit(".", 1)[1]))
bench.add_command(rollout.rollout_bench)  # named rollout_bench: `rollout` is the module coldstart.rollout too

COMMANDS = [bench]  # what coldstart.cli registers from this module
