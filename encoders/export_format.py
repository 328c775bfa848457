"""The export-folder contract: what `coldstart export` / `export-towers` write and the workers read.

Encoder folder (COLDSTART_ONNX_DIR/<encoder name>/), written by encoders.training.ceg:
- model.onnx, model.int8.onnx: input_ids, attention_mask (int64, (B, T)) → sentence_embedding
  (float32, (B, D), L2-normalised); model.onnx is written last, so its presence means the
  export is complete;
- tokenizer.json: the `tokenizers` library's file (no transformers needed to read it);
- encoder.json: ENCODER_FORMAT, name, dim, max_tokens, pooling, pad_token_id, versions
  (per precision: the model version the vectors are stamped with).

Towers folder (COLDSTART_ONNX_DIR/towers/), written by encoders.training.export_towers;
its interface is described there.
"""

from __future__ import annotations

import json
from pathlib import Path

ENCODER_FORMAT = 5  # 2: tokenizer.json read by `tokenizers`, pad_token_id in encoder.json; 3: int8 with static
# activation scales; 4: every MatMul int8, outlier channels smoothed; 5: 7-bit weights (encoders.training.quantize)
ENCODER_METADATA = "encoder.json"
ENCODER_ONNX = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
ENCODER_COMPLETE = ENCODER_ONNX["fp32"]  # written last by an export
TOKENIZER_FILE = "tokenizer.json"

TOWERS_METADATA = "towers.json"
USER_TOWER_ONNX = "user_tower.onnx"
ITEM_TOWER_ONNX = "item_tower.onnx"
ID_PARTS = "id_parts.npz"  # hybrid towers only: the learned ID parts of the items seen in training


class ExportMissing(FileNotFoundError):
    """No usable export in a folder; the message says which command makes one."""


def encoder_export_is_current(export_dir: Path) -> bool:
    """Whether export_dir holds a complete encoder export of the current format."""
    metadata_path = Path(export_dir) / ENCODER_METADATA
    if not (Path(export_dir) / ENCODER_COMPLETE).exists() or not metadata_path.exists():
        return False
    return json.loads(metadata_path.read_text()).get("format") == ENCODER_FORMAT


def read_encoder_metadata(export_dir: Path) -> dict:
    """encoder.json of a complete, current export; ExportMissing saying what to run otherwise."""
    if not encoder_export_is_current(export_dir):
        raise ExportMissing(f"no current encoder export in {export_dir}: run `coldstart export` "
                            "(with the same COLDSTART_ONNX_DIR and COLDSTART_ENCODER)")
    return json.loads((Path(export_dir) / ENCODER_METADATA).read_text())
