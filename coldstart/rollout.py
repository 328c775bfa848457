"""Which model version is served: the rollout state, and each version's own Feast project.

Vector spaces never mix because each version writes to a Feast project of its
own (`<COLDSTART_FEAST_PROJECT>_<version slug>`, registry and offline store
under `<COLDSTART_DATA_DIR>/versions/<version>/`, the same feature_repo/
definitions): its Redis keys differ from every other version's. The version
`default` is the service before any promotion: COLDSTART_TOWERS_DIR's towers
in COLDSTART_FEAST_PROJECT.

The rollout state is one Redis key, a JSON object, changed only by
compare-and-set (WATCH/MULTI):

    active      the version reads use
    target      the version being backfilled (null: no rollout); workers write to active AND target
    phase       "items" while the target's items are backfilled, then "users": workers write users to the
                target only in the "users" phase, when every item vector (and content embedding) a user tower
                reads is there
    previous    the version active before the last switch: what `rollback` goes back to
    standby     whether previous is kept current (workers keep writing to it until `coldstart model cleanup`
                drops it): then a rollback is one compare-and-set, with no backfill
    started_at  when the rollout to target began (epoch seconds)
    epoch       bumped at every change: a worker compares it to see that the state moved

Workers (streams.models), the backfill (streams.rollout) and the read path
(coldstart.ranking, coldstart.retrieval, coldstart.server) all read it here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace

import redis

from coldstart import store as feast_store
from coldstart.config import Settings
from encoders import versions

log = logging.getLogger(__name__)

DEFAULT = "default"  # the service before any promotion: COLDSTART_TOWERS_DIR into COLDSTART_FEAST_PROJECT


class RolloutConflict(RuntimeError):
    """The state does not allow this change (a rollout already under way, nothing to roll back…)."""


@dataclass(frozen=True)
class RolloutState:
    active: str = DEFAULT
    target: str | None = None
    phase: str | None = None
    previous: str | None = None
    standby: bool = False
    started_at: float | None = None
    epoch: int = 0

    @property
    def serving(self) -> tuple[str, ...]:
        """The versions workers write items to: the active one, the standby, the target during a rollout."""
        return self._with(self.target)

    @property
    def serving_users(self) -> tuple[str, ...]:
        """The versions workers write users to: the target only once its items are complete."""
        return self._with(self.target if self.phase == "users" else None)

    def _with(self, target: str | None) -> tuple[str, ...]:
        standby = self.previous if self.standby else None
        return tuple(dict.fromkeys(v for v in (self.active, standby, target) if v is not None))


def redis_client(settings: Settings) -> redis.Redis:
    return feast_store.redis_client(settings.redis_url)  # REDIS_URL: one Redis or a cluster (coldstart.store)


def state_key(settings: Settings) -> str:
    return f"coldstart:{settings.feast_project}:rollout"


def read_state(client: redis.Redis, settings: Settings) -> RolloutState:
    raw = client.get(state_key(settings))
    return RolloutState(**json.loads(raw)) if raw else RolloutState()


def read_state_or_last(client: redis.Redis, settings: Settings, last: RolloutState | None) -> RolloutState:
    """The state; while its Redis node cannot be read, `last` (the last state read), or the error if none.

    The state lives in the online store's Redis: while that node is down nobody can change it, and the
    caller's writes and reads of that Redis fail and are retried anyway; the other cluster masters keep serving.
    """
    try:
        return read_state(client, settings)
    except redis.RedisError as err:
        if last is None:
            raise
        log.warning("rollout state unreadable (%s); using the last one read", err)
        return last


def change_state(client: redis.Redis, settings: Settings, change) -> RolloutState:
    """Apply change(state) → new state by compare-and-set: retried if another process changed the state
    in between; change may raise RolloutConflict to refuse. Returns the new state."""
    key = state_key(settings)
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                current = RolloutState(**json.loads(raw)) if raw else RolloutState()
                new = replace(change(current), epoch=current.epoch + 1)
                pipe.multi()
                pipe.set(key, json.dumps(asdict(new)))
                pipe.execute()
                return new
            except redis.WatchError:
                continue


def begin(client: redis.Redis, settings: Settings, target: str) -> RolloutState:
    """Start (or continue) a rollout to target."""
    def start(state: RolloutState) -> RolloutState:
        if state.target == target:
            return state  # a rerun of the same promote: continue
        if state.target is not None:
            raise RolloutConflict(f"a rollout to {state.target} is under way: finish it (`coldstart model promote "
                                  f"{state.target}`) or drop it (`coldstart model abort`) first")
        if state.active == target:
            raise RolloutConflict(f"{target} is already the active version")
        # a standby being promoted is rebuilt like any target (its keys were cleared before this)
        standby = state.standby and state.previous != target
        return replace(state, target=target, phase="items", standby=standby, started_at=time.time())
    return change_state(client, settings, start)


def items_done(client: redis.Redis, settings: Settings, target: str) -> RolloutState:
    """The target's items are complete: workers start writing users to it too."""
    def users_phase(state: RolloutState) -> RolloutState:
        if state.target != target:
            raise RolloutConflict(f"the rollout to {target} was dropped or replaced (state: {state})")
        return replace(state, phase="users")
    return change_state(client, settings, users_phase)


