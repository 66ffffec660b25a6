"""The relay's Liquid dialect: python-liquid 2 configured to render as Braze (Ruby Liquid 5) does.

``ENV`` is the one Environment every template is parsed with; ``parse`` loads a template and
``template_problems`` lists what is wrong with one before it is ever rendered. The differential
corpus in tests/liquid/ (expected outputs produced by Ruby Liquid 5.4) says where we match.

What differs from a plain ``liquid.Environment``:
- Keywords after a dot are property names, as in Ruby: ``event.attributes.limit``,
  ``x.offset``, ``x.in``, ``x.empty``, ``x.nil``, ... (python-liquid has no option for this; the
  expression token stream is rewritten: a keyword token right after ``.`` becomes a word).
- ``round`` rounds half away from zero on the decimal value (``12.5`` -> 13, ``1.005|round:2``
  -> 1.01), and values print as Ruby prints them: hashes as ``{"a"=>1, "b"=>nil}``, arrays
  joined flat, floats as ``1.0e+20``.
- Filters are exactly Ruby Liquid 5.4's standard filters, Braze's documented ones that a webhook
  body uses (``json_escape``, ``url_escape``, ``url_param_escape``, ``property_accessor``,
  ``number_with_delimiter``, ``md5``, ``sha1``, ``sha2``, ``hmac_sha1_hex``/``hmac_sha1``,
  ``hmac_sha1_base64``, ``hmac_sha256_hex``, ``hmac_sha256_base64``) and ``json``, which prints
  any value as a JSON literal so a value can never break out of a JSON body. python-liquid's own
  extras are removed (see ``REJECTED_FILTERS`` / ``REJECTED_TAGS``).
- Limits (issue 14), each exceeded one a ``liquid.exceptions.ResourceLimitError``:
  10,000 loop iterations per render, 1 MiB of output, 30 nested blocks, 30 nested contexts,
  1 MiB of local variables (``assign``/``capture``), and per filter call an integer of at
  most 4,096 bits and a string of at most 1 MiB (a ``replace`` checked before it runs).

This module must never do I/O: no include/render partials, no ``now`` beyond what the date
filter does.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import inspect
import json
import math
import re
from collections.abc import Iterator, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar, TextIO
from urllib.parse import quote

from liquid import BoundTemplate, Environment, RenderContext
from liquid.ast import BlockNode, Node
from liquid.builtin.expressions import Filter, FilteredExpression, KeywordArgument, PositionalArgument
from liquid.builtin.expressions import tokenize as _liquid_tokenize
from liquid.builtin.output import Output, OutputNode
from liquid.builtin.tags.echo_tag import EchoNode, EchoTag
from liquid.builtin.tags.liquid_tag import LiquidTag
from liquid.exceptions import LiquidError, LiquidSyntaxError, ResourceLimitError
from liquid.filter import math_filter, num_arg
from liquid.parser import get_parser
from liquid.span import Span
from liquid.stream import TokenStream
from liquid.token import TOKEN_DOT, TOKEN_EXPRESSION, TOKEN_OUTPUT, TOKEN_TAG, TOKEN_WORD, Token
from liquid.undefined import Undefined, is_undefined

__all__ = ["ENV", "REJECTED_FILTERS", "REJECTED_TAGS", "LiquidError", "RelayEnvironment", "parse",
           "template_problems", "to_ruby_string"]

# Words python-liquid tokenizes as keywords; Ruby reads each as a property name after a dot.
_KEYWORDS = frozenset({
    "limit", "offset", "in", "for", "with", "as", "not", "if", "else", "and", "or", "contains",
    "empty", "blank", "nil", "null", "true", "false", "reversed", "continue", "cols", "required",
})

REJECTED_FILTERS = frozenset({
    # python-liquid only (not in Ruby Liquid 5.4 nor Braze): rendering them would differ from Braze.
    "escapejs", "safe", "squish", "find", "find_index", "has", "reject", "sum",
})
REJECTED_TAGS = {
    "doc": "is python-liquid only, not Braze/Ruby Liquid",
    "include": "is not supported: Braze has no partials, the relay no template files",
    "render": "is not supported: Braze has no partials, the relay no template files",
}


def _tokenize(source: str, parent_token: Token) -> Iterator[Token]:
    """python-liquid's expression tokens, with a keyword right after ``.`` read as a word."""
    previous = ""
    for token in _liquid_tokenize(source, parent_token):
        if previous == TOKEN_DOT and token.kind in _KEYWORDS and token.value in _KEYWORDS:
            token = Token(TOKEN_WORD, token.value, token.start_index, token.source)
        previous = token.kind
        yield token


