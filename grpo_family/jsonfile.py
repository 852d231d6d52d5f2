"""
jsonfile.py: the one reader of JSON for every file a run or a tool reads (data, checkpoints' settings, logs, a
tokenizer's config), with a size and a depth bound, so that no file, however crafted, is a traceback or a hang:

    JSONError   what cannot be read, as one line naming the file (and line) and why; callers add the fix
    loads       one JSON document from a string (a file's text, or one line of a jsonl file)
    load        one JSON document from a file

Python's own reader recurses once per nesting level and raises RecursionError past about a thousand, and it reads
any size; a file here is refused past MAX_CHARS characters or MAX_DEPTH levels instead.
"""
import json
import re

MAX_CHARS = 64 * 2**20  # a JSON document larger than this is not one this project wrote or reads
MAX_DEPTH = 100         # nesting levels: this project's files use 3 or 4
# a string (skipped whole; an unterminated one runs to the end, so no match fails and the scan stays linear) or a
# bracket
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


class JSONError(ValueError):
    """A JSON document that cannot be read: malformed, too large, too deep or not UTF-8 text."""


def _depth(text):
    """The deepest nesting of brackets outside strings (a linear scan in C, strings skipped as one match)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        c = m.group(0)
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def loads(text, where):
    """The value of the JSON document `text`; `where` ('file' or 'file:line') names it in a JSONError."""
    if len(text) > MAX_CHARS:
        raise JSONError(f"{where}: over {MAX_CHARS} characters, larger than any JSON this project reads")
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise JSONError(f"{where}: nested deeper than {MAX_DEPTH} levels, deeper than any JSON this project reads")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONError(f"{where}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None


def load(path):
    """The value of the JSON file at `path` (read as UTF-8, at most MAX_CHARS characters)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CHARS + 1)
    except UnicodeDecodeError as e:
        raise JSONError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads(text, path)
