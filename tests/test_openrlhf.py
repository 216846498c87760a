"""``saereward serve-reward``: OpenRLHF's remote-reward payload over real loopback HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from saereward.features.pack import Feature, FeaturePack
from saereward.features.scoring import PackScorer
from saereward.integrations.openrlhf import SequenceRewarder, ServeRewardConfig, make_server
from saereward.model.capture import forward_residuals
from tiny_models import random_sae, tiny_lm

LAYER = 1


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, SequenceRewarder]]:
    lm = tiny_lm("llama")
    sae = random_sae(seed=2, layer=LAYER)
    pack = FeaturePack("t", [Feature(3, 1.0), Feature(9, 0.5)], [Feature(17, -1.0)], layer=LAYER)
    rewarder = SequenceRewarder(lm, PackScorer(sae, pack), LAYER, lam=0.5)
    cfg = ServeRewardConfig(pack="unused.json", port=0, max_body=4096, max_batch=4, timeout=1.0)
    server = make_server(cfg, rewarder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/get_reward", rewarder
    server.shutdown()
    server.server_close()


def _post(url: str, payload: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    body = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rewards_are_outcome_plus_lambda_times_the_response_mean(
    served: tuple[str, SequenceRewarder],
) -> None:
    url, rw = served
    prompts = ["1+2=", "4+4=", "9-3="]
    queries = [p + r for p, r in zip(prompts, ["3", "9 is it", "6.0"], strict=True)]
    status, out = _post(url, {"query": queries, "prompts": prompts, "labels": ["3", "8", "6"]})
    assert status == 200 and out["extra_logs"]["outcome"] == [1.0, 0.0, 1.0]
    tok = rw.lm.tokenizer
    for i, (p, q) in enumerate(zip(prompts, queries, strict=True)):
        ids = torch.tensor([tok(q, add_special_tokens=False)["input_ids"]])
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        x = forward_residuals(rw.lm.model, ids, torch.ones_like(ids), [LAYER])[LAYER][0, n:]
        want = float(rw.scorer.token_scores(x).mean())
        assert out["extra_logs"]["mech"][i] == pytest.approx(want, abs=1e-6)
        assert out["rewards"][i] == pytest.approx(out["extra_logs"]["outcome"][i] + 0.5 * want, abs=1e-6)
    assert out["scores"] == out["rewards"]


@pytest.mark.parametrize(
    ("payload", "raw", "status", "says"),
    [
        (None, b"{not json", 400, "not JSON"),
        ({"prompts": ["a"]}, None, 400, '"query"'),
        ({"query": ["ab", "cd"], "prompts": ["a"], "labels": ["1", "2"]}, None, 400, "same length"),
        ({"query": ["xb"], "prompts": ["a"], "labels": ["1"]}, None, 400, "does not start with its prompt"),
        ({"query": ["a"] * 5}, None, 400, "1 to 4 samples"),
        ({"query": ["a" * 5000]}, None, 413, "over 4096 bytes"),
        (None, b"[" * 3000, 400, "not JSON this server reads (RecursionError)"),
        (None, b'{"query": ["\\ud800"]}', 400, "lone surrogate"),
        ({"query": ["1+1=2"], "prompts": ["1+1="], "labels": [{"x": 1}]}, None, 400, "a label must be"),
        ({"query": ["a" * 300]}, None, 400, "300 tokens, more than the model's context of 256"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_lives_on(
    served: tuple[str, SequenceRewarder], payload: Any, raw: bytes | None, status: int, says: str
) -> None:
    url, _ = served
    got, out = _post(url, payload, raw)
    assert got == status and says in out["error"]
    ok, _ = _post(url, {"query": ["1+1=2"], "prompts": ["1+1="], "labels": ["2"]})
    assert ok == 200


def test_a_stalled_client_blocks_no_one_and_is_dropped(served: tuple[str, SequenceRewarder]) -> None:
    """A client that announces a body and stops sending has its own thread: others are answered at
    once, and its connection is closed after ``timeout`` (1 s here) without an answer."""
    import socket
    import time

    url, _ = served
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.perf_counter()
        assert _post(url, {"query": ["1+1=2"], "prompts": ["1+1="], "labels": ["2"]})[0] == 200
        assert stalled.recv(1024) == b""  # closed by the server, nothing sent
        assert time.perf_counter() - t0 < 8


def test_a_huge_number_label_is_no_answer_and_costs_nothing(served: tuple[str, SequenceRewarder]) -> None:
    """``1e999999`` as a label (or in a response) is not a number any task has: no outcome credit,
    answered at once (writing it out took 24 s of CPU and then failed)."""
    import time

    url, _ = served
    t0 = time.perf_counter()
    status, out = _post(url, {"query": ["x 1e999999"], "prompts": ["x "], "labels": ["1e999999"]})
    assert status == 200 and out["extra_logs"]["outcome"] == [0.0] and time.perf_counter() - t0 < 5


def test_http_level_errors_are_json_lines_too(served: tuple[str, SequenceRewarder]) -> None:
    """An unsupported method or a negative Content-Length gets a JSON ``error``, not an HTML page or
    a wrong 'too large'."""
    import http.client

    url, _ = served
    port = int(url.split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("PUT", "/get_reward", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 501 and "error" in json.loads(resp.read())
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/get_reward")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and "Content-Length must be" in json.loads(resp.read())["error"]
    conn.close()
