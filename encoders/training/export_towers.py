"""Export LEARN's user and item towers to ONNX: what the stream workers run.

Interface (stable; the stream workers depend on it):

- `user_tower.onnx`
    input  `history`       float32 (B, N, C): content embeddings of the user's
                           last N items, oldest first, RIGHT-padded (row b holds
                           its items in positions 0..len_b-1; padding values are
                           ignored)
    input  `history_mask`  int64 (B, N): 1 for a real item, 0 for padding; every
                           row needs at least one item
    input  `history_id_parts` float32 (B, N, W), hybrid towers only: each history
                           item's row of id_parts.npz "history_parts" (zeros for
                           an item not in it, and for padding)
    output `user_embedding` float32 (B, D): L2-normalised, after the last item
- `item_tower.onnx`
    input  `content_embedding` float32 (B, C): the item's CEG embedding
    input  `item_id_parts`     float32 (B, H), hybrid towers only: the item's row of
                               id_parts.npz "item_parts" (zeros if not in it)
    output `item_embedding`    float32 (B, D): L2-normalised
- `id_parts.npz` (hybrid towers only): item_ids (W,) the ids of the items seen in
  training, item_parts (W, H), history_parts (W, W'), row-aligned.
- `towers.json`: content_dim (C), out_dim (D), max_history (N), padding
  ("right"), mask_dtype, id_parts (bool), encoder (the CEG name the towers
  were trained on: feed them embeddings from that encoder only), config,
  protocol, checkpoint_sha256 (of the checkpoint exported; null for a model
  never saved), version; and, where the exporter knows them, split (the
  protocol's cold_fraction and seed: with the data set they name the items
  the towers never trained on, encoders.training.datasets.make_split) and
  test_metrics (the towers' offline test HR@k/NDCG@k per slice, "n" users
  each, as `coldstart evaluate` scores them: torch, fp32 content embeddings).

Score = dot product of the two embeddings (a cosine). N is fixed at export;
B is dynamic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from encoders.training.model import LEARN
from encoders.export_format import ID_PARTS, ITEM_TOWER_ONNX, TOWERS_METADATA, USER_TOWER_ONNX
from encoders.towers import OnnxTowers

log = logging.getLogger(__name__)


class UserTowerGraph(nn.Module):
    """(B, N, C) content + (B, N) mask [+ (B, N, W) ID parts] → (B, D): the PCH output at each row's last real item."""

    def __init__(self, model: LEARN):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor,
                history_id_parts: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.model.history_vectors(history, history_mask, history_id_parts)  # (B, N, D)
        last = (history_mask.long().sum(dim=1) - 1).clamp(min=0)  # (B,)
        index = last[:, None, None].expand(-1, 1, vectors.shape[-1])  # (B, 1, D)
        return vectors.gather(1, index).squeeze(1)  # (B, D)


