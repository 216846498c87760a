"""``saereward serve-reward``: an HTTP reward server that speaks OpenRLHF's remote-reward payload.

OpenRLHF (``--reward.remote_url``, 0.11) POSTs ``{"query": [...], "prompts": [...], "labels": [...]}``
(each ``query`` is the prompt followed by its response) and reads ``rewards`` (or ``scores``) from the
JSON answer. Its rewards are **one number per sample**, placed on the end token: OpenRLHF has no
per-token reward path, so this server gives sequence-level rewards only. The per-token reward, which
is what saereward's GRPO trainer and its TRL subclass use, does not survive this interface.

Per sample: ``reward = outcome + lam * mech``, where

* ``outcome`` is 1.0 when the response's answer (saereward's flexible extraction) equals the label
  as a number, 0.0 otherwise (no label: 0.0);
* ``mech`` is the pack score averaged over the response's tokens: one forward of the model over the
  query, the residuals at the pack's layer, ``PackScorer.token_scores`` (true TopK), then the mean
  over the tokens after the prompt. That is the forward OpenRLHF's own generation does not return.

The answer also holds ``scores`` (the same numbers) and ``extra_logs`` (``outcome``, ``mech``), which
OpenRLHF logs. A bad request gets a 4xx status with a one-line JSON ``error``; the server keeps
serving. Requests are bounded (``max_body`` bytes, ``max_batch`` samples, queries within the model's
context). Each connection has its own thread, and a client that stops sending is dropped after
``timeout`` seconds, so one stalled client never blocks the others; the forwards take turns.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.features.pack import FeaturePack, check_pack_sae, load_pack
from saereward.features.scoring import PackScorer
from saereward.model.capture import forward_residuals
from saereward.model.lm import DEFAULT_MODEL, LoadedModel, load_model
from saereward.options import PackOptions
from saereward.sae.formats import load_sae
from saereward.tasks.extract import canonical_number, extract_flexible, numbers_equal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeRewardConfig(PackOptions):
    """Settings of ``saereward serve-reward``."""

    lam: float = option(0.1, "weight of the mech term: reward = outcome + lam * mech")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(5000, "port to listen on (0: any free port)")
    max_body: int = option(8_000_000, "largest request body in bytes")
    max_batch: int = option(512, "most samples in one request")
    timeout: float = option(30.0, "seconds a client may take to send its request before it is dropped")

    def __post_init__(self) -> None:
        if not self.pack:
            raise ValueError("pack is required: `saereward serve-reward --pack pack.json`")
        if self.max_body < 1 or self.max_batch < 1 or self.timeout <= 0:
            raise ValueError("max_body and max_batch must be >= 1, timeout > 0")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0-65535 (0: any free port), got {self.port}")


class BadRequest(ValueError):
    """A request the server answers with 400 and this message."""


class SequenceRewarder:
    """``outcome + lam * mean mech`` of each response; the scoring behind the server (no HTTP)."""

    def __init__(self, lm: LoadedModel, scorer: PackScorer, layer: int, lam: float) -> None:
        self.lm, self.scorer, self.layer, self.lam = lm, scorer, layer, lam
        self._lock = threading.Lock()  # one forward at a time: the model is shared

    def mech(self, prompt: str, query: str) -> float:
        """Mean pack score over the tokens of ``query`` after ``prompt`` (0.0 for an empty response)."""
        tok = self.lm.tokenizer
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(query, add_special_tokens=False)["input_ids"]])
        limit = getattr(getattr(self.lm.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and ids.shape[1] > limit:
            raise BadRequest(f"a query has {ids.shape[1]} tokens, more than the model's context of {limit}")
        if ids.shape[1] <= n_prompt:
            return 0.0
        with torch.no_grad(), self._lock:
            x = forward_residuals(self.lm.model, ids, torch.ones_like(ids), [self.layer])[self.layer]
            return float(self.scorer.token_scores(x[0, n_prompt:].float()).mean())

    def score(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]) -> dict[str, Any]:
        outcome, mech = [], []
        for query, prompt, label in zip(queries, prompts, labels, strict=True):
            response = query[len(prompt) :]
            gold = canonical_number(str(label)) if label is not None else None
            outcome.append(
                1.0 if gold is not None and numbers_equal(extract_flexible(response), gold) else 0.0
            )
            mech.append(self.mech(prompt, query))
        rewards = [o + self.lam * m for o, m in zip(outcome, mech, strict=True)]
        return {"rewards": rewards, "scores": rewards, "extra_logs": {"outcome": outcome, "mech": mech}}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(body: bytes, max_batch: int) -> tuple[list[str], list[str], list[Any]]:
    """``(queries, prompts, labels)`` of an OpenRLHF payload, or :class:`BadRequest` naming the problem."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep, huge numbers
        raise BadRequest(f"the body is not JSON this server reads ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("query"), list):
        raise BadRequest('expected a JSON object with "query": a list of strings')
    queries = data["query"]
    prompts = data.get("prompts", [""] * len(queries))
    labels = data.get("labels", [None] * len(queries))
    if not isinstance(prompts, list) or not isinstance(labels, list):
        raise BadRequest('"prompts" and "labels" must be lists')
    if not 1 <= len(queries) <= max_batch:
        raise BadRequest(f'"query" must hold 1 to {max_batch} samples, got {len(queries)}')
    if not len(prompts) == len(labels) == len(queries):
        raise BadRequest('"query", "prompts" and "labels" must have the same length')
    for i, (q, p, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        if not isinstance(q, str) or not isinstance(p, str):
            raise BadRequest(f"sample {i}: query and prompt must be strings")
        if not _encodable(q) or not _encodable(p):
            raise BadRequest(f"sample {i}: query or prompt holds a lone surrogate (not valid Unicode text)")
        if label is not None and (isinstance(label, bool) or not isinstance(label, str | int | float)):
            raise BadRequest(f"sample {i}: a label must be a string, a number or null")
        if not q.startswith(p):
            raise BadRequest(f"sample {i}: the query does not start with its prompt")
    return queries, prompts, labels


def make_handler(
    rewarder: SequenceRewarder, max_body: int, max_batch: int, idle_timeout: float = 30.0
) -> type[BaseHTTPRequestHandler]:
    """The request handler class of a server around ``rewarder``; a connection idle for
    ``idle_timeout`` seconds (a client that stopped sending) is closed."""

    class Handler(BaseHTTPRequestHandler):
        timeout = idle_timeout  # StreamRequestHandler sets it on the connection's socket

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._send(411, {"error": "a Content-Length header is required"})
            if length < 0:
                return self._send(400, {"error": "Content-Length must be a number of bytes >= 0"})
            if length > max_body:
                return self._send(413, {"error": f"the body is over {max_body} bytes"})
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True  # the client stopped sending: nothing to answer
                return None
            try:
                args = parse_request(body, max_batch)
                return self._send(200, rewarder.score(*args))
            except BadRequest as exc:
                return self._send(400, {"error": str(exc)})
            except Exception as exc:  # never let one request take the server down
                log.exception("scoring failed")
                return self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (a bad request line, an unsupported method) as one JSON line
            too, not its HTML page."""
            self.close_connection = True
            self._send(code, {"error": message or HTTPStatus(code).phrase})

        def do_GET(self) -> None:  # noqa: N802
            self._send(405, {"error": "POST the OpenRLHF payload to any path"})

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def build_rewarder(cfg: ServeRewardConfig) -> SequenceRewarder:
    pack: FeaturePack = load_pack(cfg.pack)
    sae_path = cfg.sae or pack.metadata.get("sae_path")
    if not sae_path:
        raise SaeRewardError(f"{cfg.pack} records no SAE: pass --sae")
    check_pack_sae(pack, sae_path)
    sae = load_sae(sae_path, device=cfg.device)
    lm = load_model(cfg.model or pack.model_name or DEFAULT_MODEL, dtype=cfg.dtype, device=cfg.device)
    layer = pack.layer if pack.layer is not None else sae.cfg.layer
    if layer is None:
        raise SaeRewardError(f"neither {cfg.pack} nor its SAE records a layer")
    return SequenceRewarder(lm, PackScorer(sae, pack, d_model=lm.d_model), int(layer), cfg.lam)


def _listen_fix(exc: OSError) -> str:
    """The fix for a failed listen: another port when the address is taken, else the host."""
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == 98:  # EADDRINUSE
        return "pass another --port"
    return "check --host (an address of this machine, e.g. 127.0.0.1) and --port"


def make_server(cfg: ServeRewardConfig, rewarder: SequenceRewarder) -> ThreadingHTTPServer:
    """The server (not yet serving): one thread per connection, daemon threads (Ctrl-C stops at once)."""
    handler = make_handler(rewarder, cfg.max_body, cfg.max_batch, cfg.timeout)
    try:
        return ThreadingHTTPServer((cfg.host, cfg.port), handler)
    except OSError as exc:
        raise SaeRewardError(
            f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}): {_listen_fix(exc)}"
        ) from None


def run_serve_reward(cfg: ServeRewardConfig) -> None:
    """Serve until interrupted. The port is checked before the model loads."""
    try:
        socket.create_server((cfg.host, cfg.port)).close()
    except OSError as exc:
        raise SaeRewardError(
            f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}): {_listen_fix(exc)}"
        ) from None
    server = make_server(cfg, build_rewarder(cfg))
    host, port = server.server_address[:2]
    log.warning("serving OpenRLHF rewards on http://%s:%s (Ctrl-C stops)", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["ServeRewardConfig", "SequenceRewarder", "make_server", "parse_request", "run_serve_reward"]
