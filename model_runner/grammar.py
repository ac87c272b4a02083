"""Constrained decoding: a JSON schema turned into a token mask at every step, by llguidance (the grammar engine
behind vLLM's "guidance" backend and llama.cpp's; why this one: docs/constrained-decoding.md).

Three pieces, one owner each:
  GrammarCompiler      one per runner: schema -> Grammar, validated and cached. Compiling is a few ms for a
                       typical schema; the API runs it in a worker thread, never on the event loop.
  Grammar              a compiled schema: a warmed template matcher that every sequence copies (one matcher per
                       sample, so n > 1 samples each follow the grammar on their own).
  apply_grammar_masks  in the step, just before sampling: each row with a matcher gets its allowed-token bitmask
                       and every other logit of that row is set to -inf; rows without one are not touched.
The matcher advances in Sequence.append_token, on every token the sequence takes (model_runner/sequence.py).
When the document is complete the matcher allows only end-of-sequence tokens, so the sequence stops there, and
Grammar.check validates that document against the schema itself: llguidance's grammar approximates a few bounds
(below), and a document it let through that the schema rejects ends as an error, never as a "stop".
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from decimal import Decimal

import jsonschema
import llguidance
import llguidance.hf
import torch

from .errors import InvalidRequestError

CACHE_SIZE = 64  # compiled schemas kept (clients tend to send the same few schemas again and again)
# llguidance's resource limits. Compiling is bounded by its lexer fuel (the regex work of building the lexer): a
# schema that needs more is refused (GrammarError: "initial lexer configuration (grammar) too big"), so no compile
# runs unbounded. Its default, 1M, let a 31 KiB schema of 400 integer ranges compile in 1.2-3.5 s on a 2-core
# Zen 3 (shared with other work, loaded); 100k refuses it, and one of 400 number ranges, after 0.2-0.4 s, while
# 300 bounded strings, 200 patterns, 100 arrays of 100-1000 items or a 40-way anyOf of 20-field objects compile
# under it in 60-150 ms (benchmarks/constrained.py, LARGE; docs/constrained-decoding.md). Per step (computing
# one mask) llguidance's defaults stand; a step past them puts the matcher in an error state, which ends the
# request with an error (Sequence._grammar_failure).
# verbose_errors off: the messages reach clients, and the verbose ones dump the parser's state.
COMPILE_LIMITS = dict(initial_lexer_fuel=100_000, verbose_errors=False)
# Keywords that change nothing a document may be (annotations, JSON Schema 2020-12 section 9 and $comment): left
# out of the cache's key and of what llguidance compiles, so schemas that differ only in them share one grammar.
ANNOTATIONS = frozenset({"title", "description", "examples", "$comment"})
_SUBSCHEMA = frozenset({"additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
                        "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
EXACT_INTEGERS = 2 ** 53  # llguidance reads numeric bounds as IEEE doubles: past this, integers round
MAX_REPEAT = 2 ** 32 - 1  # a string length past this is a regex repetition llguidance cannot parse


class GrammarError(InvalidRequestError):
    """A schema llguidance cannot enforce (malformed, or a keyword it does not implement)."""


def _decimal_multiple_of(validator, divisor, instance, schema):
    """multipleOf in decimal, as JSON writes numbers and as llguidance enforces it (jsonschema's own divides
    doubles: 2065.1 is "not a multiple of 0.1" there)."""
    if validator.is_type(instance, "number") and not isinstance(instance, bool):
        if Decimal(repr(instance)) % Decimal(repr(divisor)) != 0:
            yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor!r}")


def _validator(schema: dict | bool):
    """The schema's own validator: its draft's formats checked where jsonschema has a checker installed (date,
    email, ipv4, ipv6, uuid here; not date-time, time, hostname, uri, duration), multipleOf in decimal.
    Not check_schema(): on a 30 KiB schema it took a second, longer than llguidance's compile (which refuses a
    malformed schema itself); only the patterns, which check() runs with Python's re, are compiled here."""
    for sub in _subschemas(schema):
        for pattern in [sub.get("pattern")] + list(sub.get("patternProperties") or ()):
            try:
                if isinstance(pattern, str):
                    re.compile(pattern)
            except re.error as e:
                raise GrammarError(f"'pattern' {pattern[:100]!r} is not a regular expression the server can check "
                                   f"({e})") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls = jsonschema.validators.extend(cls, {"multipleOf": _decimal_multiple_of})
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # (FormatChecker() would apply draft 3's "time")


