"""`coldstart demo` (films, the default): fresh films, never trained on, retrieved for the users who watch them next.

In the towers' own domain, MovieLens-100K, on a fresh local stack (broker,
Redis, Feast, one worker) serving towers trained on the cold protocol:
towers.json names the split, and with it the seeded fifth of the films the
towers never trained on (encoders.training.datasets.make_split).

1. The warm films (trained on) are uploaded through Kafka as fast as the
   worker takes them.
2. Every user's history up to their test film is replayed as user-actions
   (clicks, in the data set's order, with increasing event times): its
   actions on warm films. Only the last COLDSTART_USER_HISTORY_LENGTH actions
   of each history are sent: all that the user tower and exclude_seen read
   (the worker keeps no more).
3. The cold films are uploaded fresh at --rate per second. A film's latency
   runs from just before the producer sends it until the retrieval index holds
   it (a Retriever in this process: a replica following item-embeddings, the
   code `coldstart serve` runs), so that any retrieval whose top k it belongs
   to returns it.
4. The histories' actions on the fresh films follow, as users act on a film
   after its upload; each takes its place in its user's history by event time
   (streams.users). Replayed before the uploads instead, they made hundreds of
   users wait for each fresh film, and recomputing them as the films arrived
   contended with the films' own encoding (BENCHMARKS.md, films demo).
5. Once every user's vector includes the fresh films of their history: online
   HR@50, over the users whose next (test) film is a fresh one. Each user's top
   50 comes from `Retriever.retrieve` with exclude_seen; the rest of their
   history is left out here too, as the offline scorer leaves out the whole
   history. It is printed beside the offline cold_cold HR@50 of the same
   towers, which `coldstart export-towers` scored with `coldstart evaluate`'s
   scorer (torch, fp32 content embeddings) and recorded in towers.json, and
   beside that scorer's HR@50 over the vectors the service holds (the users'
   and films' vectors read back from the online store, every film ranked
   exactly): retrieval against exact ranking of the same vectors, and the
   served vectors (int8 encoder) against the offline ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
from tqdm import tqdm

from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_VIEW, Settings
from coldstart.dev.load import new_producer, send_action, upload_at_rate
from coldstart.dev.stack import fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher
from coldstart.ranking import UnknownUser
from coldstart.retrieval import MAX_K, NotReady, Retriever
from encoders.export_format import TOWERS_METADATA
from encoders.training.datasets import fetch_ml100k, load_ml100k, make_split, ml100k_films
from encoders.training.metrics import target_ranks

HR_K = 50
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000)


class ColdTowersMissing(RuntimeError):
    """COLDSTART_TOWERS_DIR holds no towers trained on the cold protocol; the message says what to run."""


@dataclass
class FilmsPlan:
    """What the demo uploads and replays, from the data set and the towers' split."""

    films: dict[str, dict]  # item id → upload event (title "Title (year)", category = genres)
    warm: list[str]  # films the towers trained on
    cold: list[str]  # films they never trained on: uploaded fresh
    histories: dict[str, list[str]]  # user → their films before the test film, oldest first
    targets: dict[str, str]  # user → test film, for the users whose test film is cold


def served_towers(settings: Settings) -> dict:
    """towers.json of the towers the stack will serve; ColdTowersMissing unless they were trained on 'cold'."""
    path = settings.towers_dir / TOWERS_METADATA
    towers = json.loads(path.read_text()) if path.exists() else {}
    if towers.get("protocol") != "cold" or "split" not in towers:
        found = f"towers of protocol {towers.get('protocol')!r}" if towers else "no towers"
        raise ColdTowersMissing(
            f"the films demo serves towers trained on the cold protocol, so that some films are new to them; "
            f"{settings.towers_dir} holds {found}. Run `COLDSTART_TOWERS_DIR=onnx/towers-cold coldstart export-towers "
            f"--protocol cold` (it trains them first: minutes), then `COLDSTART_TOWERS_DIR=onnx/towers-cold coldstart "
            f"demo` (`make demo` runs both); `coldstart demo --catalogue books` needs no such towers.")
    return towers


