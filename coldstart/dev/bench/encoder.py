"""`coldstart bench encoder`: the frozen encoder alone, torch eager vs ONNX Runtime fp32 vs int8, by batching.

Every configuration encodes the same catalogue texts in arrival order. The configurations are interleaved: each
pass runs every one in turn, and a row reports the median pass, so a machine's drift (other work on shared cores)
hits all of them alike. Ratios to ONNX fp32 compare the same batch size within one run."""

from __future__ import annotations

import click
import numpy as np

from coldstart.config import Settings
from coldstart.dev.bench.common import emit, items_per_s, machine
from coldstart.dev.catalogue import catalogue_texts


@click.command()
@click.option("--items", "count", type=int, default=200, show_default=True, help="Texts per configuration.")
@click.option("--batch-sizes", default="1,8,64", show_default=True,
              help="Rows per ONNX Runtime run for the fixed rows (torch: texts per call).")
@click.option("--micro-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Texts per call for the service's own batching (the worker's COLDSTART_BATCH_SIZE).")
@click.option("--passes", type=click.IntRange(1), default=3, show_default=True,
              help="Interleaved passes over every configuration; rows report the median.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def encoder(settings: Settings, count: int, batch_sizes: str, micro_batch: int, passes: int, as_json: bool) -> None:
    """Items/s of the frozen encoder: torch eager fp32 vs ONNX Runtime fp32 vs int8, by batching."""
    summary = run_encoder_bench(settings, count, [int(b) for b in batch_sizes.split(",")], micro_batch, passes)
    emit(summary["configs"], summary, as_json)


def run_encoder_bench(settings: Settings, count: int, batch_sizes: list[int], micro_batch: int = 64,
                      passes: int = 3) -> dict:
    from encoders.content import OnnxContentEncoder
    from encoders.training.ceg import FrozenContentEncoder, encode_with_torch, ensure_exported, load_tokenizer
    from encoders.training.registry import encoder_config

    config = encoder_config(settings.encoder_name, settings.encoder_model_path)
    export_dir = ensure_exported(config, settings.encoder_export_dir, catalogue_texts(0))
    texts = catalogue_texts(count)
    threads = settings.onnx_session_threads
    torch_encoder, tokenizer = FrozenContentEncoder(config), load_tokenizer(config)

    def in_batches(size: int) -> list[list[str]]:
        return [texts[i : i + size] for i in range(0, len(texts), size)]  # arrival order

    # (runtime, batching, encode, batches of texts per call). ONNX "fixed b": runs of b rows, `threads` of them
    # side by side (each call gets threads x b texts); "service": the worker's micro-batches, cut as it cuts them.
    configs = []
    for b in batch_sizes:
        configs.append(("torch-fp32", f"fixed {b}", lambda t, b=b: encode_with_torch(
            torch_encoder, tokenizer, t, batch_size=b).numpy(), in_batches(b)))
        for precision in ("fp32", "int8"):
            onnx = OnnxContentEncoder(export_dir, precision, max_batch_tokens=10**9, max_batch_items=b, threads=threads)
            configs.append((f"onnx-{precision}", f"fixed {b}", onnx.encode, in_batches(b * onnx.session.parallel_runs)))
    for precision in ("fp32", "int8"):
        onnx = OnnxContentEncoder(export_dir, precision, threads=threads)
        configs.append((f"onnx-{precision}" + (" (service)" if precision == settings.encoder_precision else ""),
                        f"service, {micro_batch} per call", onnx.encode, in_batches(micro_batch)))

    rates: list[list[float]] = [[] for _ in configs]
    vectors: list[np.ndarray] = []
    for n in range(passes):
        for i, (_, _, encode, batches) in enumerate(configs):
            rate, encoded = items_per_s(encode, batches)
            rates[i].append(rate)
            if n == 0:
                vectors.append(encoded)
    reference = vectors[0]  # torch fp32 at the first batch size
    rows = []
    for (runtime, batching, _, _), rate, encoded in zip(configs, rates, vectors):
        cosines = (encoded * reference).sum(axis=1)
        rows.append({"runtime": runtime, "batching": batching, "items_per_s": round(float(np.median(rate)), 1),
                     "range": f"{min(rate):.0f}–{max(rate):.0f}", "min_cos": round(float(cosines.min()), 4),
                     "mean_cos": round(float(cosines.mean()), 4)})
    for row in rows:
        fp32 = next(r for r in rows if r["runtime"].startswith("onnx-fp32") and r["batching"] == row["batching"])
        row["x_onnx_fp32"] = round(row["items_per_s"] / fp32["items_per_s"], 2)
    eligible = [r for r in rows if r["min_cos"] >= 0.99 and r["runtime"] != "torch-fp32"]
    best = max(eligible, key=lambda r: r["items_per_s"])
    service = next(r for r in rows if r["runtime"].endswith("(service)"))
    same_graph = service["runtime"].removesuffix(" (service)")
    best_fixed = max((r for r in eligible if r["runtime"] == same_graph and r["batching"].startswith("fixed")),
                     key=lambda r: r["items_per_s"], default=service)
    return {"benchmark": "encoder", "machine": machine(), "items": count, "passes": passes, "threads": threads,
            "configs": rows, "fastest_with_cos_0.99": best, "best_items_per_s": best["items_per_s"],
            "service_items_per_s": service["items_per_s"], "service_x_onnx_fp32": service["x_onnx_fp32"],
            "service_vs_best_fixed": round(service["items_per_s"] / best_fixed["items_per_s"], 2)}
