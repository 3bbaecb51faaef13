"""Calls that survive replicas: real `teleguard serve` processes sharing a real Redis (`--session-store`), as
a round-robin Service in front of them sends a call's requests to any of them.

- REST chunks of concurrent calls alternate replicas: every call ends with a verdict that counts every chunk,
  no decision is lost or made twice (the engine is asked each prompt once), and both replicas' /metrics add up
  to what the clients saw (calls completed once, chunks once, active calls back to zero);
- the same chunk sent to both replicas at once is taken once;
- Redis stops answering mid-call: 503 `store_unavailable`, readiness false, the store errors counted; once it is
  back the client resends and the call ends as it would have;
- a WebSocket call on a replica that drains (SIGTERM) resumes on the other (`{"type": "resume"}`);
- a replica SIGKILLed while it evaluates a chunk: the client resends that chunk to the other, which takes the
  call over once the dead replica's lease lapses; the verdict is the uninterrupted run's.

The engine is `tests.support.replicas.ScriptedApi` (answers by content), so an interrupted call and an
uninterrupted one with the same turns get the same answers.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, ScriptedApi, call_turns, total, wait_until, write_config


class Cluster:
    """A Redis, the scripted engine and the replicas sharing them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis").start()
        self.api = ScriptedApi()
        self.api.start()
        self.config = write_config(workdir / "serve.yaml", f"{self.api.url}/v1", key_prefix="replicas")
        self.replicas: list[Replica] = []

    def start(self, *names: str) -> list[Replica]:
        started = [Replica(name, self.config, self.redis.url, self.workdir) for name in names]
        self.replicas += started
        return [r.wait_ready() for r in started]

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.api.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("replicas"))
    try:
        cluster.start("a", "b")
        yield cluster
    finally:
        cluster.stop()


