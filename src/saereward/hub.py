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


HF_SCHEME = "hf://"


def parse_hf_source(source: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo[/path][@revision]`` -> ``(repo_id, path inside the repo, revision)``."""
    from saereward.errors import SaeRewardError

    rest = source[len(HF_SCHEME) :]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts) or revision == "":
        raise SaeRewardError(f"{source} is not a hub source: write hf://owner/repo[/path][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def resolve_source(source: str | os.PathLike[str]) -> str:
    """A local path for ``source``: itself, or for ``hf://owner/repo[/path][@revision]`` the file or
    folder inside the repo's snapshot, read through ``huggingface_hub``'s cache.

    The local cache is tried first (no network); the hub is asked only when the file is not cached,
    the offline flags are off and the endpoint answers. Otherwise one error line says what is missing
    and how to fetch it. A path inside the repo brings its folder's files along (a pack's
    ``pack.baseline.json``, an SAE folder's ``cfg.json``).
    """
    text = str(source)
    if not text.startswith(HF_SCHEME):
        return text
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from saereward.errors import SaeRewardError

    repo_id, path, revision = parse_hf_source(text)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    patterns = None if not path else [path, f"{path}/*", f"{parent}/*" if parent else "*"]
    try:
        root: str | None = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
        )
    except LocalEntryNotFoundError:
        root = None
    local = os.path.join(root, path) if root else None
    if local is not None and os.path.exists(local):
        return local
    if hub_offline() or not hub_reachable()[0]:
        raise SaeRewardError(
            f"{text} is not in the local hub cache and the hub is not reachable: fetch it where there is "
            f"network (`hf download {repo_id}`), copy the cache (HF_HOME), or pass a local path"
        )
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SaeRewardError(f"cannot download {text}: {str(exc).splitlines()[0]}") from None
    local = os.path.join(str(root), path)
    if not os.path.exists(local):
        raise SaeRewardError(f"{text}: repo {repo_id} has no {path!r}")
    return local