def make_plan(settings: Settings, towers: dict, users: int = 0) -> FilmsPlan:
    """The films (warm and cold by the towers' split) and the users: those whose test film is cold first,
    then the others; `users` keeps only the first so many (0: all)."""
    folder = fetch_ml100k(settings.data_dir / "datasets" / "ml-100k")
    data = load_ml100k(folder)
    split = make_split(data, "cold", towers["split"]["cold_fraction"], towers["split"]["seed"])
    ids = data.item_ids  # MovieLens's own ids: those the hybrid towers keep ID parts for
    films = {film["item_id"]: film for film in ml100k_films(folder)}
    evaluated = np.flatnonzero(split.test >= 0)
    chosen = sorted(evaluated, key=lambda u: not split.cold[split.test[u]])  # stable: cold targets first
    chosen = chosen[:users] if users else chosen
    return FilmsPlan(
        films=films,
        warm=[ids[i] for i in np.flatnonzero(~split.cold)],
        cold=[ids[i] for i in np.flatnonzero(split.cold)],
        histories={f"ml-{data.user_ids[u]}": [ids[i] for i in split.test_history(u)] for u in chosen},
        targets={f"ml-{data.user_ids[u]}": ids[split.test[u]] for u in chosen if split.cold[split.test[u]]},
    )