def post(url: str, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def comparable(verdict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in verdict.items() if k != "call_id"}


def rest_call(
    call_id: str, turns: list[list[dict[str, Any]]], pick: Callable[[int], str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Open, send every chunk, close: request i to replica pick(i). Returns decisions and the verdict."""
    assert post(pick(0), "/v1/calls", {"call_id": call_id}).status_code == 201
    decisions = []
    for seq, segments in enumerate(turns):
        answer = post(pick(seq + 1), f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": segments})
        assert answer.status_code == 200, answer.text
        assert answer.json()["duplicate"] is False
        decisions += answer.json()["decisions"]
    closed = post(pick(len(turns) + 1), f"/v1/calls/{call_id}/close", {"last_seq": len(turns) - 1})
    assert closed.status_code == 200, closed.text
    return decisions + closed.json()["decisions"], closed.json()["verdict"]


def test_rest_chunks_alternating_replicas_lose_and_repeat_nothing(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    before = [a.metrics(), b.metrics()]
    prompts_before = len(cluster.api.prompts)
    calls = {f"{kind}-{i}": kind == "fraud" for i in range(3) for kind in ("fraud", "normal")}

    def one(index: int, call_id: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        urls = (a.url, b.url)
        decisions, verdict = rest_call(
            call_id, call_turns(call_id, fraud=calls[call_id]), lambda i: urls[(i + index) % 2]
        )
        return call_id, decisions, verdict

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(one, range(len(calls)), calls))
    evaluations = 0
    for call_id, decisions, verdict in results:
        assert verdict["chunks"] == 5 and verdict["decisions"] == len(decisions), call_id
        assert verdict["is_fraud"] is calls[call_id]
        keys = [(d["seq"], d["round"]) for d in decisions]
        assert len(keys) == len(set(keys)), f"{call_id}: a decision twice"
        fraud_rounds = [d for d in decisions if d["round"] == "is_fraud"]
        # fraud: turns 0, 1 normal, turn 2 alerts and stops the evaluations; normal: every turn
        assert [d["seq"] for d in fraud_rounds] == ([0, 1, 2] if calls[call_id] else [0, 1, 2, 3, 4])
        evaluations += len(fraud_rounds)
    assert not cluster.api.repeated(), "an evaluation ran twice"
    prompts = len(cluster.api.prompts) - prompts_before
    assert prompts == sum(v["model_calls"] for _, _, v in results)

    after = [a.metrics(), b.metrics()]

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("teleguard_calls_completed_total") == len(calls)
    assert delta("teleguard_calls_completed_total", verdict="fraud") == 3  # fraud rate 0.5, not doubled
    assert delta("teleguard_chunks_total") == 5 * len(calls)
    assert delta("teleguard_decisions_total") == evaluations  # one per evaluation, wherever it ran
    assert delta("teleguard_alerts_total") == 3
    assert delta("teleguard_time_to_detection_seconds_count") == 3
    assert delta("teleguard_rejected_requests_total") == 0
    # each replica served half of every call: both did evaluations
    assert all(total([m], "teleguard_decisions_total") > 0 for m in after)
    # the active calls summed over replicas (KEDA's query): back to zero once each replica counted again
    assert wait_until(lambda: total([a.metrics(), b.metrics()], "teleguard_active_calls") == 0)


def test_the_same_chunk_sent_to_both_replicas_at_once_is_taken_once(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    call_id = "normal-race"
    assert post(a.url, "/v1/calls", {"call_id": call_id}).status_code == 201
    for seq, segments in enumerate(call_turns(call_id, fraud=False, n=3)):
        barrier = threading.Barrier(2)

        def send(
            url: str, seq: int = seq, segments: Any = segments, barrier: threading.Barrier = barrier
        ) -> dict[str, Any]:
            barrier.wait()
            answer = post(url, f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": segments})
            assert answer.status_code == 200, answer.text
            return answer.json()

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(send, (a.url, b.url))
        assert sorted([first["duplicate"], second["duplicate"]]) == [False, True]
        assert first["decisions"] == second["decisions"] and first["decisions"]  # made once, told to both
    verdict = post(b.url, f"/v1/calls/{call_id}/close", {"last_seq": 2}).json()["verdict"]
    assert verdict["chunks"] == 3 and not cluster.api.repeated()


def test_redis_stopped_mid_call_answers_503_then_the_call_goes_on(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    turns = call_turns("fraud-pause", fraud=True)
    _, reference = rest_call("fraud-pause-ref", turns, lambda i: (a.url, b.url)[i % 2])
    errors_before = total([a.metrics(), b.metrics()], "teleguard_store_errors_total")
    call_id = "fraud-pause"
    assert post(a.url, "/v1/calls", {"call_id": call_id}).status_code == 201
    for seq in (0, 1):
        assert (
            post(b.url, f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": turns[seq]}).status_code
            == 200
        )
    cluster.redis.pause()
    try:
        refused = post(a.url, f"/v1/calls/{call_id}/chunks", {"seq": 2, "segments": turns[2]})
        assert refused.status_code == 503, refused.text
        body = refused.json()
        assert body["error"] == "store_unavailable" and body["retryable"] and body["seq"] == 2
        assert not a.ready() and not b.ready()  # readiness reports the store
    finally:
        cluster.redis.resume()
    assert wait_until(lambda: a.ready() and b.ready())
    assert total([a.metrics(), b.metrics()], "teleguard_store_errors_total") > errors_before
    # the client resends the refused chunk (a retry should the store have taken it after all) and goes on
    decisions = []
    for seq in range(2, len(turns)):
        answer = post(
            (a.url, b.url)[seq % 2], f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": turns[seq]}
        )
        assert answer.status_code == 200, answer.text
        decisions += answer.json()["decisions"]
    assert [d["round"] for d in decisions] == ["is_fraud", "fraud_type"]  # chunk 2 evaluated, once
    verdict = post(b.url, f"/v1/calls/{call_id}/close", {"last_seq": len(turns) - 1}).json()["verdict"]
    assert comparable(verdict) == comparable(reference)


def ws_messages(ws: Any, until: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Messages up to and including the first of type `until`."""
    out = []
    while True:
        out.append(json.loads(ws.recv(timeout=timeout)))
        if out[-1]["type"] in (until, "error"):
            return out


def test_a_websocket_call_resumes_on_another_replica_after_its_replica_drains(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    turns = call_turns("fraud-ws", fraud=True)
    _, reference = rest_call("fraud-ws-ref", turns, lambda _: b.url)
    call_id = "fraud-ws"
    received: list[dict[str, Any]] = []
    with connect(a.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "open", "call_id": call_id}))
        assert ws_messages(ws, "opened")[-1]["call_id"] == call_id
        for seq in (0, 1):
            ws.send(json.dumps({"type": "chunk", "call_id": call_id, "seq": seq, "segments": turns[seq]}))
            messages = ws_messages(ws, "ack")
            received += messages
            assert messages[-1] == {"type": "ack", "call_id": call_id, "seq": seq, "duplicate": False}
            received += ws_messages(ws, "decision")  # each chunk is evaluated (a decision follows the ack)
        # the replica drains (a rollout, a node drain): readiness false, then the socket closes
        drained = threading.Thread(target=a.terminate)
        drained.start()
        with pytest.raises(ConnectionClosed):
            while True:
                received.append(json.loads(ws.recv(timeout=30)))
    drained.join(60)
    log = a.log.read_text("utf-8")
    # uvicorn exits through the signal once it has shut down cleanly
    assert a.process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[
        -2000:
    ]
    with connect(b.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "resume", "call_id": call_id}))
        resumed = ws_messages(ws, "resumed")[-1]
        assert (resumed["last_seq"], resumed["closed"]) == (1, False)
        for seq in range(resumed["last_seq"] + 1, len(turns)):
            ws.send(json.dumps({"type": "chunk", "call_id": call_id, "seq": seq, "segments": turns[seq]}))
            received += ws_messages(ws, "ack")
        ws.send(json.dumps({"type": "close", "call_id": call_id, "last_seq": len(turns) - 1}))
        received += ws_messages(ws, "verdict")
    verdict = received[-1]
    assert verdict["type"] == "verdict" and not [m for m in received if m["type"] == "error"]
    assert comparable({k: v for k, v in verdict.items() if k != "type"}) == comparable(reference)
    decisions = [m for m in received if m["type"] == "decision"]
    assert len(decisions) == verdict["decisions"]


