"""A client for any OpenAI-compatible chat-completions endpoint that reads images (a VLM).

Ollama, llama.cpp's server, vLLM, LM Studio and hosted APIs all answer ``POST {api}/chat/completions`` with
``image_url`` parts given as ``data:`` URLs, so one client built on the standard library serves them all.

``base_url`` rule: a URL with no path (``http://localhost:11434``) gets ``/v1`` appended; a URL with a path
(``http://localhost:11434/v1``, ``https://openrouter.ai/api/v1``) is used as given. Requests go to
``{base_url}/chat/completions``.

The API key comes from the ``api_key`` argument or else the ``DIFFUSION_SAE_VLM_KEY`` environment variable.
It travels only in the ``Authorization`` header: it is kept out of the client's repr, of log records and of
every failure message (a server that echoes the header back has it masked), and redirects are not followed,
so the header never reaches another host. Requests to a loopback host bypass proxies: a local server is
never behind one.

Every way a request can fail ends in a :class:`VLMFailure` whose ``status`` names the kind (``timeout``,
``rate_limited``, ``refused``, ``malformed``, ``error``), so a caller labelling many features records the
failure and goes on.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

from PIL import Image

from .errors import InputError

log = logging.getLogger("sae_core.vlm")

ImageInput = Union[Image.Image, str, os.PathLike, Callable[[], Image.Image]]
"""An image; the path of an image file, opened when sent; or a function drawing it when sent (a feature index's
heatmap tile), so that a large pool of evidence holds no pixels."""

KEY_ENV = "DIFFUSION_SAE_VLM_KEY"
MAX_REPLY_BYTES = 1 << 20
MAX_LABEL_CHARS = 60
MAX_DETAIL_CHARS = 300
MAX_IMAGE_SIDE = 512  # larger images are shrunk before sending: the label needs the gist, not the pixels
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
REFUSAL_OPENINGS = ("i can't", "i cannot", "i can not", "i'm sorry", "i am sorry", "sorry,", "i'm unable",
                    "i am unable", "i won't", "i will not", "as an ai")

DESCRIBE_PROMPT = (
    "These images are the inputs on which one feature of an image model fires most strongly; the heatmap "
    "overlay marks where it fires. Name what the marked regions have in common in a short label of 2 to 5 "
    "words. Reply with the label only.")
JUDGE_PROMPT = (
    'A feature of an image model is labelled "{label}". Below are {n} images, numbered 1 to {n}. Which of '
    "them show {label}? Reply with a JSON list of the matching image numbers only, e.g. [1, 3], or [] if "
    "none match.")


class VLMFailure(Exception):
    """A request that gave no usable answer; ``status`` is one of the label statuses, ``detail`` one line."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points; stop at the first hop."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        return None


