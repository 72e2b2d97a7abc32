"""`ocr.engine: openai`: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang,
Ollama, LM Studio, a hosted API) does the OCR; the child only sends pages and reads answers.

Each page goes as one `POST {base_url}/chat/completions` with the prompt and the page as a data
URL. `image_format: auto` (the default) sends grayscale and bitonal pages as PNG and colour pages as
JPEG at quality 95. Grayscale and bitonal scans are sharp strokes on paper, where JPEG's ringing
smears small CJK characters, and PNG costs little for them (5 ms for a 1,000 × 700 page here).
Colour pages were JPEGs from the scanner or phone in the first place, PNG-encoding them took 21 ms
a page against JPEG's 4 ms (benchmarks/throughput.py: a fifth of a 100 ms request), and quality 95
keeps artefacts below what the server's own resize to the model's input (1,024 px for
DeepSeek-OCR) leaves. `png` or `jpeg` force one format.

How the server's answers end (design §5, §7):
- connection refused/reset, a connect timeout, 408, 429, 5xx: `EngineUnavailable`, so the file is
  deferred (stays queued, retried with backoff), never failed because the server is down or busy;
- any other 4xx, or an answer that is not a chat completion: an exception whose message carries the
  server's own message (bounded), so the file fails with `engine_error`;
- no answer: cut by `timeout_s` (an `engine_error`) when set, and always by the parent's per-page
  deadline `ocr.timeout_s`, which kills the child.

The API key comes from an environment variable (`api_key_env`) or a file (`api_key_file`), never
from the YAML (a config file is copied, pasted into tickets and committed more often than a
secret should be): a literal `api_key` in `ocr.options` is refused. The key is sent as a Bearer
token and never appears in a message, a log line or an exception.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageChops

from watcherd.core.logs import escape
from watcherd.ocr.engines import EngineConfigError, EngineUnavailable

DEFAULT_PROMPT = (
    "Transcribe all the text in this image exactly as written, in reading order. "
    "Use Markdown for headings, lists and tables. Output only the text."
)
DEFAULT_MAX_TOKENS = 4096
CONNECT_TIMEOUT_S = 10.0
MESSAGE_CHARS = 300  # of a server's error message, in the error JSON
RETRY_LATER = {408, 429}  # and every 5xx
OPTIONS = {
    "base_url",
    "max_tokens",
    "concurrency",
    "timeout_s",
    "api_key_env",
    "api_key_file",
    "temperature",
    "image_format",
    "extra_body",
}
RESERVED_BODY = {"model", "messages", "max_tokens", "temperature", "stream", "n"}
IMAGE_FORMATS = ("auto", "png", "jpeg")
JPEG_QUALITY = 95
GRAY_TOLERANCE = 24  # channel difference still counted as gray: a gray scan saved as colour JPEG
# Options that would put a secret into the YAML: refused by name, whatever the value.
SECRET_OPTIONS = {"api_key", "apikey", "key", "token", "bearer", "authorization", "password", "secret"}


class OpenAiEngine:
    name = "openai"

    def __init__(
        self, *, model: str | None = None, prompt: str | None = None, device: str | None = None, **options: Any
    ):
        settings = parse_options(options)
        if not model:
            raise EngineConfigError("ocr.model: required with ocr.engine openai (the served model's name)")
        try:
            import httpx
        except ImportError:
            raise EngineConfigError("ocr.engine openai needs httpx: pip install 'watcherd[openai]'") from None

        self.model = model
        self.prompt = prompt or DEFAULT_PROMPT
        self.url = settings["base_url"].rstrip("/") + "/chat/completions"
        self.shown_url = without_credentials(self.url)  # for messages: a user:password@ part stays out
        self.max_tokens = settings["max_tokens"]
        self.temperature = settings["temperature"]
        self.concurrency = settings["concurrency"]
        self.image_format = settings["image_format"]
        self.extra_body = settings["extra_body"]
        headers = {"Content-Type": "application/json"}
        key = read_api_key(settings)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._httpx = httpx
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings["timeout_s"], connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            trust_env=False,  # no proxy from the environment: the URL in the config is where pages go
        )
        self._pool = ThreadPoolExecutor(self.concurrency, "openai") if self.concurrency > 1 else None

    # -- the engine interface (design §6) -------------------------------------------------------

    def ocr(self, image: Image.Image) -> str:
        return self._answer(self._request(image))

    def ocr_batch(self, images: list[Image.Image]) -> list[str]:
        """Up to `concurrency` pages in flight at once; the texts in the order of `images`. If any
        page fails, the first failure in page order is raised (a server that is down makes every
        page fail the same way) once every request has ended."""
        if self._pool is None or len(images) < 2:
            return [self.ocr(image) for image in images]
        futures = [self._pool.submit(self.ocr, image) for image in images]
        results: list[str] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others ended
                error = error or exc
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- one request -------------------------------------------------------------------------------

    def _request(self, image: Image.Image) -> Any:
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "messages": [
                {
                    "role": "user",
                    # The image first, as vLLM's DeepSeek-OCR recipe sends it: the chat template puts
                    # the image tokens where the part is, and OCR models are trained image-first.
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(image, self.image_format)}},
                        {"type": "text", "text": self.prompt},
                    ],
                }
            ],
            **self.extra_body,
        }
        httpx = self._httpx
        try:
            return self._client.post(self.url, content=json.dumps(body).encode())
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.PoolTimeout) as exc:
            # Refused, reset, or closed without an answer: down or restarting.
            raise EngineUnavailable(f"OCR server {self.shown_url} unreachable: {type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException:
            timeout = self._client.timeout.read
            raise RuntimeError(f"no answer from the OCR server within ocr.options.timeout_s ({timeout:g} s)") from None
        except httpx.HTTPError as exc:  # other transport failures: a network hiccup, worth a later try
            raise EngineUnavailable(f"OCR server {self.shown_url}: {type(exc).__name__}: {exc}") from None

    def _answer(self, response: Any) -> str:
        status = response.status_code
        if status in RETRY_LATER or status >= 500:
            raise EngineUnavailable(f"OCR server answered HTTP {status}: {server_message(response)}")
        if status >= 400:
            raise RuntimeError(f"OCR server answered HTTP {status}: {server_message(response)}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"OCR server's answer is not a chat completion: {bounded(response.text)}") from None
        if content is None:
            return ""
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RuntimeError(f"OCR server's answer has content of type {type(content).__name__}, not text")
        return content


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """`ocr.options` checked and with defaults; raises EngineConfigError naming the key (never its
    value: it may be a secret)."""
    for name in options:
        if name.lower().replace("-", "_") in SECRET_OPTIONS:
            raise EngineConfigError(
                f"ocr.options.{name}: an API key is never read from the config file; "
                "name an environment variable in ocr.options.api_key_env or a file in ocr.options.api_key_file"
            )
        if name not in OPTIONS:
            raise EngineConfigError(f"ocr.options.{name}: unknown option (known: {', '.join(sorted(OPTIONS))})")
    base_url = options.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise EngineConfigError("ocr.options.base_url: required, e.g. http://127.0.0.1:8000/v1")
    settings: dict[str, Any] = {"base_url": base_url}
    extra_body = options.get("extra_body") or {}
    if not isinstance(extra_body, dict) or RESERVED_BODY & set(extra_body):
        raise EngineConfigError(
            f"ocr.options.extra_body: a mapping of request fields other than {', '.join(sorted(RESERVED_BODY))}"
        )
    settings["extra_body"] = extra_body
    settings["image_format"] = options.get("image_format", "auto")
    if settings["image_format"] not in IMAGE_FORMATS:
        raise EngineConfigError(f"ocr.options.image_format: must be one of {' | '.join(IMAGE_FORMATS)}")
    settings["max_tokens"] = _number(options, "max_tokens", DEFAULT_MAX_TOKENS, int, minimum=1)
    settings["concurrency"] = _number(options, "concurrency", 1, int, minimum=1)
    settings["temperature"] = _number(options, "temperature", 0.0, float, minimum=0)
    timeout = options.get("timeout_s")
    settings["timeout_s"] = None if timeout is None else _number(options, "timeout_s", None, float, minimum=1e-3)
    for name in ("api_key_env", "api_key_file"):
        value = options.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise EngineConfigError(f"ocr.options.{name}: expected a non-empty string")
        settings[name] = value
    if settings["api_key_env"] and settings["api_key_file"]:
        raise EngineConfigError("ocr.options.api_key_file: give api_key_env or api_key_file, not both")
    return settings


def _number(options: dict[str, Any], name: str, default: Any, kind: type, *, minimum: float) -> Any:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise EngineConfigError(f"ocr.options.{name}: expected a {'number' if kind is float else 'whole number'}")
    if not value >= minimum or value != value or value in (float("inf"), float("-inf")):
        raise EngineConfigError(f"ocr.options.{name}: must be at least {minimum:g}")
    return kind(value)


def read_api_key(settings: dict[str, Any]) -> str | None:
    """The key from the environment variable or file named in the options; None without one."""
    if settings["api_key_env"]:
        key = os.environ.get(settings["api_key_env"])
        if not key:
            # The variable's name is not echoed: a key pasted here by mistake must not reach the log.
            raise EngineConfigError("ocr.options.api_key_env: the environment variable it names is not set or empty")
        return key.strip()
    if settings["api_key_file"]:
        try:
            with open(settings["api_key_file"], encoding="utf-8") as f:
                key = f.read(64 * 1024).strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise EngineConfigError(f"ocr.options.api_key_file: cannot read the file it names: {why}") from None
        if not key:
            raise EngineConfigError("ocr.options.api_key_file: the file it names is empty")
        return key
    return None


def data_url(image: Image.Image, image_format: str = "auto") -> str:
    """The page as a data URL: PNG for grayscale/bitonal pages (or `png`), JPEG for colour (or `jpeg`)."""
    buffer = io.BytesIO()
    gray = looks_gray(image)
    if image_format == "png" or (image_format == "auto" and gray):
        page = image if image.mode in ("1", "L", "RGB", "RGBA") else image.convert("L" if gray else "RGB")
        page.save(buffer, format="PNG", compress_level=1)  # level 1: half the time of 6, ~5 % larger
        kind = "png"
    else:
        page = image if image.mode in ("L", "RGB") else image.convert("L" if gray else "RGB")
        page.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


def looks_gray(image: Image.Image) -> bool:
    """A grayscale or bitonal page, even when decoded as RGB (watcherd's pages always are): its
    channels agree, within JPEG's chroma noise, on an 8× reduced copy (well under a millisecond)."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    if image.mode != "RGB":
        return False
    small = image.reduce(8) if min(image.size) >= 64 else image
    red, green, blue = small.split()
    spread = max(ImageChops.difference(red, green).getextrema()[1], ImageChops.difference(green, blue).getextrema()[1])
    return int(spread) <= GRAY_TOLERANCE  # type: ignore[arg-type]


def server_message(response: Any) -> str:
    """The server's own words: `error.message` of an OpenAI-style error body, else the body."""
    try:
        body = response.json()
    except ValueError:
        return bounded(response.text)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return bounded(error["message"])
        if isinstance(error, str):
            return bounded(error)
        if isinstance(body.get("message"), str):
            return bounded(body["message"])
        if isinstance(body.get("detail"), str):
            return bounded(body["detail"])
    return bounded(json.dumps(body, ensure_ascii=False))


def bounded(text: str) -> str:
    """At most MESSAGE_CHARS characters, on one line, escaped (design §9): the message also reaches
    the child's stderr (the journal) unescaped, in the traceback of the failed page."""
    text = " ".join(text.split())
    text = text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "…"
    return escape(text)
