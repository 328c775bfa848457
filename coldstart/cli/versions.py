"""`coldstart model list|register|promote|rollback|abort|cleanup`: model versions and their rollout.

(coldstart.cli.model holds the training commands; this module the served versions: encoders.versions is the
registry, coldstart.rollout the state, streams.rollout the backfill.)
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from coldstart.config import Settings


@click.group()
def model() -> None:
    """Model versions: list, register, promote (backfill, then switch reads at once), rollback, abort, cleanup.

    Every exported model is a version in COLDSTART_REGISTRY_DIR (`coldstart export-towers` registers what it
    exports). Each version writes to a Feast project of its own, so vectors of two versions never meet.
    """


def _fail_clearly(call):
    from coldstart.rollout import RolloutConflict
    from encoders.versions import UnknownVersion

    try:
        return call()
    except (RolloutConflict, UnknownVersion, ValueError) as err:
        raise click.ClickException(str(err)) from None


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on the last line.")
@click.pass_obj
def list_versions(settings: Settings, as_json: bool) -> None:
    """Registered versions: which is active, which is rolling out, which is the standby, and their metrics."""
    from coldstart import rollout
    from encoders import versions

    state = rollout.read_state(rollout.redis_client(settings), settings)
    rows = []
    for name, metadata in [(rollout.DEFAULT, {"config": "COLDSTART_TOWERS_DIR"}),
                           *((v.name, v.metadata) for v in versions.list_versions(settings.registry_dir))]:
        role = ("active" if name == state.active else f"rolling out ({state.phase})" if name == state.target
                else "standby" if state.standby and name == state.previous else "")
        metrics = metadata.get("test_metrics") or {}
        rows.append({"version": name, "role": role, "encoder": metadata.get("encoder_version"),
                     "data": metadata.get("data_digest"), "created_at": metadata.get("created_at"),
                     "hr@50": {s: m.get("hr@50") for s, m in metrics.items()}})
    for row in rows:
        hr = ", ".join(f"{s} {v:.4f}" for s, v in row["hr@50"].items() if v is not None)
        click.echo(f"{row['role'] or '-':<22} {row['version']:<36} {row['encoder'] or '':<34} {hr}")
    if as_json:
        click.echo(json.dumps({"state": vars(state), "versions": rows}))


@model.command()
@click.option("--towers", "towers_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Exported towers to register (default: COLDSTART_TOWERS_DIR).")
@click.option("--data-digest", default=None, help="Fingerprint of the training data (export-towers records it).")
@click.pass_obj
def register(settings: Settings, towers_dir: Path | None, data_digest: str | None) -> None:
    """Add exported towers (with the encoder COLDSTART_ENCODER at COLDSTART_ENCODER_PRECISION) to the registry."""
    from encoders import versions

    version, new = _fail_clearly(lambda: versions.register(
        settings.registry_dir, towers_dir or settings.towers_dir, settings.encoder_export_dir,
        settings.encoder_precision, data_digest))
    click.echo(f"{'registered' if new else 'already registered:'} {version.name} ({version.path})")


PROMOTE_OPTIONS = [
    click.option("--page", type=click.IntRange(1), default=500, show_default=True,
                 help="Entities read, re-embedded and written per step."),
    click.option("--max-items-per-s", "max_per_s", type=click.FloatRange(0), default=0.0,
                 help="Throttle the backfill (items and users per second; 0: as fast as it goes)."),
    click.option("--reencode", is_flag=True,
                 help="Re-encode every item's text with the encoder too (automatic when the encoder changed)."),
    click.option("--json", "as_json", is_flag=True, help="One JSON object on the last line."),
]


def _promote_options(command):
    for option in reversed(PROMOTE_OPTIONS):
        command = option(command)
    return command


def _report(report, as_json: bool) -> None:
    if report.instant:
        click.echo(f"switched to the standby {report.target} in {report.switch_seconds * 1000:.1f} ms "
                   f"(no backfill: it was kept current)")
    else:
        click.echo(f"{report.target}: {report.items} items in {report.items_seconds:.1f} s "
                   f"({report.items_per_s:.0f}/s, {'encoder + towers' if report.reencoded else 'towers only'}), "
                   f"{report.users} users in {report.users_seconds:.1f} s ({report.users_per_s:.0f}/s); "
                   f"reads switched from {report.source}; {report.source} is the standby")
        if report.texts_from_store:
            click.echo(f"  {report.texts_from_store} items re-encoded from their stored title and category "
                       "(their upload is no longer on item-uploads)")
    if as_json:
        click.echo(json.dumps({"target": report.target, "source": report.source, "instant": report.instant,
                               "reencoded": report.reencoded, "items": report.items, "users": report.users,
                               "items_per_s": report.items_per_s, "users_per_s": report.users_per_s,
                               "switch_s": report.switch_seconds, "state": report.state}))


@model.command()
@click.argument("version")
@_promote_options
@click.pass_obj
def promote(settings: Settings, version: str, page: int, max_per_s: float, reencode: bool, as_json: bool) -> None:
    """Re-embed every item and user with VERSION, then switch reads to it at once.

    Workers write new uploads and actions to both versions meanwhile. Interrupted, the same command
    continues where it stopped; `coldstart model abort` drops the rollout instead."""
    from streams.rollout import promote as run_promote

    _report(_fail_clearly(lambda: run_promote(settings, version, page, max_per_s, reencode)), as_json)


@model.command()
@_promote_options
@click.pass_obj
def rollback(settings: Settings, page: int, max_per_s: float, reencode: bool, as_json: bool) -> None:
    """Back to the version active before the last switch: at once while it is the standby, else by the
    same backfill as promote."""
    from streams.rollout import rollback as run_rollback

    _report(_fail_clearly(lambda: run_rollback(settings, page=page, max_per_s=max_per_s, reencode=reencode)),
            as_json)


@model.command()
@click.pass_obj
def abort(settings: Settings) -> None:
    """Drop an unfinished rollout: workers stop writing to its target (reads never left the active version)."""
    from coldstart import rollout

    state = _fail_clearly(lambda: rollout.abort(rollout.redis_client(settings), settings))
    click.echo(f"rollout dropped; {state.active} stays active (`coldstart model cleanup` deletes the target's keys)")


@model.command()
@click.option("--standby", "keep_standby", is_flag=True, help="Keep the standby version current (instant rollback).")
@click.pass_obj
def cleanup(settings: Settings, keep_standby: bool) -> None:
    """Delete the Redis keys of the versions no longer served (and stop keeping the standby, unless --standby)."""
    from streams.rollout import cleanup as run_cleanup

    deleted = run_cleanup(settings, keep_standby)
    click.echo("deleted " + (", ".join(f"{n} keys of {v}" for v, n in deleted.items()) or "nothing"))


COMMANDS = [model]
