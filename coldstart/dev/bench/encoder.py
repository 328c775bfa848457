"""`coldstart bench encoder`: the frozen encoder alone, torch eager vs ONNX Runtime fp32 vs int8, by batching."""

from __future__ import annotations

import click

from coldstart.config import Settings
from coldstart.dev.bench.common import emit, items_per_s, machine
from coldstart.dev.catalogue import catalogue_texts


@click.command()
@click.option("--items", "count", type=int, default=200, show_default=True, help="Texts per configuration.")
@click.option("--batch-sizes", default="1,8,64", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def encoder(settings: Settings, count: int, batch_sizes: str, as_json: bool) -> None:
    """Items/s of the frozen encoder: torch eager fp32 vs ONNX Runtime fp32 vs int8, by batching."""
    summary = run_encoder_bench(settings, count, [int(b) for b in batch_sizes.split(",")])
    emit(summary["configs"], summary, as_json)


def run_encoder_bench(settings: Settings, count: int, batch_sizes: list[int]) -> dict:
    from encoders.content import OnnxContentEncoder
    from encoders.training.ceg import FrozenContentEncoder, encode_with_torch, ensure_exported, load_tokenizer
    from encoders.training.registry import encoder_config

    config = encoder_config(settings.encoder_name, settings.encoder_model_path)
    export_dir = ensure_exported(config, settings.encoder_export_dir, catalogue_texts(0))
    texts = catalogue_texts(count)
    torch_encoder, tokenizer = FrozenContentEncoder(config), load_tokenizer(config)

    runtimes = {
        "torch-fp32": lambda b: lambda t: encode_with_torch(torch_encoder, tokenizer, t, batch_size=b).numpy(),
        "onnx-fp32": lambda b: OnnxContentEncoder(export_dir, "fp32", max_batch_tokens=10**9, max_batch_items=b).encode,
        "onnx-int8 (service)": lambda b: OnnxContentEncoder(export_dir, "int8", max_batch_tokens=10**9, max_batch_items=b).encode,
    }
    reference = None
    rows = []
    for batch_size in batch_sizes:
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]  # arrival order
        for name, make in runtimes.items():
            rate, vectors = items_per_s(make(batch_size), batches)
            if reference is None:
                reference = vectors  # torch fp32, the first configuration run
            cosines = (vectors * reference).sum(axis=1)
            rows.append({"runtime": name, "batching": f"fixed {batch_size}", "items_per_s": round(rate, 1),
                         "min_cos": round(float(cosines.min()), 4), "mean_cos": round(float(cosines.mean()), 4)})
    for name in ("onnx-fp32", "onnx-int8 (service)"):  # token budget: sorted by length
        encoder = OnnxContentEncoder(export_dir, "fp32" if name == "onnx-fp32" else "int8")
        rate, vectors = items_per_s(encoder.encode, [texts])
        cosines = (vectors * reference).sum(axis=1)
        rows.append({"runtime": name, "batching": f"token budget {encoder.max_batch_tokens}",
                     "items_per_s": round(rate, 1), "min_cos": round(float(cosines.min()), 4),
                     "mean_cos": round(float(cosines.mean()), 4)})
    torch_best = max(r["items_per_s"] for r in rows if r["runtime"] == "torch-fp32")
    for row in rows:
        row["x_torch"] = round(row["items_per_s"] / torch_best, 2)
    eligible = [r for r in rows if r["min_cos"] >= 0.99 and r["runtime"] != "torch-fp32"]
    best = max(eligible, key=lambda r: r["items_per_s"])
    return {"benchmark": "encoder", "machine": machine(), "items": count, "configs": rows,
            "fastest_with_cos_0.99": best, "best_items_per_s": best["items_per_s"]}


