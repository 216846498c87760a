"""Is the Hugging Face hub usable right now? Offline-first checks shared by every loader.

saereward never waits minutes on network retries: :func:`hub_offline` honours the usual offline
flags, and :func:`hub_reachable` TCP-probes the endpoint (or the HTTPS proxy) with a short timeout, so
a machine without network gets a one-line error in seconds.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """TCP-probe the hub endpoint (or the HTTPS proxy) so that offline use fails in seconds."""
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except Exception:  # pragma: no cover - huggingface_hub ships with transformers
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, endpoint
    except OSError:
        return False, endpoint


def hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)
