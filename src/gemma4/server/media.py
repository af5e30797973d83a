"""Media policy: what image/audio inputs the server accepts, checked before anything is fetched or decoded.

Never fetched: local files (file:, paths), and http(s) URLs whose host is not in --allowed-media-domains or that
name an IP address (no requests to private networks). data: URLs must carry valid base64."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .protocol import APIError, bad
from ..processing.data_url import decode_base64


def check_media(media: list[dict], state) -> None:
    for part in media:
        kind = part.get("type")
        if kind == "image" and not state.has_vision:
            raise bad("this model has no vision tower: image inputs are not supported", "messages")
        if kind in ("audio", "video") and not (state.has_audio if kind == "audio" else state.has_vision):
            raise bad(f"this model has no {'audio' if kind == 'audio' else 'vision'} tower: {kind} inputs are "
                      "not supported", "messages")
        if "url" in part:
            check_url(str(part["url"]), state.allowed_media_domains)
        elif "data" in part:
            _b64(part["data"])
    raise APIError(400, "image/audio inputs are not wired into this server yet (text only)", param="messages")


def check_url(url: str, allowed_domains: list[str]) -> None:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad("data: URLs must be base64-encoded", "messages")
        _b64(payload)
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise bad(f"media URL scheme {parts.scheme or '(none)'!r} is not allowed; use https or data:", "messages")
    host = (parts.hostname or "").lower()
    try:
        ipaddress.ip_address(host)
        raise bad("media URLs may not name an IP address", "messages")
    except ValueError:
        pass
    if not any(host == d or host.endswith("." + d) for d in allowed_domains):
        raise bad(f"media host {host!r} is not in --allowed-media-domains", "messages")


def _b64(data) -> bytes:
    try:
        return decode_base64(str(data), "media")
    except ValueError:
        raise bad("media data is not valid base64", "messages") from None
