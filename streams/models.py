"""The models of every version the rollout state names, as the agents use them.

Outside a rollout a worker serves one version (the active one); during a
rollout it writes every upload and action to the active AND the target version,
each with its own towers (and encoder, if the target's differs) into its own
Feast project (coldstart.rollout). After its online writes an agent calls
`added_since` (it re-reads the state): a version that appeared while the batch
was processed gets the batch too, before the offsets are committed, so nothing
a backfill might have read too early is lost (streams.rollout explains the
order). Loading happens off the event loop, once per version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


from coldstart import rollout
from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_VIEW, Settings
from encoders import versions
from encoders.content import OnnxContentEncoder
from encoders.towers import load_towers

log = logging.getLogger(__name__)


@dataclass
class VersionModels:
    """One version's towers, encoder and Feast store (its project), and its offline tables."""

    name: str
    settings: Settings
    encoder: OnnxContentEncoder | None  # None for a user-only worker role
    towers: object
    store: object
    item_offline: feast_store.OfflineTable
    user_offline: feast_store.OfflineTable

    @property
    def item_version(self) -> str:
        """What item vectors are stamped with (model_version): encoder and towers."""
        return f"{self.encoder.version}+{self.towers.version}"


class ServedVersions:
    """The versions the state names, loaded on first use; `current()` re-reads the state."""

    def __init__(self, settings: Settings, with_encoder: bool = True):
        self.settings = settings
        self.with_encoder = with_encoder
        self.client = rollout.redis_client(settings)
        self.loaded: dict[str, VersionModels] = {}
        self.encoders: dict[tuple[str, str], OnnxContentEncoder] = {}  # (export folder, precision) → encoder
        self.last_state: rollout.RolloutState | None = None

    def current(self, users: bool = False, fallback: bool = True) -> list[VersionModels]:
        """The versions to write items (or users) to now, the active one first. Blocking: one Redis GET,
        and the first time a version is named, loading it. With fallback, the last state read while Redis
        cannot be read; without, the Redis error."""
        # With fallback, the batch's writes then wait for Redis (retried), and the re-read before the commit
        # (added_since: no fallback, retried) catches a change made before the outage.
        state = self.last_state = (rollout.read_state_or_last(self.client, self.settings, self.last_state) if fallback
                                   else rollout.read_state(self.client, self.settings))
        return [self.load(name) for name in (state.serving_users if users else state.serving)]

    def added_since(self, written: list[VersionModels], users: bool = False) -> list[VersionModels]:
        """Versions in the state now that the given writes did not cover: a fresh read (the caller retries it)."""
        names = {v.name for v in written}
        return [v for v in self.current(users, fallback=False) if v.name not in names]

    def load(self, name: str) -> VersionModels:
        if name not in self.loaded:
            settings = rollout.version_settings(self.settings, name)
            store = feast_store.open_store(settings)
            self.loaded[name] = VersionModels(
                name, settings, self._encoder(settings, name) if self.with_encoder else None,
                load_towers(settings.towers_dir, settings.encoder_name, settings.onnx_session_threads), store,
                feast_store.offline_table(store, ITEM_VIEW), feast_store.offline_table(store, USER_VIEW))
            log.info("model version %s loaded (Feast project %s)", name, settings.feast_project)
        return self.loaded[name]

    def _encoder(self, settings: Settings, name: str) -> OnnxContentEncoder:
        key = (str(settings.encoder_export_dir), settings.encoder_precision)
        if key not in self.encoders:
            self.encoders[key] = OnnxContentEncoder(settings.encoder_export_dir, precision=settings.encoder_precision,
                                                    threads=settings.onnx_session_threads)
        encoder = self.encoders[key]
        if name != rollout.DEFAULT:
            recorded = versions.load(self.settings.registry_dir, name).encoder_version
            if encoder.version != recorded:
                raise ValueError(f"version {name} was registered with encoder {recorded}, but "
                                 f"{settings.encoder_export_dir} now holds {encoder.version}: export that encoder "
                                 "again, or register the towers again with this one")
        return encoder
