"""What a command-line value may be, checked as it is parsed: no value quietly turns a protection off.

An unset shell variable gives an empty string (`--api-key "$KEY"`), a typo gives 0 or a negative number, and
float() takes "nan" and "inf": each of these would leave a limit, a key or TLS off while the server says it is
on. So every security or limit flag is parsed by one of these converters, which refuse such a value (argparse
turns the refusal into `jitney: error: argument --flag: ...`, exit 2), and "off" is only ever spelled by
leaving the flag out.
"""
from __future__ import annotations

import argparse
import math

from model_runner.errors import InvalidRequestError
from model_runner.units import parse_bytes

Refused = argparse.ArgumentTypeError


def integer(minimum: int, maximum: int = 2**63 - 1, off: str = ""):
    """A whole number in [minimum, maximum] (by default what an int64 holds, as torch and the queue's counts
    need); `off` tells how to get what a 0 might have been meant for."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise Refused(f"not a whole number: {text!r}") from None
        if not minimum <= value <= maximum:
            bound = f"from {minimum} to {maximum}" if maximum < 2**63 - 1 else f"at least {minimum}"
            raise Refused(f"{value} is out of range: give a number {bound}{off}")
        return value
    return parse


def auto_or(parse_value):
    """`auto` (None: the runner chooses, and the start-up line says what and why) or what parse_value accepts."""
    def parse(text: str):
        return None if text.strip() == "auto" else parse_value(text)
    return parse


def dense_rows(text: str) -> str:
    """--quant-dense-rows: off, auto, or a whole number of rows (0: off); model_runner.qmatmul reads it."""
    return text if text in ("off", "auto") else str(integer(0)(text))


def real(minimum: float, above: bool = False, maximum: float | None = None, off: str = ""):
    """A finite number >= minimum (> minimum when `above`), <= maximum: never nan or inf, which would make
    every comparison against it false (a deadline that never passes, a rate nobody reaches)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Refused(f"not a number: {text!r}") from None
        low_ok = value > minimum if above else value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            bound = (f"{'above' if above else 'at least'} {minimum:g}"
                     + (f" and at most {maximum:g}" if maximum is not None else ""))
            raise Refused(f"{text!r} is out of range: give a finite number {bound}{off}")
        return value
    return parse


def size(minimum: int = 1):
    """A byte count as people write it ('1MiB', '4096'), at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = parse_bytes(text)
        except OverflowError:  # '1e400', 'inf': int(float) overflows
            raise Refused(f"not a size: {text!r} (try 2GiB, 512MiB or a byte count)") from None
        if not minimum <= value < 2**63:
            raise Refused(f"{text!r} is {value} bytes: give at least {minimum} (and less than 8 EiB)")
        return value
    return parse


def word(what: str):
    """A non-empty string without surrounding whitespace (an unset variable expands to '')."""
    def parse(text: str) -> str:
        if not text.strip():
            raise Refused(f"empty {what} (an unset shell variable?): give one, or leave the flag out")
        if text != text.strip():
            raise Refused(f"{what} {text!r} has surrounding whitespace: remove it")
        return text
    return parse


def api_key(text: str) -> str:
    """A key a client can send in a header: visible ASCII, no spaces. An empty key would match a request that
    sends none (the gate reads a missing header as ''), so keys would be announced on and open to everyone."""
    if not text:
        raise Refused("empty API key (an unset shell variable?): give the key, or leave --api-key out to serve "
                      "without keys")
    if not all("!" <= c <= "~" for c in text):
        raise Refused("an API key must be visible ASCII characters without spaces (a client could never send "
                      "this one in a header)")
    return text


def env_api_keys(environ) -> tuple[str, ...]:
    """JITNEY_API_KEY: comma-separated keys (spaces around commas ignored). Set but empty, or with an empty
    key between commas, it is refused: the operator meant keys, and an empty one would let everyone in."""
    if "JITNEY_API_KEY" not in environ:
        return ()
    keys = tuple(k.strip() for k in environ["JITNEY_API_KEY"].split(","))
    for k in keys:
        if not k:
            raise InvalidRequestError("JITNEY_API_KEY is set but holds an empty key (an unset shell variable? a "
                                      "stray comma?): put the keys in it, comma-separated, or unset it to serve "
                                      "without keys")
        try:
            api_key(k)
        except Refused as e:
            raise InvalidRequestError(f"JITNEY_API_KEY: {e}") from None
    return keys


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """A key without a certificate would be dropped by uvicorn, serving plain HTTP; a file that does not load
    would fail after the model is loaded, with a traceback. Both are refused up front."""
    import ssl
    if keyfile and not certfile:
        raise InvalidRequestError("--ssl-keyfile without --ssl-certfile would serve plain HTTP: give the "
                                  "certificate too (or drop both to serve HTTP)")
    if certfile:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as e:
            raise InvalidRequestError(f"--ssl-certfile/--ssl-keyfile do not load ({e}): give a PEM certificate "
                                      "and its private key") from None


class ChatTemplate(str):
    """--chat-template's value: the template's text (a str), with the file it came from as .path."""
    path: str

    @property
    def text(self) -> str:
        return str(self)


# What a template is rendered on at start: two turns and the generation prompt. No system turn: some models'
# templates refuse one (raise_exception), and are still right for the conversations they are given.
SAMPLE_CHAT = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Rhine."}]


def chat_template(path: str) -> ChatTemplate:
    """A Jinja chat template file, read and rendered once (transformers' sandboxed renderer, the one the server
    renders with): a syntax error or a template that raises is refused now, in one line, not at the first
    chat request. Special tokens (bos_token, eos_token) are the model's and not known yet: they render empty."""
    from transformers.utils.chat_template_utils import render_jinja_template
    word("file name")(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Refused(f"cannot read {path!r} ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise Refused(f"{path!r} is empty: give a Jinja template that renders `messages`")
    try:
        rendered = render_jinja_template([SAMPLE_CHAT], chat_template=text, add_generation_prompt=True)[0][0]
    except Exception as e:  # jinja2's TemplateError (syntax, raise_exception()), or whatever the template raises
        line = getattr(e, "lineno", None)
        raise Refused(f"{path!r} does not render a conversation"
                      f"{f' (line {line})' if line else ''}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if "Name a river." not in rendered:
        raise Refused(f"{path!r} renders a conversation without its messages' content: a chat template must "
                      "write each message's content")
    template = ChatTemplate(text)
    template.path = path
    return template


def check_cache_dir() -> None:
    """The cache (JITNEY_CACHE_DIR, else ~/.cache/jitney) takes converted models and built kernels: one this
    process cannot write would fail mid-load."""
    import os

    from model_runner.paths import cache_dir
    where = cache_dir()
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        name = "JITNEY_CACHE_DIR" if os.environ.get("JITNEY_CACHE_DIR") else "the cache directory"
        raise InvalidRequestError(f"{name} {str(where)!r} is not a writable directory"
                                  f"{'' if existing == where else f' ({str(existing)!r} cannot be written)'}: point "
                                  "JITNEY_CACHE_DIR at a directory this user can write")
