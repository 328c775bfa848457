"""`coldstart` — the command line: the top layer, and the edge where settings are read.

`main` reads the settings from the environment once and hands them to every
command (click's context object); nothing below reads the environment.
Service commands are here; the model's (export, data, train, evaluate,
export-towers) in coldstart.cli.model; the benchmarks in coldstart.dev.bench.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from coldstart.config import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time: models come from packages


class CommandsByModule(click.Group):
    """A group whose other commands are imported only when named (or listed by --help).

    `coldstart worker` must not import the benchmarks: they import the dev stack, and
    with it Feast, before the worker can keep torch out (without_torch).
    """

    MODULE_COMMANDS = {
        "coldstart.cli.model": ("export", "data", "train", "evaluate", "export-towers"),
        "coldstart.dev.bench": ("bench",),
        "coldstart.cli.versions": ("model",),
    }

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *(n for names in self.MODULE_COMMANDS.values() for n in names)])

    def get_command(self, ctx, name):
        for module, names in self.MODULE_COMMANDS.items():
            if name in names:
                commands = importlib.import_module(module).COMMANDS
                return next(c for c in commands if c.name == name)
        return super().get_command(ctx, name)


@click.group(cls=CommandsByModule, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Real-time cold-start embeddings (LEARN) served through a Feast online store.

    Settings come from environment variables (see README.md, "Configuration").
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        ctx.obj = Settings.from_env()
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def plain_metrics() -> None:
    """Keep this process's Prometheus metrics in memory: import coldstart.metrics before Feast can switch
    prometheus_client to multi-process files (see there), and without a folder inherited from a parent."""
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR", "prometheus_multiproc_dir"):
        os.environ.pop(name, None)
    importlib.import_module("coldstart.metrics")


def without_torch() -> None:
    """Keep torch out of a serving process (worker, HTTP server), even where it is installed.

    `import feast` tries `import torch` (feast.torch_wrapper, for tensor responses
    we never ask for) and carries on when that fails: about 1 s and hundreds of MB
    saved per process. Must run before anything imports Feast; the serving code
    itself never imports torch (.importlinter). Pinned by tests/test_library_internals.py.
    """
    if sys.modules.get("torch") is not None:
        raise RuntimeError("torch is already loaded in this serving process")
    sys.modules["torch"] = None  # a None entry makes `import torch` raise ImportError


@main.command()
@click.option("--port", type=int, default=9092, show_default=True, help="Port to listen on (127.0.0.1).")
@click.option("--storage", default="memory://tansu/", show_default=True,
              help="tansu storage engine: memory:// loses everything on stop; s3://bucket/ is durable.")
@click.pass_obj
def broker(settings: Settings, port: int, storage: str) -> None:
    """Run the embedded Kafka-protocol broker (tansu) with every topic created, until Ctrl-C."""
    from dataclasses import replace

    from coldstart.dev.services import EmbeddedBroker
    from streams.topics import create_topics

    with EmbeddedBroker(port=port, storage_engine=storage) as running:
        create_topics(replace(settings, kafka_bootstrap=running.bootstrap))
        click.echo(f"broker ready on {running.bootstrap} (KAFKA_BOOTSTRAP_SERVERS={running.bootstrap}); Ctrl-C stops it")
        try:
            running.process.wait()
        except KeyboardInterrupt:
            pass


@main.command("create-topics")
@click.pass_obj
def create_topics(settings: Settings) -> None:
    """Create every topic on KAFKA_BOOTSTRAP_SERVERS with COLDSTART_TOPIC_PARTITIONS partitions (idempotent)."""
    from streams.topics import TOPICS, create_topics as create

    create(settings)
    click.echo(f"topics {', '.join(TOPICS)} exist on {settings.kafka_bootstrap}")


@main.command()
@click.pass_obj
def apply(settings: Settings) -> None:
    """Register the feature repo (feature_repo/) in Feast with the current settings."""
    from coldstart import store

    store.apply(settings)
    click.echo(f"applied feature repo to project {settings.feast_project!r} (online store {settings.redis_url})")


@main.command()
@click.option("--start", type=click.DateTime(), default=None, help="Earliest event time to load (default: everything).")
@click.option("--end", type=click.DateTime(), default=None, help="Latest event time to load (default: now).")
@click.pass_obj
def materialize(settings: Settings, start, end) -> None:
    """Rebuild the online store (Redis) from the offline parquet store (`feast materialize`)."""
    from datetime import datetime, timezone

    from coldstart import store

    start = (start or datetime(1970, 1, 1)).replace(tzinfo=timezone.utc)
    end = (end or datetime.now(timezone.utc)).replace(tzinfo=timezone.utc)
    store.open_store(settings).materialize(start_date=start, end_date=end)
    click.echo(f"materialized {start:%Y-%m-%d %H:%M} … {end:%Y-%m-%d %H:%M} into the online store")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 inside a container).")
@click.option("--port", type=int, default=6566, show_default=True)
@click.pass_obj
def serve(settings: Settings, host: str, port: int) -> None:
    """Run the read-only HTTP server: POST /retrieve, /ranking-features, /get-online-features; GET /health, /ready.

    The retrieval index is rebuilt from the online store and then follows the item-embeddings topic;
    GET /ready answers 200 once it is complete.
    """
    without_torch()
    plain_metrics()
    from coldstart import store
    from coldstart.retrieval import Retriever
    from coldstart.server import serve as serve_http

    feature_store = store.open_store(settings)
    serve_http(feature_store, Retriever(settings, feature_store), host, port)


@main.command()
@click.argument("user_id")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="How many items to print.")
@click.option("--category", multiple=True, help="Only items of this category (repeat for any of several).")
@click.option("--include-seen", is_flag=True, help="Keep items of the user's history (left out by default).")
@click.option("--server", default="", help="URL of a running `coldstart serve` to ask (default: build the index here).")
@click.option("--json", "as_json", is_flag=True, help="Print the items as one JSON object.")
@click.pass_obj
def recommend(settings: Settings, user_id: str, k: int, category: tuple[str, ...], include_seen: bool, server: str,
              as_json: bool) -> None:
    """The top k items of the whole catalogue for a user (retrieval: cosine of user and item vectors), with titles.

    Without --server the index is rebuilt in this process from the online store first (seconds for
    thousands of items); with it, a running server answers at once.
    """
    import json

    without_torch()
    from coldstart import store as feast_store
    from coldstart.ranking import UnknownUser
    from coldstart.retrieval import NotReady

    request = {"user_id": user_id, "k": k, "exclude_seen": not include_seen,
               "filter": {"category": list(category)} if category else None}
    try:
        found = _ask_server(server, request) if server else _retrieve_here(settings, request)
    except (UnknownUser, NotReady, ValueError) as err:
        raise click.ClickException(str(err)) from None
    titles = feast_store.item_titles(feast_store.open_store(settings), [i["item_id"] for i in found["items"]])
    items = [{**item, "title": titles.get(item["item_id"])} for item in found["items"]]
    if as_json:
        click.echo(json.dumps({"user_id": user_id, "model_version": found["model_version"], "items": items}))
        return
    for rank_no, item in enumerate(items, 1):
        click.echo(f"{rank_no:>3}. {item['score']:.3f}  {item['title'] or ''}  ({item['item_id']})")


def _retrieve_here(settings: Settings, request: dict) -> dict:
    from coldstart.retrieval import Retriever

    retriever = Retriever(settings).start()
    try:
        found = retriever.wait_ready().retrieve(request["user_id"], request["k"], request["exclude_seen"],
                                                request["filter"])
    finally:
        retriever.stop()
    return {"model_version": found.model_version,
            "items": [{"item_id": r.item_id, "score": r.score} for r in found.items]}


def _ask_server(url: str, request: dict) -> dict:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url.rstrip('/')}/retrieve", json.dumps(request).encode(),
                                                           {"Content-Type": "application/json"}), timeout=30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        raise click.ClickException(f"{url}: {err.code} {json.loads(err.read()).get('detail')}") from None
    except OSError as err:
        raise click.ClickException(f"{url}: {err}") from None


@main.command()
@click.option("--loglevel", default="info", show_default=True)
@click.option("--role", type=click.Choice(["all", "items", "users"]), default="all", show_default=True,
              help="Which agents to run: items (item-uploads → item vectors), users (user-actions → user vectors) "
                   "or both. Workers of every role share one consumer group; scale each role with its own count.")
@click.pass_obj
def worker(settings: Settings, loglevel: str, role: str) -> None:
    """Run the stream worker (faust): item-uploads and user-actions → embeddings → Feast.

    With COLDSTART_METRICS_PORT set, GET /metrics (Prometheus), /health and /ready answer on that port.
    """
    without_torch()
    plain_metrics()
    from encoders.export_format import ExportMissing
    from streams.app import create_app
    from streams.patches import CodecsMissing

    try:
        app = create_app(settings, role)
    except (ExportMissing, CodecsMissing) as missing:
        raise click.ClickException(str(missing)) from None
    sys.argv = ["coldstart worker", "worker", "--loglevel", loglevel, "--without-web"]
    app.main()


@main.command()
@click.option("--catalogue", type=click.Choice(["films", "books"]), default="films", show_default=True,
              help="films: MovieLens-100K, served by towers trained on the cold protocol (COLDSTART_TOWERS_DIR); "
                   "fresh films' retrievability and online HR@50. books: the shipped catalogue, upload to readable.")
@click.option("--rate", type=float, default=50.0, show_default=True,
              help="Uploads per second (films: of the fresh films; books: of every item).")
@click.option("--users", type=int, default=0, help="films: replay only N users, those whose next film is fresh first "
                                                   "(0: all).")
@click.option("--items", "limit", type=int, default=0, help="books: upload only the first N items (0: all).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for each step.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def demo(settings: Settings, catalogue: str, rate: float, users: int, limit: int, timeout: float, as_json: bool) -> None:
    """End to end on a fresh local stack (broker, Redis, Feast, a worker). films: upload the films the towers
    trained on, replay users' histories, upload the films they never trained on fresh; how soon each is
    retrievable, and the online HR@50 beside the offline one. books: upload-to-readable latency."""
    from coldstart.dev.demo import run_demo
    from coldstart.dev.films_demo import ColdTowersMissing

    try:
        ok = run_demo(settings, catalogue=catalogue, rate=rate, limit=limit, users=users, timeout=timeout,
                      as_json=as_json)
    except ColdTowersMissing as missing:
        raise click.ClickException(str(missing)) from None
    sys.exit(0 if ok else 1)
