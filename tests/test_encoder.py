"""The ONNX export of the frozen encoder against its torch reference."""

import numpy as np
import pytest

from encoders.training.ceg import CEGConfig, FrozenContentEncoder, encode_with_torch, load_tokenizer
from encoders.content import OnnxContentEncoder
from tests.conftest import SETTINGS
from encoders.text import item_text

TEXTS = [
    item_text("Salt, Fat, Acid, Heat", "Mastering the elements of good cooking.", "cookbooks", "Samin Nosrat", ["cooking"]),
    item_text("Dune", "A desert planet, a noble family, a messiah.", "science fiction", "Frank Herbert"),
    "x",
    "Ünïcödé — 日本語のテキスト — emoji 🍜",
    "word " * 1000,  # longer than the 256-token budget: truncated identically on both paths
]


@pytest.fixture(scope="module")
def encoders_pair():
    onnx_encoder = OnnxContentEncoder(SETTINGS.encoder_export_dir, max_batch_tokens=512, threads=2)
    config = CEGConfig()
    return onnx_encoder, FrozenContentEncoder(config), load_tokenizer(config)


@pytest.mark.parametrize("batch", [1, 3, len(TEXTS)])
def test_onnx_matches_torch_per_item(encoders_pair, batch):
    onnx_encoder, torch_encoder, tokenizer = encoders_pair
    texts = TEXTS[:batch]
    got = onnx_encoder.encode(texts)
    want = encode_with_torch(torch_encoder, tokenizer, texts).numpy()
    assert got.shape == (batch, 384)
    cosines = (got * want).sum(axis=1)
    assert cosines.min() >= 0.999, cosines


def test_batching_by_length_keeps_order(encoders_pair):
    onnx_encoder = encoders_pair[0]
    one_by_one = np.stack([onnx_encoder.encode([t])[0] for t in TEXTS])
    together = onnx_encoder.encode(TEXTS)  # sorted into batches by length, run two at a time, order restored
    assert np.allclose(one_by_one, together, atol=1e-5)
    batches = onnx_encoder._batches
    assert onnx_encoder.session.parallel_runs == 2 and onnx_encoder.max_batch_items == 8
    # two parallel runs: a call is cut into two batches at least, so both cores work on it
    assert batches([[0] * 100, [0] * 5]) == [[1], [0]]
    assert batches([[0] * 10] * 20) == [[*range(8)], [*range(8, 16)], [*range(16, 20)]]
    # budget 512 padded tokens: 300 goes alone (5 + 100 fit: 2 × 100)
    assert batches([[0] * 100, [0] * 5, [0] * 300, [0] * 100]) == [[1, 0], [3], [2]]


def test_vectors_are_unit_length_and_meaningful(encoders_pair):
    onnx_encoder = encoders_pair[0]
    cook_a, cook_b, scifi = onnx_encoder.encode([
        "Mastering the Art of French Cooking, a classic cookbook of French recipes",
        "The Joy of Cooking, an American cookbook with recipes for every meal",
        "Foundation, Isaac Asimov's science fiction saga of a galactic empire",
    ])
    assert np.allclose(np.linalg.norm([cook_a, cook_b, scifi], axis=1), 1, atol=1e-5)
    assert cook_a @ cook_b > cook_a @ scifi


@pytest.fixture(scope="module")
def served_and_fp32():
    """The service's int8 encoder and the fp32 graph it was quantized from, on the demo catalogue's texts."""
    from coldstart.dev.catalogue import catalogue_texts

    return (OnnxContentEncoder(SETTINGS.encoder_export_dir, precision="int8"),
            OnnxContentEncoder(SETTINGS.encoder_export_dir, precision="fp32"), catalogue_texts(0))


def test_served_int8_stays_within_cosine_099_of_fp32(served_and_fp32):
    int8, fp32, texts = served_and_fp32
    cosines = (int8.encode(texts) * fp32.encode(texts)).sum(axis=1)
    assert cosines.min() >= 0.99, cosines.min()
    held_out = TEXTS[:2] + [item_text("The Name of the Rose", "A murder mystery in a medieval abbey.", "mystery")]
    assert ((int8.encode(held_out) * fp32.encode(held_out)).sum(axis=1) >= 0.99).all()


def test_served_int8_vector_does_not_depend_on_what_shares_its_batch(served_and_fp32):
    int8, _, texts = served_and_fp32
    texts = texts[:40] + TEXTS  # lengths from 1 to 256 tokens: padded batches of every shape
    alone = np.stack([int8.encode([t])[0] for t in texts])
    together = int8.encode(texts)
    assert np.abs(alone - together).max() < 1e-5  # static activation scales: only float summation order differs


def test_an_idle_session_leaves_the_cores_to_others(encoders_pair):
    """Between runs the intra-op pool's threads sleep: spinning for the next run (ORT's default) burned half a core
    after each call, which the worker's other sessions needed (BENCHMARKS.md, issue 19, session 12)."""
    import time

    onnx_encoder = encoders_pair[0]
    feeds = onnx_encoder._feeds([e.ids for e in onnx_encoder.tokenizer.encode_batch(TEXTS[:2] * 8)])
    idle_cpu = 0.0
    for _ in range(10):
        onnx_encoder.session.pool.run(["sentence_embedding"], feeds)  # 16 rows: the two-thread pool
        started = time.process_time()
        time.sleep(0.05)
        idle_cpu += time.process_time() - started
    assert idle_cpu < 0.1, f"{idle_cpu:.3f} s of CPU in 0.5 s of idling"  # spinning: ~0.25 s; sleeping: ~0.001 s
