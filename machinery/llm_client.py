"""One OpenAI-compatible chat client, shared by 01's teacher and 04's judge.

Any server that speaks the chat-completions API works: OpenAI itself, or a local vLLM or SGLang
server (`http://host:port/v1`). The `openai` package does the HTTP: connection reuse across threads,
timeouts, typed errors. The retries are ours (the package's are switched off): its back-off starts
at a fixed 0.5 s and sleeps where Ctrl-C cannot cut it short, whereas a run here wants a chosen
first wait (`backoff_s`), a stop event that ends every wait at once, and a hard stop on a bad key.

    client = ChatClient("http://localhost:8000/v1", "o4-mini", api_key, max_retries=5)
    text = client.complete([{"role": "user", "content": "2 + 2?"}], temperature=0)

The API key only ever goes into the Authorization header; it is replaced by *** in every error
message this module raises (servers sometimes echo request headers back in their error bodies).
"""

import random
import threading

import openai

FATAL_STATUS = (401, 403, 404)  # bad key, no access, wrong model or URL: every retry would fail too
DETAIL_CHARS = 300  # how much of an error body goes into the message


class RequestFailed(Exception):
    """A request failed for good: retries used up, a status that retrying cannot fix, an unusable
    reply, or the stop event was set."""


class EndpointRefused(RuntimeError):
    """HTTP 401/403/404: the endpoint refuses this key, model or URL, so every later request would
    fail the same way; callers stop the run instead of counting one failure per item."""


class ChatClient:
    """Chat completions from `model` at `base_url`, each request retried on its own (thread-safe)."""

    def __init__(self, base_url, model, api_key="", *, timeout_s=120.0, max_retries=5, backoff_s=1.0,
                 stop=None):
        """timeout_s: seconds per request; max_retries: retries after a timeout, connection error, 429
        or 5xx; backoff_s: the first retry waits about this long (x2 per retry, with jitter), unless
        the server's Retry-After says otherwise; stop: a threading.Event that ends waits and retries.
        No api_key: requests carry no Authorization header (local servers need none)."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_retries, self.backoff_s = model, max_retries, backoff_s
        self.stop = stop or threading.Event()
        self._key = api_key
        # An explicit placeholder: with api_key=None the package would read OPENAI_API_KEY instead.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout_s,
                                     max_retries=0)
        self._headers = {} if api_key else {"Authorization": openai.Omit()}  # drop the placeholder

    def scrub(self, text) -> str:
        """`text` with the API key replaced by ***."""
        return str(text).replace(self._key, "***") if self._key else str(text)

    def complete(self, messages, **params) -> str:
        """The reply text to `messages` (params such as temperature or response_format go to the API).

        Raises EndpointRefused on 401/403/404 and RequestFailed on anything else that retrying did
        not fix (other 4xx at once; timeouts, connection errors, 429 and 5xx after max_retries).
        """
        error = ""
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise RequestFailed("interrupted")
            wait = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            try:
                reply = self._client.chat.completions.create(model=self.model, messages=messages,
                                                             extra_headers=self._headers, **params)
                return reply.choices[0].message.content or ""
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {e.response.text[:DETAIL_CHARS]}"
                if e.status_code in FATAL_STATUS:
                    raise EndpointRefused(self.scrub(f"the endpoint {self.url} answered {error}")) from None
                if e.status_code != 429 and e.status_code < 500:
                    raise RequestFailed(self.scrub(error)) from None
                retry_after = e.response.headers.get("retry-after", "")
                if retry_after.isdigit():  # the server's own wait (seconds) beats our guess
                    wait = float(retry_after)
            except openai.APIConnectionError as e:  # includes APITimeoutError
                error = f"{type(e).__name__}: {e.__cause__ or e}"
            except (AttributeError, IndexError, TypeError) as e:  # a 200 that is not a chat completion
                raise RequestFailed(self.scrub(f"unexpected response from {self.url} "
                                               f"({type(e).__name__}: {e})")) from None
            if attempt < self.max_retries:
                self.stop.wait(wait)  # a back-off sleep that the stop event (Ctrl-C) cuts short
        raise RequestFailed(self.scrub(f"gave up after {self.max_retries + 1} attempts, last: {error}"))
