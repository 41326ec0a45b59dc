r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, in time bounded by the key and the path.

PEFT gives a module the value of the first key with
``re.match(rf"(.*\.)?({key})$", path)``. Python's backtracking ``re`` takes
exponential time on some keys (``(a+)+$`` against a 30-character path: 36 s), and
the keys come from an adapter file, which may come from anyone. Here every key
gets ``re``'s answer, in time polynomial in the sizes of key and path:

* A key without repetition or alternation (a module path or a suffix of one, like
  the ``^`` + ``re.escape(path)`` keys :func:`hqqlora.save_adapter` writes) goes to
  ``re`` itself: the only thing left to backtrack into is the ``(.*\.)?`` prefix, so
  it costs O(len(path) · len(key)).
* Any other key is parsed by ``re``'s own parser into a Thompson NFA and run over
  the path by Pike's simulation (without captures): O(len(path) · size(key)). For
  regular constructs whether a match exists does not depend on how it is searched,
  so the answer is ``re``'s.

Keys an NFA cannot decide (backreferences, lookarounds, atomic groups, possessive
repeats, conditional groups), scoped flags such as ``(?i:...)``, and keys whose
expansion exceeds :data:`MAX_STATES` states (``(a{1000}){1000}``) are refused with
a ``ValueError`` naming the key, as are keys ``re`` itself cannot compile.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias, cast

if sys.version_info >= (3, 11):
    from re import _constants as _c
    from re import _parser
else:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _parser

__all__ = ["MAX_STATES", "compile_pattern", "pattern_value"]

MAX_STATES = 2000  # NFA states per key; PEFT's and users' keys need a few dozen

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_PLAIN = (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN, _c.AT)
_ALLOWED_FLAGS = _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_VERBOSE  # VERBOSE only acts while parsing
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,  # what re's \d tests on str patterns
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}


# NFA instructions: (_CHAR, test), (_SPLIT, a, b), (_JMP, to), (_ASSERT, at), (_MATCH,);
# None marks a hole that _emit fills once its target is known.
_Program: TypeAlias = list[Any]
_CharTest: TypeAlias = Callable[[str], bool]


class _Refused(Exception):
    """A construct the NFA cannot evaluate; carries the reason."""


def compile_pattern(key: str, *, field: str = "pattern") -> Callable[[str], bool]:
    r"""A function ``path -> bool`` equal to ``re.match(rf"(.*\.)?({key})$", path) is not None``.

    Args:
        key: a ``rank_pattern`` / ``alpha_pattern`` key.
        field: how to name the mapping in error messages.

    Returns:
        The matcher; each call takes time O(len(path) · len(key)).

    Raises:
        ValueError: ``key`` is not a valid pattern for PEFT's lookup, or uses a
            construct whose match cannot be decided in bounded time.
    """
    wrapped = rf"(.*\.)?({key})$"
    try:
        parsed = _parser.parse(wrapped)
    except re.error as e:
        raise ValueError(
            f"Expected `{field}` keys to be valid regular expressions, got {key!r}: {e}."
        ) from e
    try:
        alone = _parser.parse(key)
    except re.error:
        alone = None  # e.g. "a)(b": valid only inside PEFT's wrapper; the NFA decides it
    if alone is not None and alone.state.flags & ~_ALLOWED_FLAGS == 0 and _is_plain(alone):
        compiled = re.compile(wrapped)
        return lambda path: compiled.match(path) is not None
    try:
        if parsed.state.flags & ~_ALLOWED_FLAGS:
            raise _Refused("flags")
        size = _size(parsed)
        if size > MAX_STATES:
            raise _Refused(f"an expansion of {size} states (at most {MAX_STATES})")
        program: _Program = []
        _emit(parsed, program)
        program.append((_MATCH,))
    except _Refused as e:
        raise ValueError(
            f"Expected `{field}` keys that can be matched in bounded time (no backreferences, "
            f"lookarounds, atomic groups, possessive repeats or flags), got {key!r}, which uses {e}."
        ) from None
    return lambda path: _run(program, path)


def pattern_value(
    matchers: Mapping[str, tuple[Callable[[str], bool], Any]], path: str, default: Any
) -> Any:
    """PEFT's lookup: the value of the first key whose matcher accepts ``path``.

    With no such key PEFT falls back to ``pattern.get(path, default)``; so does this.
    """
    for matches, value in matchers.values():
        if matches(path):
            return value
    return matchers[path][1] if path in matchers else default


def _is_plain(items: Any) -> bool:
    """Only single characters and anchors, possibly in flagless groups: nothing to backtrack."""
    for op, av in items:
        if op is _c.SUBPATTERN:
            if av[1] or av[2] or not _is_plain(av[3]):
                return False
        elif op not in _PLAIN:
            return False
    return True