class Grammar:
    """A compiled schema. matcher() gives a fresh matcher at its start: a copy of the template, which shares
    the lexer states the template built while it was warmed (a copy is cheap: no compiling)."""

    def __init__(self, template: llguidance.LLMatcher, source: str, validator, tokenizer: llguidance.LLTokenizer):
        self._template, self.source, self._validator, self._tokenizer = template, source, validator, tokenizer

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()

    def check(self, token_ids: list[int]) -> str | None:
        """Why the document these tokens spell (the grammar accepted it as complete) does not match the schema,
        or None when it does. Numbers are read as doubles, as llguidance reads the schema's bounds."""
        try:
            document = json.loads(self._tokenizer.decode_bytes(token_ids).decode("utf-8"))
        except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            return f"not JSON: {e}"
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(document))
        except Exception as e:  # a keyword jsonschema cannot apply as given (llguidance accepted it): not checked
            return f"the schema could not check it: {type(e).__name__}: {str(e)[:200]}"
        if error is None:
            return None
        return f"{error.message[:200]} at {'/'.join(map(str, error.absolute_path)) or 'the top'}"

    def __repr__(self) -> str:
        return f"Grammar({self.source[:60]!r}{'...' if len(self.source) > 60 else ''})"


class GrammarCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], limits: dict | None = None):
        self._hf, self._eos = hf_tokenizer, list(eos_token_ids)
        self._limits = llguidance.LLParserLimits(**(COMPILE_LIMITS if limits is None else limits))
        # The mask covers every logit and every tokenizer id, whichever is the larger.
        self._vocab = max(vocab_size, len(hf_tokenizer))
        self.mask_words = -(-self._vocab // 32)  # int32 words of one row's bitmask
        self._tokenizer: llguidance.LLTokenizer | None = None
        # The API compiles in worker threads and looks the cache up on the event loop: the cache's lock is held only
        # for a dict operation; building the tokenizer (long) has a lock of its own, so no look-up waits for it.
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def prepare(self) -> None:
        """Builds llguidance's view of the vocabulary now (0.3-0.9 s measured for 49k tokens). It holds the GIL
        most of that time, which would stall the event loop if the first request paid for it: the server calls
        this at start-up, before it answers; in-process users (tests, benchmarks) may let the first schema do it."""
        self._llg_tokenizer()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
            return self._tokenizer

    @staticmethod
    def key(schema: dict | bool) -> str:
        """The schema's canonical JSON text, annotations left out: what the cache is keyed by, and what
        llguidance compiles."""
        return json.dumps(_without_annotations(schema), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def cached(self, source: str) -> Grammar | None:
        """The compiled grammar of this key(schema) if it was compiled before (cheap: no thread needed)."""
        with self._lock:
            hit = self._cache.get(source)
            if hit is not None:
                self._cache.move_to_end(hit.source)
            return hit

    def json_schema(self, schema: dict | bool) -> Grammar:
        """Compiles a JSON schema; raises GrammarError with llguidance's reason when it cannot be enforced."""
        return self.compile(self.key(schema))

    def compile(self, source: str) -> Grammar:
        """json_schema() for a schema already turned into its key (the API measures its size first)."""
        if (hit := self.cached(source)) is not None:
            return hit
        tokenizer = self._llg_tokenizer()
        schema = json.loads(source)
        if inexact := _inexact_bound(schema):
            raise GrammarError(inexact)
        validator = _validator(schema)
        try:
            # Compact JSON (no whitespace between tokens): with free whitespace (llguidance's and vLLM's default)
            # a weak model can spend every token on spaces and newlines between the braces. A schema may still ask
            # for it with llguidance's own {"x-guidance": {"whitespace_flexible": true}}.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(str(e)) from None
        # (no separate validate_grammar(): it builds the same lexer and parser the matcher builds, twice the time)
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise GrammarError(one_line(template.get_error()))
        template.compute_bitmask()  # warms the lexer for the first token; copies start warm
        if template.is_error():
            raise GrammarError(one_line(template.get_error()))
        compiled = Grammar(template, source, validator, tokenizer)
        with self._lock:
            self._cache[source] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def one_line(message: str) -> str:
    """llguidance's message on one line: its parser-state dump (if any) cut, the lines (a regex error points at
    the offending part on the next ones) joined."""
    return " ".join(message.split("<state>")[0].split())[:500] or "error"


def _without_annotations(schema):
    """The schema with its annotation keywords left out, at every place a subschema can be (never inside data:
    a property named "title" or an enum value stays)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ANNOTATIONS:
            continue
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            v = {name: _without_annotations(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            v = [_without_annotations(sub) for sub in v]
        elif k in _SUBSCHEMA:
            v = _without_annotations(v)
        out[k] = v
    return out


def _subschemas(schema):
    """Every subschema of schema, itself included (the positions _without_annotations knows)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for k, v in schema.items():
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            for sub in v.values():
                yield from _subschemas(sub)
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            for sub in v:
                yield from _subschemas(sub)
        elif k in _SUBSCHEMA:
            yield from _subschemas(v)


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _inexact_bound(schema) -> str | None:
    """Why llguidance would enforce a numeric bound of this schema other than as written, or None. Refused up
    front (the client gets a 400 naming the keyword) rather than found out after generating:
      - a bound past 2^53 in magnitude: llguidance reads bounds as doubles, so 9007199254740993 becomes ...992;
      - a minLength or maxLength past 2^32 - 1: llguidance fails to parse the regex it makes of it (tested);
      - a number's exclusive lower bound at an integer n >= 0 whose upper bound is below n + 1, or its mirror
        image (an exclusive upper bound at an integer n <= 0, the lower bound above n - 1): the range regex then
        allows n itself, or -0 (llguidance 1.9.1, parser/src/json/numeric.rs rx_float_range; tested)."""
    for sub in _subschemas(schema):
        for keyword in _BOUNDS:
            v = sub.get(keyword)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > EXACT_INTEGERS:
                return (f"'{keyword}': {v!r} is past 2^53 in magnitude, which the grammar engine cannot enforce "
                        f"exactly (it reads bounds as doubles): use a bound within +/-{EXACT_INTEGERS}")
        for keyword in ("minLength", "maxLength"):
            v = sub.get(keyword)
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_REPEAT:
                return (f"'{keyword}': {v} is past {MAX_REPEAT}, the largest length the grammar engine's regular "
                        f"expressions can state: lower it (no output that long fits the context anyway)")
        if sub.get("type") == "integer":  # integers have a range regex of their own, exact
            continue
        lo, hi = sub.get("exclusiveMinimum"), _tightest(sub, "maximum", "exclusiveMaximum", min)
        if _numbers(lo, hi) and lo >= 0 and lo == int(lo) and hi < lo + 1:
            return (f"'exclusiveMinimum': {lo!r} with an upper bound below {lo!r} + 1 is enforced inexactly by the "
                    f"grammar engine (it would allow {lo!r}): use 'minimum' with the smallest value you accept")
        lo, hi = _tightest(sub, "minimum", "exclusiveMinimum", max), sub.get("exclusiveMaximum")
        if _numbers(lo, hi) and hi <= 0 and hi == int(hi) and lo > hi - 1:
            return (f"'exclusiveMaximum': {hi!r} with a lower bound above {hi!r} - 1 is enforced inexactly by the "
                    f"grammar engine (it would allow {hi!r}): use 'maximum' with the largest value you accept")
    return None


def _tightest(schema: dict, a: str, b: str, pick):
    values = [v for v in (schema.get(a), schema.get(b)) if _numbers(v)]
    return pick(values) if values else None


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None], mask_words: int) -> None:
    """Sets to -inf, in place, every logit the row's matcher forbids. logits [B, V]; matchers[i] is row i's
    matcher or None (that row is left exactly as it is); mask_words: the compiler's words per bitmask row."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = torch.empty(len(rows), mask_words, dtype=torch.int32)
    for k, i in enumerate(rows):
        # Fills the row in place (llguidance drops the GIL while it computes).
        matchers[i].unsafe_compute_mask_ptr(bitmask[k].data_ptr(), mask_words * 4)
    # Bit j of word w allows token 32w + j. Unpacked by shifts, measured faster on this CPU than a byte lookup
    # table or llguidance's one-byte-per-token bias (0.5 ms against 0.9 and 1.4 ms for 16 rows of 49k tokens).
    # The words cover every logit (the compiler sized them), so the slice only drops the padding bits.
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    forbidden = (bits.view(len(rows), -1)[:, :logits.shape[1]] == 0).to(logits.device)
    for k, i in enumerate(rows):
        logits[i].masked_fill_(forbidden[k], float("-inf"))


__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "apply_grammar_masks"]