def api_root(base_url: str) -> str:
    """The documented ``base_url`` rule: no path means ``/v1``; any path is kept as given."""
    parsed = urllib.parse.urlsplit(base_url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(f"VLM base_url {base_url!r} is not an http(s) URL: give one like http://localhost:11434/v1")
    path = parsed.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


class VLMClient:
    """Chat completions with images against one model; ``describe`` names a feature, ``judge`` picks images.

    ``timeout`` bounds each request in seconds. A 429 reply is retried up to ``max_retries`` times after the
    wait its ``Retry-After`` asks for (else 1, 2, 4... s), never more than ``max_retry_wait`` seconds each.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, max_retry_wait: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        if not model or not model.strip():
            raise InputError("VLM model name is empty: give the model's name as the server lists it (e.g. llava)")
        if timeout <= 0 or max_retries < 0 or max_retry_wait < 0:
            raise InputError(f"VLM timeout ({timeout}) must be > 0, max_retries ({max_retries}) and "
                             f"max_retry_wait ({max_retry_wait}) >= 0")
        self.url = api_root(base_url) + "/chat/completions"
        self.model = model.strip()
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._sleep = sleep
        self._api_key = api_key if api_key is not None else os.environ.get(KEY_ENV) or None
        handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
        if urllib.parse.urlsplit(self.url).hostname in LOOPBACK_HOSTS:
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"VLMClient(url={self.url!r}, model={self.model!r}, api_key={key})"

    def describe(self, images: Sequence[ImageInput]) -> str:
        """A short label for what the feature's top images have in common (one line, at most 60 characters)."""
        with self._failures_made_safe():
            if not images:
                raise VLMFailure("error", "no images to describe")
            label = clean_label(self._complete([_text(DESCRIBE_PROMPT), *map(_image, images)], max_tokens=100))
            if not label:
                raise VLMFailure("refused", "the model replied without a label")
            return label

    def judge(self, label: str, images: Sequence[ImageInput]) -> list[int]:
        """Positions (0-based) of the images the model says show ``label``."""
        with self._failures_made_safe():
            parts = [_text(JUDGE_PROMPT.format(label=label, n=len(images)))]
            for number, image in enumerate(images, start=1):
                parts += [_text(f"Image {number}:"), _image(image)]
            return parse_picks(self._complete(parts, max_tokens=200), len(images))

    def complete(self, content: list[dict[str, Any]], max_tokens: int) -> str:
        """The reply's text to one user message (``content``: chat-completions parts); a refusal or an
        unusable reply raises :class:`VLMFailure`."""
        with self._failures_made_safe():
            return self._complete(content, max_tokens)

    def _complete(self, content: list[dict[str, Any]], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": max_tokens, "stream": False}).encode()
        reply = self._post_with_retries(body)
        text, finish_reason, refusal = _read_choice(reply)
        if finish_reason == "content_filter" or refusal:
            raise VLMFailure("refused", f"the model refused ({refusal or 'finish_reason content_filter'})")
        if not _strip_thinking(text).strip():
            raise VLMFailure("refused", "the model's reply has no text")
        if _is_refusal(text):
            raise VLMFailure("refused", f"the model refused: {text!r}")
        return text

    def _post_with_retries(self, body: bytes) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except urllib.error.HTTPError as err:
                with err:
                    if err.code != 429:
                        raise VLMFailure("error", self._http_error_detail(err)) from None
                if attempt == self.max_retries:
                    raise VLMFailure("rate_limited", f"HTTP 429 from {self.url} after {attempt + 1} tries: "
                                                     "lower the request rate or raise max_retries") from None
                wait = self._retry_wait(err.headers.get("Retry-After"), attempt)
                log.info("VLM rate-limited (HTTP 429); retrying in %.1f s", wait)
                self._sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def _post(self, body: bytes) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError:
            raise
        except TimeoutError:
            raise VLMFailure("timeout", f"no reply from {self.url} within {self.timeout:g} s") from None
        except urllib.error.URLError as err:
            raise self._connection_failure(err.reason) from None
        except (OSError, http.client.HTTPException) as err:
            raise self._connection_failure(err) from None
        if len(raw) > MAX_REPLY_BYTES:
            raise VLMFailure("malformed", f"reply from {self.url} is larger than {MAX_REPLY_BYTES} bytes")
        try:
            return json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            raise VLMFailure("malformed", f"reply is not JSON: {raw.decode('utf-8', errors='replace')!r}") from None

    def _connection_failure(self, reason: object) -> VLMFailure:
        """Refused or timed-out connections read as ``timeout`` (the server is down or busy); others as ``error``."""
        if isinstance(reason, (TimeoutError, ConnectionRefusedError)):
            return VLMFailure("timeout", f"cannot reach {self.url} ({type(reason).__name__}): is the server running?")
        return VLMFailure("error", f"cannot reach {self.url}: {reason}")

    def _http_error_detail(self, err: urllib.error.HTTPError) -> str:
        try:
            snippet = err.read(4096).decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException):
            snippet = ""
        hint = {401: "check the API key (DIFFUSION_SAE_VLM_KEY)", 403: "check the API key's permissions",
                404: "check base_url (it should end with the API version, e.g. /v1) and the model name"}.get(err.code, "")
        if 300 <= err.code < 400:
            hint = "redirects are not followed: set base_url to the final address"
        return ": ".join(part for part in (f"HTTP {err.code} from {self.url}", hint, snippet) if part)

    def _retry_wait(self, retry_after: str | None, attempt: int) -> float:
        """Seconds to wait before retrying a 429: what ``Retry-After`` asks, else 1, 2, 4... s; capped."""
        asked = _seconds_until(retry_after) if retry_after else None
        wait = float(2 ** attempt) if asked is None else asked
        return min(max(wait, 0.0), self.max_retry_wait)

    @contextmanager
    def _failures_made_safe(self) -> Iterator[None]:
        """Every failure leaves on one short line, and whatever a server echoed back, without the key."""
        try:
            yield
        except VLMFailure as failure:
            raise VLMFailure(failure.status, self._safe(failure.detail)) from None

    def _safe(self, text: str, limit: int = MAX_DETAIL_CHARS) -> str:
        """``text`` on one line, the key masked, cut to ``limit`` characters; a key cut in two is masked too."""
        text = _one_line(text)
        if self._api_key:
            text = text.replace(self._api_key, "[key]")
        if len(text) <= limit:
            return text
        text = text[:limit]
        for length in range(len(self._api_key or "") - 1, 0, -1):
            if text.endswith(self._api_key[:length]):
                return text[:-length] + "[key]"
        return text


def _seconds_until(retry_after: str) -> float | None:
    """``Retry-After`` is either seconds or an HTTP date; None when it is neither."""
    try:
        seconds = float(retry_after)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return seconds if math.isfinite(seconds) else None


def _read_choice(reply: Any) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, refusal) of the first choice; the fields missing means a malformed reply."""
    try:
        choice = reply["choices"][0]
        message = choice["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise VLMFailure("malformed", "reply has no choices[0].message: is this a chat-completions endpoint?") from None
    if isinstance(content, list):  # some servers answer in parts, like the request
        content = "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    if content is not None and not isinstance(content, str):
        raise VLMFailure("malformed", f"reply's message content is a {type(content).__name__}, not text")
    refusal = message.get("refusal")
    return content or "", choice.get("finish_reason"), refusal if isinstance(refusal, str) and refusal else None


def _is_refusal(text: str) -> bool:
    opening = _strip_thinking(text).strip().lower().replace("\u2019", "'")
    return opening.startswith(REFUSAL_OPENINGS)


def _strip_thinking(text: str) -> str:
    """Reasoning models put their thoughts in ``<think>`` blocks before the answer."""
    return re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.DOTALL | re.IGNORECASE)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def clean_label(reply: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """The label in a model's reply: first non-empty line, without a "Label:" prefix, list marks, quotes,
    emphasis or a final full stop, spaces collapsed, cut at a word boundary to ``max_chars``."""
    lines = [line.strip() for line in _strip_thinking(reply).splitlines() if line.strip()]
    if not lines:
        return ""
    label = re.sub(r"^(?:[-*\u2022]\s+|\d+[.)]\s+)", "", lines[0])
    label = re.sub(r"^\**\s*label\s*\**\s*:\s*", "", label, flags=re.IGNORECASE)
    label = _one_line(label.strip(" \t\"'`*_\u201c\u201d\u2018\u2019").rstrip(".!;:,").strip(" \"'`*_\u201c\u201d"))
    if len(label) > max_chars:
        cut = label[:max_chars + 1].rsplit(" ", 1)[0]
        label = cut if 0 < len(cut) <= max_chars else label[:max_chars]
    return label.rstrip(" ,;:-")


def parse_picks(reply: str, n_images: int) -> list[int]:
    """0-based positions from a reply that lists 1-based image numbers, tolerantly: the first ``[...]`` in the
    text (other words around it are fine); "none" with no list means no picks. Numbers outside 1..n are
    dropped (a model counting from 0 would otherwise shift every pick)."""
    text = _strip_thinking(reply)
    found = re.search(r"\[[^\[\]]*\]", text)
    if found is None:
        if re.search(r"\bnone\b", text, flags=re.IGNORECASE):
            return []
        raise VLMFailure("malformed", f"no list of image numbers in the reply: {text!r}")
    try:
        items = json.loads(found.group(0))
    except json.JSONDecodeError:  # e.g. ['1', '2'] or [1 , 2,]
        items = [item.strip(" '\"") for item in found.group(0)[1:-1].split(",") if item.strip()]
    numbers = [_as_number(item) for item in items]
    if any(number is None for number in numbers):
        raise VLMFailure("malformed", f"the list holds something other than image numbers: {found.group(0)!r}")
    return sorted({number - 1 for number in numbers if number is not None and 1 <= number <= n_images})


def _as_number(item: object) -> int | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return item
    if isinstance(item, float) and item.is_integer():
        return int(item)
    if isinstance(item, str) and item.strip().lstrip("-").isdigit():
        return int(item.strip())
    return None


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(image: ImageInput) -> dict[str, Any]:
    try:
        url = png_data_url(image)
    except (OSError, ValueError) as err:  # an image file gone missing, truncated or not an image
        raise VLMFailure("error", f"an image could not be encoded as PNG: {err}") from None
    return {"type": "image_url", "image_url": {"url": url}}


def png_data_url(image: ImageInput, max_side: int = MAX_IMAGE_SIDE) -> str:
    """``data:image/png;base64,...`` of the image (or image file) as RGB, shrunk so its longer side is at most
    ``max_side``."""
    if callable(image):
        return png_data_url(image(), max_side)
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return png_data_url(opened, max_side)
    picture = image.convert("RGB")
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
