"""Media in requests: which image/audio inputs the server accepts (the policy: docs/serving.md, Media), fetching
them, and decoding them. Everything is checked (`check_media`) before anything is fetched or decoded."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from ..processing.audio import decode_audio
from ..processing.data_url import decode_base64, decode_data_url
from ..processing.image import load_image
from .protocol import bad

MAX_MEDIA_BYTES = 20 * 1024 * 1024  # per item, fetched or inline
FETCH_TIMEOUT_S = 10.0
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac", "pcm16"}


def check_media(media: list[dict], state) -> None:
    for part in media:
        kind = part.get("type")
        tower = "audio" if kind == "audio" else "vision"  # kind: image, audio or video (collect_media)
        if not (state.has_audio if kind == "audio" else state.has_vision):
            raise bad(f"this model has no {tower} tower: {kind} inputs are not supported", "messages")
        if kind == "video":
            raise bad("video inputs are not supported by this server (send frames as images)", "messages")
        if "url" in part:
            check_url(str(part["url"]), state.allowed_media_domains)
        elif "data" in part:
            _b64(part["data"])
        else:
            raise bad(f"a {kind} part needs a url or data (the server reads no local files)", "messages")
        if kind == "audio" and "data" in part and str(part.get("format", "wav")).lower() not in AUDIO_FORMATS:
            raise bad(f"input_audio.format must be one of {sorted(AUDIO_FORMATS)}", "messages")


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
    with contextlib.suppress(ValueError):  # ip_address raises it for a name
        ipaddress.ip_address(host)
        raise bad("media URLs may not name an IP address", "messages")
    if not host or not any(host == d or host.endswith("." + d) for d in allowed_domains):
        raise bad(f"media host {host!r} is not in --allowed-media-domains", "messages")


def check_resolves_public(host: str) -> None:
    """Refuse hosts that resolve to non-public addresses (an allowed name pointing at the server's network)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise bad(f"cannot resolve media host {host!r}", "messages") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise bad(f"media host {host!r} resolves to a non-public address", "messages")


def _check_fetchable(url: str, allowed_domains: list[str]) -> None:
    """A URL to fetch, or to follow a redirect to: http(s), an allowed host, a public address."""
    if url.startswith("data:"):
        raise bad("a fetched media URL, or a redirect, may not be a data: URL", "messages")
    check_url(url, allowed_domains)
    check_resolves_public(urlsplit(url).hostname or "")


def fetch(url: str, allowed_domains: list[str]) -> tuple[str, bytes]:
    """(content type, body) of an allowed http(s) URL; blocking (call it in a worker thread)."""
    _check_fetchable(url, allowed_domains)

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            _check_fetchable(newurl, allowed_domains)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    request = urllib.request.Request(url, headers={"User-Agent": "gemma4-server"})
    try:
        with urllib.request.build_opener(Redirects()).open(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_MEDIA_BYTES + 1)
            kind = response.headers.get_content_type() or ""
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad(f"cannot fetch media URL {url[:200]!r}: {e}", "messages") from None
    if len(data) > MAX_MEDIA_BYTES:
        raise bad(f"media at {url[:200]!r} is larger than {MAX_MEDIA_BYTES} bytes", "messages")
    return kind, data


def _payload(part: dict, allowed_domains: list[str]) -> tuple[str, bytes]:
    """(mime type or format hint, raw bytes) of one media part."""
    if "url" in part:
        url = str(part["url"])
        if url.startswith("data:"):
            try:
                mime, data = decode_data_url(url, part.get("type", "media"))
            except ValueError as e:
                raise bad(str(e), "messages") from None
        else:
            mime, data = fetch(url, allowed_domains)  # the format: what the bytes say, else the Content-Type
    else:
        mime, data = str(part.get("format", "wav")), _b64(part["data"])
    if len(data) > MAX_MEDIA_BYTES:
        raise bad(f"a media item is larger than {MAX_MEDIA_BYTES} bytes", "messages")
    return mime, data


def _audio_format(hint: str) -> str | None:
    sub = hint.lower().rsplit("/", 1)[-1].removeprefix("x-")  # a format, or a mime type: audio/x-wav, audio/mpeg, ...
    return {"mpeg": "mp3", "wave": "wav", "vnd.wave": "wav"}.get(sub, sub or None)


def load_media(media: list[dict], allowed_domains: list[str]) -> tuple[list, list]:
    """Fetch and decode every part (blocking): (PIL images, (samples, sampling rate) per audio clip), in order."""
    images, clips = [], []
    for part in media:
        hint, data = _payload(part, allowed_domains)
        kind = part.get("type")
        (images if kind == "image" else clips).append(decode(kind, data, hint))
    return images, clips


def decode(kind: str, data: bytes, hint: str, param: str = "messages"):
    """A PIL image, or an audio clip (samples, sampling rate) in the format `hint` names; else a 400."""
    try:
        return load_image(data) if kind == "image" else decode_audio(data, _audio_format(hint))
    except Exception as e:  # noqa: BLE001  (ValueError: ours; others: a decoder library's own on hostile input)
        detail = e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise bad(f"cannot decode the {kind} input: {detail}", param) from None


def _b64(data) -> bytes:
    try:
        return decode_base64(str(data), "media")
    except ValueError:
        raise bad("media data is not valid base64", "messages") from None