def run_films_demo(settings: Settings, rate: float = 50.0, users: int = 0, timeout: float = 300.0,
                   as_json: bool = False) -> bool:
    """The demo above; prints its report (or one JSON line) and returns whether every step completed."""
    towers = served_towers(settings)
    plan = make_plan(settings, towers, users)
    say = (lambda *a: None) if as_json else print
    kept = settings.user_history_length
    seconds: dict[str, float] = {}
    started = clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    say(f"towers {towers['version']} ({towers['config']}, protocol cold): {len(plan.cold)} of {len(plan.films)} "
        f"MovieLens-100K films never trained on")
    say("starting the local stack (Redis, embedded Kafka-protocol broker, Feast, worker)…")
    with fresh_stack(settings, "coldstart_demo") as stack:
        retriever = Retriever(stack.settings, stack.store).start().wait_ready(timeout)
        lap("stack")
        try:
            indexed = ReadabilityWatcher(stack.store, poll_interval=0.005, find=retriever.indexed)
            indexed.start()
            say(f"uploading the {len(plan.warm)} warm films through Kafka")
            upload_at_rate(stack.settings, [plan.films[i] for i in plan.warm], float("inf"), indexed)
            warm_ok = _wait(indexed, plan.warm, timeout, "warm films indexed", as_json)
            lap("warm_films")

            cold = set(plan.cold)
            base = datetime.now(timezone.utc) - timedelta(days=1)
            actions = _replay(stack.settings, plan.histories, kept, base, lambda item: item not in cold,
                              "actions on warm films replayed", as_json)
            before_cold = {user: sum(item not in cold for item in history[-kept:])
                           for user, history in plan.histories.items()}
            replay_ok = _wait_for_users(stack.store, before_cold, timeout, "user vectors current", as_json)
            lap("replay")

            say(f"uploading the {len(plan.cold)} cold films fresh at {rate:g}/s")
            with tqdm(total=len(plan.cold), desc="fresh films uploaded", unit="film", disable=as_json) as progress:
                upload_at_rate(stack.settings, [plan.films[i] for i in plan.cold], rate, indexed, progress)
            cold_ok = _wait(indexed, plan.cold, timeout, "fresh films retrievable", as_json)
            indexed.stopping.set()
            lap("fresh_films")

            actions += _replay(stack.settings, plan.histories, kept, base, lambda item: item in cold,
                               "actions on fresh films replayed", as_json)
            complete = {user: len(history[-kept:]) for user, history in plan.histories.items()}
            users_ok = _wait_for_users(stack.store, complete, timeout, "users with their fresh films", as_json)
            lap("replay_fresh")
            hits, examples, errors = _online_hit_rate(retriever, plan, kept)
            served_exact = _served_exact_hit_rate(stack.store, plan)
            lap("hit_rate")
        finally:
            retriever.stop()
        latencies = {item: round(ms, 1) for item, ms in zip(plan.cold, indexed.latencies_ms(plan.cold))
                     if item in indexed.readable_at}
        titles = {item: plan.films[item]["title"] for item in plan.films}
    seconds["total"] = round(time.monotonic() - started, 1)

    offline = towers.get("test_metrics", {}).get("cold_cold")
    values = np.array(list(latencies.values()))
    summary = {
        "catalogue": "films", "towers": towers["version"], "towers_config": towers["config"],
        "films": len(plan.films), "warm_films": len(plan.warm), "fresh_films": len(plan.cold),
        "users": len(plan.histories), "actions_replayed": actions,
        "fresh_retrievable": len(latencies), "rate_per_s": rate,
        **{f"retrievable_{name}_ms": round(float(np.percentile(values, q)), 1) if len(values) else None
           for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "online_hr_at_50": round(len(hits) / len(plan.targets), 4) if plan.targets else None,
        "online_hr_users": len(plan.targets), "online_hits": len(hits), "online_errors": errors,
        "served_exact_hr_at_50": round(served_exact, 4) if served_exact is not None else None,
        "offline_cold_cold_hr_at_50": round(offline["hr@50"], 4) if offline else None,
        "offline_cold_cold_users": offline["n"] if offline else None,
        "offline_source": "towers.json test_metrics (coldstart export-towers, coldstart evaluate's scorer)",
        "seconds": seconds, "retrievable_ms": latencies,
    }
    ok = warm_ok and replay_ok and cold_ok and users_ok and not errors
    if as_json:
        print(json.dumps(summary))
    else:
        _print_report(summary, examples, titles, plan)
    return ok


@dataclass
class _Hit:
    user_id: str
    film: str
    rank: int  # 1-based


def _replay(settings: Settings, histories: dict[str, list[str]], kept: int, base: datetime, which, what: str,
            quiet: bool) -> int:
    """The clicks of each user's last `kept` films for which which(film) holds, in order, the n-th film of a
    history n seconds after `base` (so clicks sent later take their place among earlier ones); returns the
    actions sent."""
    clicks = [(user_id, history[position], base + timedelta(seconds=position))
              for user_id, history in histories.items()
              for position in range(max(0, len(history) - kept), len(history)) if which(history[position])]
    producer = new_producer(settings)
    for user_id, item_id, at in tqdm(clicks, desc=what, unit="action", disable=quiet):
        send_action(producer, user_id, item_id, "click", at)
    producer.flush()
    producer.close()
    return len(clicks)


def _wait(watcher: ReadabilityWatcher, item_ids: list[str], timeout: float, what: str, quiet: bool) -> bool:
    """Wait until the watcher has seen every one of item_ids, with a progress bar; False on timeout."""
    deadline = time.monotonic() + timeout
    with tqdm(total=len(item_ids), desc=what, unit="film", disable=quiet) as progress:
        while True:
            with watcher.lock:
                done = sum(item in watcher.readable_at for item in item_ids)
            progress.update(done - progress.n)
            if done == len(item_ids) or time.monotonic() > deadline:
                return done == len(item_ids)
            time.sleep(0.05)


def _wait_for_users(store, expected: dict[str, int], timeout: float, what: str, quiet: bool) -> bool:
    """Wait until each user's stored vector is over at least the expected number of films (users expected
    to have none are skipped); False on timeout."""
    view = feast_store.stored_view(store, USER_VIEW, ("history_length",))
    pending = {user for user, count in expected.items() if count > 0}
    deadline = time.monotonic() + timeout
    with tqdm(total=len(pending), desc=what, unit="user", disable=quiet) as progress:
        while pending and time.monotonic() < deadline:
            ids = sorted(pending)
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                lengths = feast_store.online_read(store, view, chunk)["history_length"]
                done = {user for user, length in zip(chunk, lengths) if (length or 0) >= expected[user]}
                pending -= done
                progress.update(len(done))
            time.sleep(0.2)
    return not pending


def _online_hit_rate(retriever: Retriever, plan: FilmsPlan, kept: int) -> tuple[list[_Hit], list[_Hit], int]:
    """(hits, a few hits to show, users retrieval could not answer) over the users whose test film is fresh."""
    hits, errors = [], 0
    for user_id, target in plan.targets.items():
        older = set(plan.histories[user_id][:-kept])  # the history exclude_seen does not cover
        k = min(MAX_K, HR_K + len(older) + 1)  # + 1: the stack's warm-up probe item, not a film
        try:
            found = retriever.retrieve(user_id, k=k, exclude_seen=True)
        except (UnknownUser, NotReady):
            errors += 1
            continue
        ranked = [r.item_id for r in found.items if r.item_id in plan.films and r.item_id not in older][:HR_K]
        if target in ranked:
            hits.append(_Hit(user_id, target, ranked.index(target) + 1))
    examples = sorted(hits, key=lambda hit: hit.rank)[:3]
    return hits, examples, errors


def _served_exact_hit_rate(store, plan: FilmsPlan) -> float | None:
    """HR@50 by the offline scorer (encoders.training.metrics) over the vectors the service holds: the users'
    and the films' vectors read back from the online store, every film ranked, the whole history left out."""
    users = list(plan.targets)
    if not users:
        return None
    films = list(plan.films)
    item_vectors = feast_store.online_read(store, feast_store.stored_view(store, ITEM_VIEW, ("item_embedding",)),
                                           films)["item_embedding"]
    user_vectors = feast_store.online_read(store, feast_store.stored_view(store, USER_VIEW, ("user_embedding",)),
                                           users)["user_embedding"]
    if any(v is None for v in (*item_vectors, *user_vectors)):
        return None
    position = {film: n for n, film in enumerate(films)}
    scores = np.stack(user_vectors) @ np.stack(item_vectors).T  # (U, I): cosines of unit vectors
    ranks = target_ranks(scores, np.array([position[plan.targets[u]] for u in users]),
                         [np.array([position[i] for i in plan.histories[u]], dtype=np.int64) for u in users])
    return float(np.mean(ranks < HR_K))


def _print_report(summary: dict, examples: list[_Hit], titles: dict[str, str], plan: FilmsPlan) -> None:
    s = summary
    print(f"\nwarm films: {s['warm_films']} uploaded and indexed in {s['seconds']['warm_films']} s")
    print(f"histories: {s['actions_replayed']} actions of {s['users']} users replayed; every user's vector "
          f"current {s['seconds']['replay']} s after the first, and {s['seconds']['replay_fresh']} s after the actions "
          f"on fresh films")
    print(f"fresh films: {s['fresh_retrievable']}/{s['fresh_films']} retrievable; upload → retrievable at "
          f"{s['rate_per_s']:g}/s: p50 {s['retrievable_p50_ms']} ms, p95 {s['retrievable_p95_ms']} ms, "
          f"p99 {s['retrievable_p99_ms']} ms, max {s['retrievable_max_ms']} ms")
    values = np.array(list(s["retrievable_ms"].values()))
    if len(values):
        edges = (0, *LATENCY_BUCKETS_MS, np.inf)
        counts = [int(((values >= low) & (values < high)).sum()) for low, high in zip(edges, edges[1:])]
        labels = [f"<{LATENCY_BUCKETS_MS[0]} ms", *(f"{a}–{b} ms" for a, b in zip(LATENCY_BUCKETS_MS,
                                                                               LATENCY_BUCKETS_MS[1:])),
                  f"≥{LATENCY_BUCKETS_MS[-1]} ms"]
        print("  " + ", ".join(f"{label}: {count}" for label, count in zip(labels, counts)))
    if s["online_hr_at_50"] is not None:
        print(f"\nonline HR@50 over the {s['online_hr_users']} users whose next film was a fresh one: "
              f"{s['online_hr_at_50']:.3f} ({s['online_hits']}/{s['online_hr_users']})"
              + (f"; {s['online_errors']} users not answered" if s["online_errors"] else ""))
    if s["served_exact_hr_at_50"] is not None:
        print(f"  the same users, every film ranked exactly over the served vectors (the evaluator's scorer): "
              f"{s['served_exact_hr_at_50']:.3f}")
    if s["offline_cold_cold_hr_at_50"] is not None:
        print(f"  offline, the same towers on torch's fp32 content embeddings (cold_cold, "
              f"n={s['offline_cold_cold_users']}; towers.json, scored at export): {s['offline_cold_cold_hr_at_50']:.3f}")
    for hit in examples:
        recent = ", ".join(f"“{titles[i]}”" for i in plan.histories[hit.user_id][-3:])
        print(f"  user {hit.user_id} had just watched {recent}; fresh “{titles[hit.film]}” came back at rank {hit.rank}")
    print(f"\nseconds: {', '.join(f'{step} {value}' for step, value in s['seconds'].items())}")
