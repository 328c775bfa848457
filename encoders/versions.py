"""The model-version registry: every exported model, by name, in one folder (COLDSTART_REGISTRY_DIR).

A version is what makes a vector: the towers (ONNX, and the ID parts of hybrid
towers), the frozen encoder they read (its name, precision and the digest of
its export), the training config and a fingerprint of the training data, with
the towers' offline evaluation. One folder per version, named
`<config>@<digest>` where the digest covers all of those, so two exports that
would make different vectors never share a name:

    <registry>/<config>@<digest>/
        item_tower.onnx, user_tower.onnx, towers.json, [id_parts.npz]   a copy of the exported towers
        version.json                                                    what the version is (below)

version.json: name, config, protocol, encoder (name), encoder_precision,
encoder_version (the digest-stamped version the encoder export reports), towers_version,
data_digest (the checkpoint's training-data fingerprint; null if unknown), test_metrics
(towers.json's), created_at (ISO-8601).

The encoder itself is not copied (hundreds of MB): it stays in COLDSTART_ONNX_DIR/<encoder>,
and a worker loading a version checks that the export there still has the recorded digest.
Which version is served is the rollout state's business (coldstart.rollout), not the registry's.
Serving layer: no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from encoders.export_format import ID_PARTS, ITEM_TOWER_ONNX, TOWERS_METADATA, USER_TOWER_ONNX, read_encoder_metadata

VERSION_METADATA = "version.json"
TOWER_FILES = (ITEM_TOWER_ONNX, USER_TOWER_ONNX, ID_PARTS, TOWERS_METADATA)


class UnknownVersion(LookupError):
    """No version of that name in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class Version:
    name: str
    path: Path  # the version's folder: its towers load from here (encoders.towers.load_towers)
    metadata: dict

    @property
    def encoder(self) -> str:
        return self.metadata["encoder"]

    @property
    def encoder_precision(self) -> str:
        return self.metadata["encoder_precision"]

    @property
    def encoder_version(self) -> str:
        return self.metadata["encoder_version"]

    @property
    def slug(self) -> str:
        """The name in the characters a Feast project allows (letters, digits, underscores)."""
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())


def register(registry_dir: Path, towers_dir: Path, encoder_dir: Path, precision: str,
             data_digest: str | None) -> tuple[Version, bool]:
    """Add the towers in towers_dir (served with the encoder export in encoder_dir at this precision) to the
    registry; returns the version and whether it is new (registering the same model again changes nothing)."""
    towers = json.loads((Path(towers_dir) / TOWERS_METADATA).read_text())
    encoder = read_encoder_metadata(encoder_dir)
    if towers.get("encoder") != encoder["name"]:
        raise ValueError(f"the towers in {towers_dir} were trained on encoder {towers.get('encoder')!r}, "
                         f"not {encoder['name']!r}")
    files = [name for name in TOWER_FILES if (Path(towers_dir) / name).exists()]
    digest = hashlib.sha256(json.dumps([encoder["name"], encoder["versions"][precision], data_digest]).encode())
    for name in files:
        if name != TOWERS_METADATA:  # the graphs and ID parts make the vectors; the metadata only describes them
            digest.update(name.encode() + b"\0" + (Path(towers_dir) / name).read_bytes())
    name = f"{towers['config']}@{digest.hexdigest()[:12]}"
    folder = Path(registry_dir) / name
    if (folder / VERSION_METADATA).exists():
        return load(registry_dir, name), False
    tmp = Path(registry_dir) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in files:
        shutil.copy2(Path(towers_dir) / file, tmp / file)
    metadata = {
        "name": name, "config": towers["config"], "protocol": towers.get("protocol"),
        "encoder": encoder["name"], "encoder_precision": precision, "encoder_version": encoder["versions"][precision],
        "towers_version": towers["version"], "data_digest": data_digest,
        "test_metrics": towers.get("test_metrics"), "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (tmp / VERSION_METADATA).write_text(json.dumps(metadata, indent=2))
    tmp.replace(folder)  # a version folder is complete or absent
    return Version(name, folder, metadata), True


def load(registry_dir: Path, name: str) -> Version:
    folder = Path(registry_dir) / name
    if not (folder / VERSION_METADATA).exists():
        known = ", ".join(v.name for v in list_versions(registry_dir)) or "none"
        raise UnknownVersion(f"no version {name!r} in {registry_dir} (known: {known})")
    return Version(name, folder, json.loads((folder / VERSION_METADATA).read_text()))


def list_versions(registry_dir: Path) -> list[Version]:
    """Every registered version, oldest first."""
    found = [Version(p.parent.name, p.parent, json.loads(p.read_text()))
             for p in Path(registry_dir).glob(f"*/{VERSION_METADATA}") if not p.parent.name.startswith(".")]
    return sorted(found, key=lambda v: v.metadata["created_at"])