class ItemTowerGraph(nn.Module):
    def __init__(self, model: LEARN):
        super().__init__()
        self.model = model

    def forward(self, content_embedding: torch.Tensor, item_id_parts: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.content_item_vectors(content_embedding, item_id_parts)  # (B, D)


def export_towers(model: LEARN, out_dir: Path, encoder: str, config_name: str, protocol: str,
                  item_ids: list[str], checkpoint_sha256: str | None = None, split: dict | None = None,
                  test_metrics: dict | None = None) -> Path:
    """Write user_tower.onnx, item_tower.onnx, towers.json (with split and test_metrics if given; and
    id_parts.npz for hybrid towers) into out_dir.

    item_ids: the data set's id of every model item index (what the service's events carry)."""
    model = model.cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    c, n = model.config.content_dim, model.config.max_history
    batch = torch.export.Dim("batch", min=1, max=65536)
    history = torch.randn(3, n, c)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, 7:] = 0
    user_args, user_inputs = (history, mask), ["history", "history_mask"]
    item_args, item_inputs = (torch.randn(3, c),), ["content_embedding"]
    hybrid = model.config.id_residual
    if hybrid:
        some = torch.arange(3 * n).remainder(len(model.content)).view(3, n)  # any items: shapes only
        user_args, user_inputs = (*user_args, model.history_id_parts(some)), [*user_inputs, "history_id_parts"]
        item_args, item_inputs = (*item_args, model.item_id_parts(torch.arange(3))), [*item_inputs, "item_id_parts"]
        _save_id_parts(model, item_ids, out_dir / ID_PARTS)
    else:
        (out_dir / ID_PARTS).unlink(missing_ok=True)
    exports = [
        (UserTowerGraph(model).eval(), user_args, user_inputs, "user_embedding", ({0: batch},) * len(user_args),
         USER_TOWER_ONNX),
        (ItemTowerGraph(model).eval(), item_args, item_inputs, "item_embedding", ({0: batch},) * len(item_args),
         ITEM_TOWER_ONNX),
    ]
    digest = hashlib.sha256()
    for graph, args, inputs, output, shapes, filename in exports:
        tmp = out_dir / (filename + ".tmp")
        torch.onnx.export(graph, args, str(tmp), input_names=inputs, output_names=[output],
                          dynamic_shapes=shapes, external_data=False, dynamo=True, verbose=False)
        digest.update(tmp.read_bytes())
        tmp.replace(out_dir / filename)
    metadata = {
        "content_dim": c, "out_dim": model.config.out_dim, "max_history": n,
        "padding": "right", "mask_dtype": "int64", "id_parts": hybrid, "encoder": encoder,
        "config": config_name, "protocol": protocol, "checkpoint_sha256": checkpoint_sha256, "version": f"{config_name}@{digest.hexdigest()[:12]}",
        **({"split": split} if split is not None else {}),
        **({"test_metrics": test_metrics} if test_metrics is not None else {}),
    }
    (out_dir / TOWERS_METADATA).write_text(json.dumps(metadata, indent=2))
    return out_dir


def _save_id_parts(model: LEARN, item_ids: list[str], path: Path) -> None:
    warm = torch.nonzero(model.warm).squeeze(1)  # only items seen in training have ID parts
    with torch.no_grad():
        np.savez(path, item_ids=np.array([item_ids[i] for i in warm.tolist()]),
                 item_parts=model.item_id_parts(warm).numpy(), history_parts=model.history_id_parts(warm).numpy())


def is_current(out_dir: Path, config_name: str, protocol: str, checkpoint_sha256: str) -> bool:
    """Whether out_dir already holds the towers exported from exactly this checkpoint."""
    if not all((out_dir / name).exists() for name in (USER_TOWER_ONNX, ITEM_TOWER_ONNX, TOWERS_METADATA)):
        return False
    metadata = json.loads((out_dir / TOWERS_METADATA).read_text())
    exported = metadata["config"], metadata["protocol"], metadata.get("checkpoint_sha256")
    return exported == (config_name, protocol, checkpoint_sha256)


@torch.no_grad()
def check_parity(model: LEARN, export_dir: Path, content: np.ndarray, item_ids: list[str], seed: int = 0) -> float:
    """Minimum cosine between torch and the towers as the workers load them (encoders.towers),
    over real content rows and ragged histories (warm and, if any, never-trained items)."""
    model = model.cpu().eval()
    towers = OnnxTowers(Path(export_dir))
    rng = np.random.default_rng(seed)
    n = towers.max_history
    histories = rng.integers(0, len(content), size=(16, n))
    lengths = rng.integers(1, n + 1, size=16)
    lengths[:2] = (1, n)
    mask = np.arange(n)[None, :] < lengths[:, None]  # (16, N) right-padded
    torch_users = model.last_user_vector(torch.from_numpy(np.where(mask, histories, -1))).numpy()
    onnx_users = towers.user_vectors([content[h[:length]] for h, length in zip(histories, lengths)],
                                     [[item_ids[i] for i in h[:length]] for h, length in zip(histories, lengths)])
    items = rng.integers(0, len(content), size=64)
    torch_items = model.item_vectors(torch.from_numpy(items)).numpy()
    onnx_items = towers.item_vectors(content[items], [item_ids[i] for i in items])
    cosines = np.concatenate([(torch_users * onnx_users).sum(1), (torch_items * onnx_items).sum(1)])
    return float(cosines.min())
