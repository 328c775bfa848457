"""Smoke runs of the benchmarks so they cannot rot: they run and their JSON is well formed (no timings asserted)."""

import json
import subprocess
import sys


def run_bench(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "coldstart.cli", "bench", *args, "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_encoder_reports_items_per_s_and_cosine_per_configuration():
    summary = run_bench("encoder", "--items", "8", "--batch-sizes", "4")
    runtimes = {row["runtime"] for row in summary["configs"]}
    assert {"torch-fp32", "onnx-fp32", "onnx-int8 (service)"} <= runtimes
    for row in summary["configs"]:
        assert row["items_per_s"] > 0 and -1 <= row["min_cos"] <= row["mean_cos"] <= 1.0001
    assert summary["fastest_with_cos_0.99"]["min_cos"] >= 0.99
    assert summary["service_x_onnx_fp32"] > 0 and summary["service_vs_best_fixed"] > 0


def test_bench_pipeline_reports_latency_per_rate_and_efficiency():
    summary = run_bench("pipeline", "--rates", "50", "--seconds", "1", "--saturation-items", "20", "--naive-items", "3",
                        "--no-plot")
    assert [row["offered_per_s"] for row in summary["rates"]] == [50.0, "max"]
    assert all(row["arrived"] == row["items"] for row in summary["rates"])
    assert summary["efficiency"] > 0 and summary["p99_ms_at_50"] > 0
    assert summary["naive_items_per_s"] > 0 and summary["ratio_to_naive"] > 0 and summary["client_cpu_cores"] >= 0
    assert set(summary["saturation_cpu_cores"]) == {"worker", "broker", "client"}


def test_bench_lookup_compares_feast_and_http_with_raw_redis():
    summary = run_bench("lookup", "--sizes", "1,100", "--repeats", "3")
    paths = {(row["items"], row["path"]) for row in summary["results"]}
    assert len(paths) == 10  # 2 sizes x (SDK, SDK on-demand, Feast's HTTP, our HTTP, raw)
    assert summary["ratio_to_raw_p99_100"] > 0 and summary["http_ratio_to_raw_p99_100"] > 0
    assert summary["coldstart_http_ratio_to_raw_p99_100"] > 0


def test_bench_actions_measures_action_to_user_vector_latency():
    summary = run_bench("actions", "--rate", "20", "--seconds", "1", "--users", "10")
    assert summary["row"]["updated"] == summary["row"]["actions"] == 20
    assert summary["action_to_vector_p99_ms_at_20"] > 0


def test_bench_startup_reports_start_up_time_memory_and_torch_per_worker():
    summary = run_bench("startup", "--runs", "1")
    (row,) = summary["results"]
    assert row["worker"] == "this checkout" and row["startup_s_median"] > 0 and row["rss_mb_median"] > 0
    assert row["torch_mapped"] is False


def test_bench_retrieve_reports_the_machine_readable_fields():
    summary = run_bench("retrieve", "--items", "3000", "--queries", "20", "--recall-queries", "10", "--beams", "32,64",
                        "--rate", "50", "--uploads", "10", "--repeats", "5")
    for key in ("items", "recall_at_100", "p99_ms", "build_s", "bytes_per_item", "upload_to_retrievable_p99_ms",
                "upload_to_published_p99_ms", "published_to_retrievable_p99_ms", "client_cpu_cores"):
        assert summary[key] is not None, key
    assert summary["items"] == 3000 and 0 <= summary["recall_at_100"] <= 1
    beams = [row["expansion_search"] for row in summary["beams"]]
    assert beams == sorted({32, 64, summary["expansion_search"]})  # the configured beam's row is the summary's


def test_bench_rollout_reports_backfill_speed_switch_time_and_no_mixed_or_lost_events():
    summary = run_bench("rollout", "--items", "300", "--users", "40", "--history", "5", "--rate", "4", "--page", "100")
    assert summary["items"] >= 300 and summary["users"] >= 40
    for key in ("backfill_items_per_s", "backfill_items_per_s_with_encoder", "users_per_s", "switch_s", "rollback_s"):
        assert summary[key] > 0, key
    assert summary["rollback_instant"] is True
    assert summary["mixed_version_responses"] == 0 and summary["lost_events"] == 0
