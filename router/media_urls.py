"""Media parts of OpenAI requests -> ``MediaInput`` bytes.

* ``image_url`` / ``video_url`` with a ``data:image/...;base64,...`` / ``data:video/...`` URI and
  ``input_audio`` (base64 wav/mp3/flac): always, decoded in place.
* ``image_url`` / ``video_url`` with an ``http(s)://`` URL: only when ``router.media_url_allowlist`` names its host
  (off by default: a server that fetches any URL a client names can be made to probe its own
  network). Each fetch is capped in time (``router.media_url_timeout_s``, the whole fetch) and size
  (``engine.limits.max_media_bytes``, counted as the bytes arrive); redirects are not followed
  (they could leave the list); no proxy settings from the environment are used.

Every problem is the client's: ``HTTPError(400)`` naming the part (``messages.0.content.1``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import urlsplit

from cluster.request_types import MediaInput
from router.openai_protocol import HTTPError, ImageURLPart, InputAudioPart, MediaPart, VideoURLPart

AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac"}


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    """``host`` equals an entry, or is a subdomain of a ``*.example.com`` entry (not the apex)."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def _label(mime: str, kind: str) -> str:
    """The MIME type a part's bytes go on with: the sender's when it names ``kind``; otherwise none
    (the bytes say what they are), except that a ``video_url`` must hold a video."""
    if mime.startswith(kind + "/"):
        return mime
    return "video/" if kind == "video" else ""


class MediaResolver:
    def __init__(self, allowlist: tuple[str, ...], timeout_s: float, max_bytes: int):
        self.allowlist = allowlist
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    async def resolve(self, part: MediaPart, param: str) -> MediaInput:
        if isinstance(part, InputAudioPart):
            audio = part.input_audio
            return MediaInput(self._b64(audio.data, f"{param}.input_audio.data"), AUDIO_MIME[audio.format])
        kind, url = ("video", part.video_url.url) if isinstance(part, VideoURLPart) else ("image", part.image_url.url)
        assert isinstance(part, (ImageURLPart, VideoURLPart))
        url, param = url.strip(), f"{param}.{kind}_url.url"
        if url[:5].lower() == "data:":
            return self._data_uri(url, param, kind)
        return await self._fetch(url, param, kind)

    # -- inline -------------------------------------------------------------------------------
    def _data_uri(self, url: str, param: str, kind: str) -> MediaInput:
        header, sep, data = url[5:].partition(",")
        fields = [f.strip().lower() for f in header.split(";")]
        example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
        if not sep or "base64" not in fields[1:]:
            raise HTTPError(400, f"a data: URI must be base64-encoded: {example}", param=param)
        mime = fields[0]
        if mime and not mime.startswith(kind + "/"):
            raise HTTPError(400, f"{kind}_url holds {mime!r}; send {kind}s as {kind}/* (images go in image_url, "
                                 f"videos in video_url, audio in input_audio parts)", param=param)
        return MediaInput(self._b64(data, param), _label(mime, kind))

    def _b64(self, data: str, param: str) -> bytes:
        if len(data) // 4 * 3 > self.max_bytes + 3:  # before decoding anything
            raise HTTPError(400, f"media item is over {self.max_bytes} bytes", param=param)
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, "media data is not valid base64", param=param) from None

    # -- fetched ------------------------------------------------------------------------------
    async def _fetch(self, url: str, param: str, kind: str) -> MediaInput:
        import httpx

        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
        except ValueError:
            raise HTTPError(400, f"{kind}_url is not a valid URL", param=param) from None
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise HTTPError(400, f"{kind}_url must be a data: URI or an http(s) URL", param=param)
        if not self.allowlist:
            raise HTTPError(400, f"this server does not fetch media URLs; send the {kind} inline as a "
                                 f"data:{kind}/...;base64 URI", param=param, code="url_fetch_disabled")
        if parts.username or parts.password or not host_allowed(host, self.allowlist):
            raise HTTPError(400, f"fetching from host {host!r} is not allowed (router.media_url_allowlist)",
                            param=param, code="url_not_allowed")
        try:
            async with asyncio.timeout(self.timeout_s):
                async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                             timeout=self.timeout_s) as client:
                    async with client.stream("GET", url) as resp:
                        if resp.status_code != 200:
                            raise HTTPError(400, f"fetching the {kind} answered HTTP {resp.status_code}",
                                            param=param, code="url_fetch_failed")
                        data = await self._read_capped(resp, param, kind)
                        mime = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        except TimeoutError:
            raise HTTPError(400, f"fetching the {kind} took over {self.timeout_s:g} s", param=param,
                            code="url_fetch_failed") from None
        except httpx.HTTPError as exc:
            raise HTTPError(400, f"cannot fetch the {kind}: {type(exc).__name__}", param=param,
                            code="url_fetch_failed") from None
        return MediaInput(data, _label(mime, kind))

    async def _read_capped(self, resp, param: str, kind: str) -> bytes:
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise HTTPError(400, f"the {kind} is {declared} bytes; the limit is {self.max_bytes}", param=param)
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise HTTPError(400, f"the {kind} is over {self.max_bytes} bytes", param=param)
            chunks.append(chunk)
        return b"".join(chunks)