def test_a_replica_killed_mid_evaluation_loses_nothing(cluster: Cluster) -> None:
    b = cluster.replicas[1]
    [c] = cluster.start("c")  # the drained replica's successor
    turns = call_turns("fraud-kill", fraud=True)
    ref_decisions, reference = rest_call("fraud-kill-ref", turns, lambda _: b.url)
    call_id = "fraud-kill"
    assert post(c.url, "/v1/calls", {"call_id": call_id}).status_code == 201
    decisions = []
    for seq in (0, 1):
        answer = post(c.url, f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": turns[seq]})
        decisions += answer.json()["decisions"]
    # chunk 2 (the fraud turn) reaches c, which asks the engine; c dies before the answer
    cluster.api.hold(f"工号{call_id}")
    lost: list[BaseException] = []

    def unanswered() -> None:
        try:
            post(c.url, f"/v1/calls/{call_id}/chunks", {"seq": 2, "segments": turns[2]})
        except httpx.HTTPError as err:
            lost.append(err)

    sender = threading.Thread(target=unanswered)
    sender.start()
    assert cluster.api.holding.wait(30), "the evaluation did not reach the engine"
    c.kill()
    cluster.api.release.set()
    sender.join(30)
    assert lost, "the killed replica answered"
    # the client resends the unanswered chunk to the other replica: a retry (c had taken it), evaluated there
    retry = post(b.url, f"/v1/calls/{call_id}/chunks", {"seq": 2, "segments": turns[2]})
    assert retry.status_code == 200, retry.text
    assert retry.json()["duplicate"] is True and [d["round"] for d in retry.json()["decisions"]] == [
        "is_fraud",
        "fraud_type",
    ]
    decisions += retry.json()["decisions"]
    for seq in range(3, len(turns)):
        decisions += post(b.url, f"/v1/calls/{call_id}/chunks", {"seq": seq, "segments": turns[seq]}).json()[
            "decisions"
        ]
    closed = post(b.url, f"/v1/calls/{call_id}/close", {"last_seq": len(turns) - 1}).json()
    assert comparable(closed["verdict"]) == comparable(reference)

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("call_id", "latency_s")}

    assert [strip(d) for d in decisions + closed["decisions"]] == [strip(d) for d in ref_decisions]