def _size(items: Any) -> int:
    total = 0
    for op, av in items:
        if op is _c.BRANCH:
            total += sum(_size(alt) + 2 for alt in av[1])
        elif op is _c.SUBPATTERN:
            total += _size(av[3])
        elif op in _REPEATS:
            low, high, body = av
            size = _size(body) + 1
            total += size * (low + 1) if high is _c.MAXREPEAT else size * high
        else:
            total += 1
        if total > MAX_STATES:  # stop before multiplying out a huge nesting
            return total
    return total


def _char_test(op: Any, av: Any) -> Callable[[str], bool]:
    if op is _c.LITERAL:
        char = chr(av)
        return lambda ch: ch == char
    if op is _c.NOT_LITERAL:
        char = chr(av)
        return lambda ch: ch != char
    if op is _c.ANY:
        return lambda ch: ch != "\n"  # no DOTALL
    negate = False
    tests: list[Callable[[str], bool]] = []
    for item, value in av:  # op is IN: a character class
        if item is _c.NEGATE:
            negate = True
        elif item is _c.LITERAL:
            tests.append(cast(_CharTest, lambda ch, code=value: ord(ch) == code))
        elif item is _c.RANGE:
            tests.append(cast(_CharTest, lambda ch, lo=value[0], hi=value[1]: lo <= ord(ch) <= hi))
        elif item is _c.CATEGORY and value in _CATEGORIES:
            tests.append(_CATEGORIES[value])
        else:
            raise _Refused(f"the class item {item}")
    return lambda ch: any(t(ch) for t in tests) != negate


def _emit(items: Any, program: _Program) -> None:
    """Appends the NFA of ``items``; holes are filled once their targets are known."""
    for op, av in items:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            program.append((_CHAR, _char_test(op, av)))
        elif op is _c.AT:
            program.append((_ASSERT, av))
        elif op is _c.SUBPATTERN:
            if (av[1] | av[2]) & ~_c.SRE_FLAG_VERBOSE:
                raise _Refused("scoped flags")
            _emit(av[3], program)
        elif op is _c.BRANCH:
            ends = []
            alternatives = av[1]
            for alt in alternatives[:-1]:
                split = len(program)
                program.append(None)
                _emit(alt, program)
                ends.append(len(program))
                program.append(None)
                program[split] = (_SPLIT, split + 1, len(program))
            _emit(alternatives[-1], program)
            for end in ends:
                program[end] = (_JMP, len(program))
        elif op in _REPEATS:  # greedy or lazy: the same language, the same answer
            low, high, body = av
            for _ in range(low):
                _emit(body, program)
            if high is _c.MAXREPEAT:
                loop = len(program)
                program.append(None)
                _emit(body, program)
                program.append((_JMP, loop))
                program[loop] = (_SPLIT, loop + 1, len(program))
            else:
                holes = []
                for _ in range(high - low):
                    holes.append(len(program))
                    program.append(None)
                    _emit(body, program)
                for hole in holes:
                    program[hole] = (_SPLIT, hole + 1, len(program))
        else:
            raise _Refused(str(op).lower())


def _is_word(path: str, i: int) -> bool:
    return 0 <= i < len(path) and (path[i].isalnum() or path[i] == "_")


def _holds(at: Any, path: str, i: int) -> bool:
    n = len(path)
    if at in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        return i == 0
    if at is _c.AT_END:  # end, or just before a final newline
        return i == n or (i == n - 1 and path[i] == "\n")
    if at is _c.AT_END_STRING:
        return i == n
    if at is _c.AT_BOUNDARY:
        return n > 0 and _is_word(path, i - 1) != _is_word(path, i)
    if at is _c.AT_NON_BOUNDARY:
        return n > 0 and _is_word(path, i - 1) == _is_word(path, i)
    raise _Refused(str(at).lower())  # pragma: no cover - the parser makes no others


def _closure(program: _Program, starts: list[int], path: str, i: int) -> tuple[list[int], bool]:
    """The character-reading states reachable from ``starts`` at position ``i``, and whether MATCH is."""
    seen: set[int] = set()
    reading: list[int] = []
    stack, matched = list(reversed(starts)), False
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        kind = program[pc][0]
        if kind is _CHAR:
            reading.append(pc)
        elif kind is _SPLIT:
            stack.extend((program[pc][2], program[pc][1]))
        elif kind is _JMP:
            stack.append(program[pc][1])
        elif kind is _ASSERT:
            if _holds(program[pc][1], path, i):
                stack.append(pc + 1)
        else:
            matched = True
    return reading, matched


def _run(program: _Program, path: str) -> bool:
    """Pike's simulation: does some prefix of ``path`` match (``re.match``'s question)?"""
    states, matched = _closure(program, [0], path, 0)
    for i, ch in enumerate(path):
        if matched:
            return True
        following = [pc + 1 for pc in states if program[pc][1](ch)]
        if not following:
            return False
        states, matched = _closure(program, following, path, i + 1)
    return matched