def switch(client: redis.Redis, settings: Settings, target: str) -> RolloutState:
    """Make target the active version at once (its backfill complete)."""
    def flip(state: RolloutState) -> RolloutState:
        if state.target != target:
            raise RolloutConflict(f"the rollout to {target} was dropped or replaced (state: {state})")
        if state.phase != "users":
            raise RolloutConflict(f"the rollout to {target} has not backfilled its users yet (state: {state})")
        return replace(state, active=target, target=None, phase=None, previous=state.active, standby=True,
                       started_at=None)
    return change_state(client, settings, flip)


def swap_with_standby(client: redis.Redis, settings: Settings) -> RolloutState:
    """Rollback at once: the standby (kept current) becomes active, the active one the standby."""
    def swap(state: RolloutState) -> RolloutState:
        if state.target is not None:
            raise RolloutConflict(f"a rollout to {state.target} is under way: `coldstart model abort` it first")
        if state.previous is None or not state.standby:
            raise RolloutConflict("no standby version is kept current")
        return replace(state, active=state.previous, previous=state.active)
    return change_state(client, settings, swap)


def drop_standby(client: redis.Redis, settings: Settings) -> RolloutState:
    """Workers stop keeping the previous version current (its keys can then be deleted)."""
    return change_state(client, settings, lambda state: replace(state, standby=False))


def abort(client: redis.Redis, settings: Settings) -> RolloutState:
    """Drop an unfinished rollout: workers stop writing to the target; reads never left the active version."""
    def drop(state: RolloutState) -> RolloutState:
        if state.target is None:
            raise RolloutConflict("no rollout is under way")
        return replace(state, target=None, phase=None, started_at=None)
    return change_state(client, settings, drop)


def version_settings(settings: Settings, name: str) -> Settings:
    """The settings a version's workers and readers use: its own Feast project, data folder and towers."""
    if name == DEFAULT:
        return settings
    version = versions.load(settings.registry_dir, name)
    return replace(settings, feast_project=f"{settings.feast_project}_{version.slug}",
                   data_dir=settings.data_dir / "versions" / name, towers_path=str(version.path),
                   encoder_name=version.encoder, encoder_precision=version.encoder_precision)


class ServedStores:
    """The read path's view: the active version's Feast store, by the state in Redis (one GET per call, so
    every process switches with the state at once)."""

    def __init__(self, settings: Settings, store=None):
        self.settings = settings
        self.client = redis_client(settings)
        self.stores = {DEFAULT: store} if store is not None else {}
        self.last_state: RolloutState | None = None

    def active(self) -> tuple[str, object]:
        self.last_state = read_state_or_last(self.client, self.settings, self.last_state)
        name = self.last_state.active
        return name, self.store_of(name)

    def store_of(self, name: str):
        if name not in self.stores:
            self.stores[name] = feast_store.open_store(version_settings(self.settings, name))
        return self.stores[name]
