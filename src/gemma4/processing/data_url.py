"""base64 payloads and `data:<mime>;base64,<payload>` URLs, as images and audio arrive from OpenAI clients."""

from __future__ import annotations

import base64
import binascii


def decode_base64(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"cannot read {what}: invalid base64 data") from None


def decode_data_url(url: str, what: str) -> tuple[str, bytes]:
    """'data:image/png;base64,...' -> ("image/png", the decoded bytes); a clear ValueError for anything else."""
    header, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep or not header.endswith(";base64"):
        raise ValueError(f"cannot read {what} from data URL: expected 'data:<mime>;base64,<data>'")
    return header[len("data:"): -len(";base64")], decode_base64(payload, f"{what} from data URL")