class _RubyTokenStream(TokenStream):
    def into_inner(self, *, tag: Token | None = None, eat: bool = True) -> TokenStream:
        token = self.current
        if token.kind != TOKEN_EXPRESSION:
            raise LiquidSyntaxError("missing expression", token=tag or token)
        if eat:
            next(self)
        return _RubyTokenStream(_tokenize(token.value, parent_token=token))


# --- printing values as Ruby does -------------------------------------------------------------

_RUBY_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\f": "\\f",
                 "\v": "\\v", "\b": "\\b", "\a": "\\a", "\x1b": "\\e"}


def _ruby_float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _ruby_inspect(value: object) -> str:
    """Ruby's ``inspect`` of a JSON-like value (what ``Hash#to_s`` prints for its items)."""
    if value is None or is_undefined(value):
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return _ruby_float(value)
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, str):
        out = []
        for i, char in enumerate(value):
            if char == "#" and value[i + 1:i + 2] in ("{", "$", "@"):
                out.append("\\#")
            elif char in _RUBY_ESCAPES:
                out.append(_RUBY_ESCAPES[char])
            elif ord(char) < 0x20 or ord(char) == 0x7F:
                out.append(f"\\u{ord(char):04X}" if ord(char) != 0x7F else "\\x7F")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_ruby_inspect(k)}=>{_ruby_inspect(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_ruby_inspect(item) for item in value) + "]"
    return str(value)


def to_ruby_string(value: object) -> str:
    """What Ruby Liquid's ``{{ value }}`` prints: nil empty, arrays joined flat, hashes inspected."""
    if value is None or isinstance(value, Undefined):
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return _ruby_float(value)
    if isinstance(value, Mapping):
        return _ruby_inspect(value)
    if isinstance(value, (list, tuple)):
        return "".join(to_ruby_string(item) for item in value)
    return str(value)


class _RubyOutputNode(OutputNode):
    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        return buffer.write(to_ruby_string(self.expression.evaluate(context)))

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        return buffer.write(to_ruby_string(await self.expression.evaluate_async(context)))


class _RubyEchoNode(EchoNode):
    render_to_output = _RubyOutputNode.render_to_output
    render_to_output_async = _RubyOutputNode.render_to_output_async


class _Output(Output):
    node_class = _RubyOutputNode

    def parse(self, stream: TokenStream) -> OutputNode:
        from liquid.builtin.expressions import FilteredExpression

        token = stream.eat(TOKEN_OUTPUT)
        expr_token = stream.expect(TOKEN_EXPRESSION)
        expression = FilteredExpression.parse(
            self.env, _RubyTokenStream(_tokenize(expr_token.value, expr_token)))
        return self.node_class(token, expression)


class _Echo(EchoTag):
    node_class = _RubyEchoNode


class _Liquid(LiquidTag):
    """``{% liquid %}`` whose lines are read with the same Ruby token rules as everything else."""

    def parse(self, stream: TokenStream) -> Node:
        token = stream.eat(TOKEN_TAG)
        if stream.current.kind != TOKEN_EXPRESSION:  # an empty {% liquid %} renders nothing
            stream.pos -= 1  # the parser steps past the tag's last token: here the tag itself
            return self.node_class(token, None, block=BlockNode(token, []))
        expression = stream.current
        inner = _RubyTokenStream(self._tokenize(expression.value, token=expression),
                                 block_depth_carry=stream.block_depth)
        return self.node_class(token, expression, block=get_parser(self.env).parse_block(inner, end=()))


# --- filters ----------------------------------------------------------------------------------

@math_filter
def _round(num: float | int, ndigits: object = 0) -> float | int:
    """Ruby's round: half away from zero, on the number's shortest decimal form."""
    digits = 0 if ndigits is None or is_undefined(ndigits) else int(num_arg(ndigits, default=0))
    if isinstance(num, int):
        return num
    if math.isnan(num) or math.isinf(num):
        raise LiquidError(f"cannot round {num}", token=None)
    rounded = Decimal(repr(num)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return int(rounded) if digits <= 0 else float(rounded)


def _json(value: object) -> str:
    """Any value as a JSON literal: strings quoted and escaped, nil/undefined as null."""
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _plain(value: object) -> object:
    if value is None or isinstance(value, Undefined):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _text(value: object) -> str:
    return to_ruby_string(value)


def _json_escape(value: object) -> str:
    """Braze ``json_escape``: the string escaped for use inside a JSON string (no quotes)."""
    return json.dumps(_text(value), ensure_ascii=False)[1:-1]


# Ruby URI::DEFAULT_PARSER.escape keeps these; Braze's url_escape is that.
_URI_SAFE = "-_.!~*'();/?:@&=+$,[]"


def _url_escape(value: object) -> str:
    return quote(_text(value), safe=_URI_SAFE)


def _url_param_escape(value: object) -> str:
    """Every character outside RFC 3986's unreserved set is escaped, ``&`` and space included."""
    return quote(_text(value), safe="-_.~")


def _property_accessor(value: object, key: object) -> object:
    if isinstance(value, Mapping):
        return value.get(_text(key))
    return None


def _number_with_delimiter(value: object) -> str:
    """Rails ``number_with_delimiter``: commas between thousands of the integer part."""
    text = _text(value)
    match = re.fullmatch(r"(-?)(\d+)(\.\d+)?", text)
    if match is None:
        return text
    sign, whole, fraction = match.groups()
    return f"{sign}{int(whole):,}{fraction or ''}"


def _digest(name: str) -> Any:
    def digest(value: object) -> str:
        return hashlib.new(name, _text(value).encode()).hexdigest()
    return digest


def _hmac(name: str, encoding: str) -> Any:
    def sign(value: object, key: object) -> str:
        mac = hmac.new(_text(key).encode(), _text(value).encode(), name).digest()
        return mac.hex() if encoding == "hex" else base64.b64encode(mac).decode()
    return sign


BRAZE_FILTERS: dict[str, Any] = {
    "json_escape": _json_escape,
    "url_escape": _url_escape,
    "url_param_escape": _url_param_escape,
    "property_accessor": _property_accessor,
    "number_with_delimiter": _number_with_delimiter,
    "md5": _digest("md5"),
    "sha1": _digest("sha1"),
    "sha2": _digest("sha256"),
    "hmac_sha1": _hmac("sha1", "hex"),
    "hmac_sha1_hex": _hmac("sha1", "hex"),
    "hmac_sha1_base64": _hmac("sha1", "base64"),
    "hmac_sha256_hex": _hmac("sha256", "hex"),
    "hmac_sha256_base64": _hmac("sha256", "base64"),
}


MAX_NUMBER_BITS = 4096   # a filter's integer result past this is refused (~1,233 digits)
# Filters whose one call can grow a string by a product (``replace`` of every character):
# their result's length is worked out before they run.
_REPLACING = frozenset({"replace", "replace_first", "replace_last"})
# String filters whose arguments Ruby Liquid turns into strings with ``to_s``, where nil is
# "" (python-liquid's str() made it "None": ``replace: ",", nil`` gave "aNoneb", not "ab")
_NIL_IS_EMPTY = _REPLACING | frozenset({"append", "prepend", "remove", "remove_first",
                                        "remove_last"})


def _bounded(name: str, func: Any, limit: int) -> Any:
    """``func`` (a filter) refusing, with a ResourceLimitError, a result no webhook needs and
    whose making stalls the event loop: an integer past MAX_NUMBER_BITS (squaring one 21
    times in a loop took 20 s, within the namespace limit, which counts characters only
    after an ``assign``), a string past ``limit`` (the output limit). A replace is refused
    before it builds its result (one call turned 1 MB into 100 GB). A nil argument of a
    string filter is "" (_NIL_IS_EMPTY), as in Ruby."""
    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name in _NIL_IS_EMPTY and None in args[1:]:
            args = (args[0], *("" if arg is None else arg for arg in args[1:]))
        if name in _REPLACING and len(args) >= 3:
            text, old, new = (to_ruby_string(a) for a in args[:3])
            grown = len(new) - len(old)
            times = (text.count(old) if old else len(text) + 1) if name == "replace" \
                else int(old in text)   # (once at most, and not at all when absent)
            if grown > 0 and len(text) + times * grown > limit:
                raise ResourceLimitError(f"{name} would make a string of more than {limit:,} "
                                         f"characters", token=None)
        result = func(*args, **kwargs)
        if type(result) is int and result.bit_length() > MAX_NUMBER_BITS:
            raise ResourceLimitError(f"{name} made a number of more than {MAX_NUMBER_BITS:,} "
                                     f"bits", token=None)
        if type(result) is str and len(result) > limit:
            raise ResourceLimitError(f"{name} made a string of more than {limit:,} characters",
                                     token=None)
        return result
    return bounded


class RelayEnvironment(Environment):
    """python-liquid speaking Ruby Liquid 5 / Braze, with resource limits (see module docstring)."""

    loop_iteration_limit: ClassVar[int | None] = 10_000
    output_stream_limit: ClassVar[int | None] = 1024 * 1024
    local_namespace_limit: ClassVar[int | None] = 1024 * 1024
    context_depth_limit: ClassVar[int] = 30
    block_nesting_limit: ClassVar[int] = 30

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=False)
        self.add_tag(_Output)
        self.add_tag(_Echo)
        self.add_tag(_Liquid)
        for name in REJECTED_TAGS:
            self.tags.pop(name, None)
        for name in REJECTED_FILTERS:
            self.filters.pop(name, None)
        self.add_filter("round", _round)
        self.add_filter("json", _json)
        for name, func in BRAZE_FILTERS.items():
            self.add_filter(name, func)
        limit = self.output_stream_limit or 1024 * 1024
        for name, func in list(self.filters.items()):
            self.filters[name] = _bounded(name, func, limit)

    def _parse(self, source: str) -> list[Node]:
        return get_parser(self).parse(_RubyTokenStream(self.tokenizer()(source)))


ENV = RelayEnvironment()


def parse(source: str) -> BoundTemplate:
    """Load a template, refusing any problem ``template_problems`` finds (LiquidSyntaxError)."""
    template = ENV.from_string(source)
    problems = _filter_problems(template, source)
    if problems:
        raise LiquidSyntaxError("; ".join(problems), token=None)
    return template


def template_problems(source: str) -> list[str]:
    """What is wrong with a template before it renders: its syntax error, or each unknown
    filter and each filter call whose arguments the filter cannot take."""
    try:
        template = ENV.from_string(source)
    except LiquidError as exc:
        message = _first_line(exc)
        for tag, why in REJECTED_TAGS.items():
            if message in (f"unexpected tag '{tag}'", f"expected tag, found {tag}"):
                return [f"tag {tag!r} {why}"]
        return [message]
    return _filter_problems(template, source)


def _filter_problems(template: BoundTemplate, source: str) -> list[str]:
    problems = []
    for name, spans in sorted(template.analyze(include_partials=False).filters.items()):
        if name in ENV.filters:
            continue
        line, col = spans[0].line_col(source)
        why = ("is python-liquid only, not Braze/Ruby Liquid" if name in REJECTED_FILTERS
               else "is not a known filter")
        problems.append(f"filter {name!r} (line {line}, column {col + 1}) {why}")
    for call in sorted(_filter_calls(template), key=lambda call: call.token.start_index):
        takes = _wrong_arguments(call) if call.name in ENV.filters else None
        if takes is not None:
            line, col = Span(template.name, call.token.start_index).line_col(source)
            problems.append(f"filter {call.name!r} (line {line}, column {col + 1}) {takes}")
    return problems


def _filter_calls(template: BoundTemplate) -> Iterator[Filter]:
    """Every filter call in ``template``, in the blocks of its tags too."""
    context = RenderContext(template)
    nodes = list(template.nodes)
    while nodes:
        node = nodes.pop()
        expressions = list(node.expressions())
        while expressions:
            expression = expressions.pop()
            if isinstance(expression, FilteredExpression):
                yield from expression.filters or ()
            expressions += expression.children()
        nodes += node.children(context, include_partials=False)


def _wrong_arguments(call: Filter) -> str | None:
    """What ``call``'s filter takes, when the call's arguments cannot be passed to it: it would
    fail at every render (as Ruby Liquid's "wrong number of arguments" does)."""
    func = ENV.filters[call.name]
    signature = inspect.signature(func)   # (the filter's own, through _bounded's wrapping)
    given = [arg for arg in call.args if isinstance(arg, PositionalArgument)]
    named = [arg.name for arg in call.args if isinstance(arg, KeywordArgument)]
    # what the render context adds for a filter that asks for it (a call's own keyword of the
    # same name replaces it: RenderContext.filter)
    added = {name: None for name in ("context", "environment")
             if getattr(func, f"with_{name}", False)}
    try:
        signature.bind(None, *given, **{**added, **dict.fromkeys(named)})
        return None
    except TypeError:
        pass
    params = list(signature.parameters.values())[1:]   # (the first is the filtered value)
    by_position = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes = _arguments(sum(p.default is p.empty for p in by_position), len(by_position))
    by_name = [f"{p.name}:" for p in params if p.kind is p.KEYWORD_ONLY and p.name not in added]
    if by_name:
        takes += f", and {', '.join(by_name)} by name"
    got = ", ".join([str(len(given)) if given else "none", *(f"{name}:" for name in named)])
    return f"takes {takes} (got {got})"


def _arguments(least: int, most: int) -> str:
    """``least`` to ``most`` arguments, in words."""
    if most == 0:
        return "no arguments"
    counted = f"{most} argument{'s' if most > 1 else ''}"
    if least == most:
        return counted
    if least == 0:
        return f"at most {counted}"
    return f"{least} {'or' if most == least + 1 else 'to'} {most} arguments"


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
