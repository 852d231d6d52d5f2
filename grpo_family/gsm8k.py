"""
gsm8k.py: the GSM8K task, as nanochat keeps tasks/gsm8k.py: loading, prompts, answers, rewards.

    load_gsm8k, read_jsonl,         problems [{question, answer}] from local jsonl or the hub, every
    check_problems, DataError       row checked; a bad file is one line naming file:line and the fix
    quiet_hub                       a hub load without the client's retry chatter (its failure: one line)
    build_prompt                    the chat-templated prompt of one question
    Number, parse_number,           numbers read exactly in linear time: the first after the last '####'
    extract_answer,                 (strict), the last anywhere (lenient); what cannot be read exactly is
    extract_last_number             no match, never a different number
    correctness_reward,             the reward terms: '####' answer right, last line well formed,
    format_reward, lenient_correct  last number right
    reference_answer                a problem's reference answer, read from its '#### N' line
"""
import contextlib
import logging
import os
import re
import unicodedata
from fractions import Fraction

from grpo_family import jsonfile

SYSTEM_PROMPT = ("Solve the math problem step by step. "
                 "On the last line write the final answer as '#### <number>'.")
GSM8K_HUB = "openai/gsm8k"

class DataError(ValueError):
    """A missing, unreadable or malformed data file: one line naming the file, the line and the fix."""


# -----------------------------------------------------------------------------
# data


@contextlib.contextmanager
def quiet_hub():
    """The Hugging Face hub client's warnings off stderr for a load: offline it logs ten lines of retries over ~25 s
    before it gives up, and the caller's one-line error says what failed and what to pass instead."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def load_gsm8k(split, data_path=""):
    """GSM8K problems [{question, answer}] from a local jsonl file, a dir with <split>.jsonl, or the hub."""
    if not data_path:
        from datasets import load_dataset  # imported here: only the hub needs `datasets`
        try:
            with quiet_hub():
                rows = load_dataset(GSM8K_HUB, "main", split=split)
        except (ConnectionError, OSError) as e:  # no network (after the hub client's retries), or no such dataset
            raise DataError(f"cannot load GSM8K ({GSM8K_HUB}) from the Hugging Face hub ({type(e).__name__}): without a "
                            "network give --data_path=<a dir with train.jsonl and test.jsonl> and a local --model, "
                            "or run --tiny") from None
        return check_problems([(f"{GSM8K_HUB} {split} row {i}", dict(r)) for i, r in enumerate(rows, 1)], GSM8K_HUB)
    path = os.path.expanduser(data_path)
    if os.path.isdir(path):
        path = os.path.join(path, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"GSM8K {split} file {path} does not exist: give a jsonl file, or a dir with {split}.jsonl")
    return check_problems(read_jsonl(path), path)


def read_jsonl(path):
    """[(where, row)] of the non-blank lines of a jsonl file, where = 'file:line' (1-based)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{n}", jsonfile.loads(line, f"{path}:{n}")))
                except jsonfile.JSONError as e:
                    raise DataError(f"{e}; each line must be one JSON object such as "
                                    '{"question": "...", "answer": "... #### 18"}') from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    return rows


def check_problems(rows, source):
    """The problems of [(where, row)], each checked: a JSON object with string 'question' and 'answer', the
    answer ending in a readable '#### <number>'. Raises DataError naming the row and what is wrong."""
    if not rows:
        raise DataError(f"{source} holds no problems (it is empty)")
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
        for key in ("question", "answer"):
            if key not in row:
                raise DataError(f"{where}: no {key!r} field (it has {', '.join(map(repr, row)) or 'none'})")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {row[key]!r:.40}")
        if extract_answer(row["answer"]) is None:
            raise DataError(f"{where}: the answer has no readable '#### <number>' line: ...{row['answer'][-60:]!r}")
    return [row for _, row in rows]


def build_prompt(tok, question, system_prompt=SYSTEM_PROMPT):
    """The chat-templated prompt string for one question (system message omitted if empty)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": question})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -----------------------------------------------------------------------------
# answers: exact numbers, read in linear time; a number that cannot be read exactly is no number
#
# The grammar: an optional sign ('-' or the Unicode minus U+2212), an optional '$' and one space, then
# a decimal with ASCII digits (thousands commas in groups of three, a decimal point, an exponent such
# as 1e5 or 2.5e3), or a fraction 3/4, or a mixed number 3 1/2. Every part allows at most one space,
# so no match can run over a whitespace run: each reader below is linear in the text's length.
# Anything a careful grader could read two ways is no match, never a different number: a number
# glued to more digits by spaces or invisible characters ('1 234', '1\u200b234'), badly grouped
# commas ('12,34'), a version-like '1.5.3', non-ASCII digits (Arabic-Indic, full-width), and one
# rule for the rest: a punctuation, symbol or mark character between two digits that the grammar
# does not read ('1\uff0c500', '1\u066b5', '1\u22152', '2^10', '3+4'), blanks beside it or not
# ('1, 500', '3 + 4'), makes the number unreadable, never cut short, and so does a minus or a leading
# point before the number past such characters ('-\uff0c3', '.\u200b5'); only letters, blanks and
# _SEPARATORS ('3+1=4' reads 4) part two numbers, and '#', the answer's marker, when a blank follows it.

# Each pattern consumes a whole run of digits before it branches, so a failing branch never re-scans the run.
_EXP, _GROUPS = r"(?:[eE][-+]?\d+)?", r"(?:,\d+)*"
_TOKEN = re.compile(r"(?P<sign>[-\u2212])?\$? ?(?:(?P<first>\d+)(?: (?P<num>\d+) ?/ ?(?P<den>\d+)"
                    r"|(?P<rest>" + _GROUPS + r"(?:\.\d+)?" + _EXP + r"))|(?P<point>\.\d+" + _EXP + r"))"
                    r"(?: ?/ ?(?P<div>\d+" + _GROUPS + r"))?")
_DIGIT = re.compile(r"\d")  # a one-character class: re scans for it in C, so finding a number is linear
_RMANT = r"(?:\.(?:\d+" + _GROUPS + r")?|" + _GROUPS + r")"  # the rest of a mantissa, read backwards
_RDEC = r"(?:[-+]?[eE]\d+" + _RMANT + r"|" + _RMANT + r")"    # the rest of a decimal, read backwards
_RTOKEN = re.compile(r"\d+(?: ?/ ?\d+ \d+|" + _GROUPS + r" ?/ ?\d+" + _RDEC + r"|" + _RDEC + r") ?\$?[-\u2212]?")
_BLANK = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
          "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"  # every character str.isspace() accepts
          "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff")  # and invisible ones
_SKIP = re.compile("[" + _BLANK + "]*")
_SEPARATORS = "=<>()[]{}\u2248\u2260\u2264\u2265"  # between two digits these keep the numbers apart ('3+1=4': 4)
_SPACE = re.compile(r"\s")


def _glue(c):
    """True for a character that, between two digits, makes one number that the grammar does not read: a separator
    look-alike ('1\uff0c500', '1\u066b5', '1\u22152'), an operator ('2^10', '3+4'), a mark. The number is then
    unreadable, never cut short. Letters, blanks and _SEPARATORS part two numbers."""
    kind = unicodedata.category(c) if c else "Cn"
    return bool(c) and not (kind in ("Lu", "Ll", "Lt", "Lo") or kind[0] == "N" or c in _BLANK or c in _SEPARATORS)


def _glued(chars):
    """True if `chars` open with one to four _glue characters and then a digit ('\uff0c5', '**1'), or with glue and
    blanks mixed, at most 8 and at least one glue, and then a digit ('\uff0c 5', ', 500', '+ 4', '/  4'): one number
    that the grammar does not read. A '#' (the answer's marker) joins only when it touches: '7 ### 18' reads 18."""
    n = next((i for i, c in enumerate(chars[:5]) if not _glue(c)), 5)
    if 0 < n < min(5, len(chars)) and chars[n].isnumeric():
        return True
    k = next((i for i, c in enumerate(chars[:9]) if not (c in _BLANK or _glue(c) and c != "#")), min(9, len(chars)))
    return k < len(chars) and chars[k].isnumeric() and any(_glue(c) for c in chars[:k])


_DASHES = "\u2212\u2796\u02d7\u207b\u208b"  # minus signs outside Unicode's dash punctuation (category Pd)


def _dash_before(text, start, first):
    """True if a dash-like character stands before the number at text[start] (its digits at `first`), past blanks,
    invisible characters, marks, glue and a '$' ('\u2013 3', '-\u00a03', '-\ufe0f3', '-\uff0c3'), or a decimal point
    past all those but a space ('.\u200b5' is not 5; 'total. 5' is): a sign or a point the grammar does not read, so
    the number is unreadable, never unsigned or ten times too large. A '#', the answer's marker, ends the walk ('---'
    above '#### 18' is no sign). More than 64 other invisible characters in a row count as such a sign too
    (unreadable; the walk stays short)."""
    head = text[:start].rstrip(_BLANK + "$")
    spaced = _SPACE.search(text, len(head), first) is not None
    for i in range(len(head) - 1, max(-1, len(head) - 66), -1):
        c, kind = head[i], unicodedata.category(head[i])
        if c in _DASHES or kind == "Pd" or c == "." and not spaced:
            return True
        if c == "#":
            return False
        spaced = spaced or c.isspace()
        if c != "$" and kind not in ("Zs", "Cf", "Cc", "Mn", "Me") and not _glue(c):  # '-\ufe0f3', '-\uff0c3'
            return False
    return len(head) > 65


_MAX_DIGITS = 4000  # fractions are computed exactly only below this size
_MAX_NUMBER = 10_000  # characters: a longer number is no match, so each regex reads a bounded window and the work
_NEAR = 64            # per completion is flat in its length (beyond C-speed scans such as finding a digit);
                      # blanks past _NEAR characters separate two numbers


class Number:
    """An exactly read number. A terminating decimal is kept as (sign, significant digits, power of
    ten), never converted to an int, so equal million-digit answers compare equal in linear time; any
    other rational is a Fraction. Numbers compare equal to equal Numbers, ints and Fractions."""

    def __init__(self, key):
        self.key = key  # ("dec", negative, digits, exponent) or ("frac", Fraction)

    @staticmethod
    def of(x):
        """The Number of an int or a Fraction (a terminating one becomes a decimal key)."""
        x = Fraction(x)
        q, twos, fives = x.denominator, 0, 0
        while q % 2 == 0:
            q, twos = q // 2, twos + 1
        while q % 5 == 0:
            q, fives = q // 5, fives + 1
        if q != 1:
            return Number(("frac", x))
        k = max(twos, fives)
        return Number.decimal(x < 0, str(abs(x.numerator) * 10 ** k // x.denominator), -k)

    @staticmethod
    def decimal(negative, digits, exponent):
        """sign * int(digits) * 10**exponent, with leading and trailing zeros moved out of the digits."""
        digits = digits.lstrip("0")
        trimmed = digits.rstrip("0")
        if not trimmed:
            return Number(("dec", False, "", 0))
        return Number(("dec", negative, trimmed, exponent + len(digits) - len(trimmed)))

    def fraction(self):
        """The value as a Fraction, or None when it is too large to build cheaply."""
        if self.key[0] == "frac":
            return self.key[1]
        _, negative, digits, exp = self.key
        if len(digits) + abs(exp) > _MAX_DIGITS:
            return None
        value = Fraction(int(digits or "0")) * Fraction(10) ** exp
        return -value if negative else value

    def __eq__(self, other):
        if isinstance(other, (int, Fraction)) and not isinstance(other, bool):
            other = Number.of(other)
        return isinstance(other, Number) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"Number({self})"

    def __str__(self):
        """'18', '-3', '5/2', '1/3' as a Fraction prints; very long decimals in scientific notation."""
        if self.key[0] == "dec" and len(self.key[2]) + abs(self.key[3]) > 60:
            _, negative, digits, exp = self.key
            return f"{'-' if negative else ''}{digits[0]}.{digits[1:] or '0'}e{exp + len(digits) - 1:+d}"
        return str(self.fraction())


def _read(m, text):
    """The Number a _TOKEN match reads exactly, or None (bad grouping, non-ASCII digits, ambiguity)."""
    body = m.group(0)
    if not body.isascii() and any(c.isdigit() and not c.isascii() for c in body):
        return None  # \d also matches Arabic-Indic and full-width digits; those are not read
    if m.end() - m.start() > _MAX_NUMBER:
        return None  # longer than any answer (the window may have cut it): unreadable
    after = _SKIP.match(text, m.end(), m.end() + _NEAR).end()
    joined = _glued(text[after:after + 9])
    if after < len(text) and (text[after].isnumeric() or joined):
        return None  # '1 234', '1\u200b234', '1.5.3', '3/4/5', '1_000', '3\u00bd', '1\uff0c500', '2^10': more follows
    before = text[max(0, m.start() - _NEAR):m.start()].rstrip(_BLANK)[-9:]
    if before[-1:].isnumeric() or _glued(before[::-1]):
        return None  # '1 234' or '1\uff0c500' read from its second group
    latex = text[max(0, m.start() - 2):m.start()] == "}{" or text[m.end():m.end() + 2] == "}{"
    first = m.start("first") if m.group("first") is not None else m.start("point")
    if _dash_before(text, m.start(), first) or latex:
        return None  # an unread minus ('\u2013 3', '-\u00a03'), or LaTeX's \frac{3}{4} read as 3 or 4
    negative = m.group("sign") is not None
    if m.group("num") is not None:  # a mixed number a b/c, with b < c
        whole, num, den = (int(m.group(k)) if len(m.group(k)) <= _MAX_DIGITS else None for k in ("first", "num", "den"))
        if None in (whole, num, den) or not 0 < num < den or m.group("div") is not None:
            return None
        value = whole + Fraction(num, den)
        return Number.of(-value if negative else value)
    dec = m.group("point") or m.group("first") + m.group("rest")
    mant, _, exp = dec.lower().partition("e")
    intpart, _, fracpart = mant.partition(".")
    groups = intpart.split(",")
    if len(groups) > 1 and (not 1 <= len(groups[0]) <= 3 or any(len(g) != 3 for g in groups[1:])):
        return None  # commas must group thousands: '1,234', not '12,34'
    if len(exp) > 6:
        return None
    value = Number.decimal(negative, "".join(groups) + fracpart, int(exp or 0) - len(fracpart))
    if m.group("div") is None:
        return value
    div = m.group("div").replace(",", "")
    top = value.fraction()
    if top is None or len(div) > _MAX_DIGITS or int(div) == 0:
        return None
    return Number.of(top / int(div))


def parse_number(text):
    """The first number in `text`, read exactly (see the grammar above), or None."""
    d = _DIGIT.search(text)
    if d is None:
        return None
    p = d.start()  # a token starts at most 4 characters before its first digit ('-$ .5')
    m = next(m for s in range(max(0, p - 4), p + 1)
             if (m := _TOKEN.match(text, s, p + _MAX_NUMBER + _NEAR)) and m.end() > p)
    return _read(m, text)


def reference_answer(answer):
    """The reference's number: after its last '####', or the whole string if it is one bare number; else an error."""
    if not isinstance(answer, str):
        raise TypeError(f"a reference answer must be a string, got {type(answer).__name__}: {answer!r:.80}")
    value = extract_answer(answer) if "####" in answer else None
    if value is None and "####" not in answer:
        m = _TOKEN.fullmatch(answer.strip())
        value = _read(m, answer.strip()) if m else None
    if value is None:
        raise ValueError(f"reference answer {answer[-80:]!r} has no readable '#### <number>' line")
    return value


def extract_answer(text):
    """Strict: the first number after the last '####' (None if absent or unreadable)."""
    if not isinstance(text, str):
        raise TypeError(f"a completion must be a string, got {type(text).__name__}")
    if "####" not in text:
        return None
    return parse_number(text.rsplit("####", 1)[1])


def extract_last_number(text):
    """Lenient: the last number anywhere in the text (None if there is none, or it is unreadable)."""
    if not isinstance(text, str):
        raise TypeError(f"a completion must be a string, got {type(text).__name__}")
    rev = text[::-1]  # the last number is the first one of the reversed text
    d = _DIGIT.search(rev)
    if d is None:
        return None
    start = len(text) - _RTOKEN.match(rev, d.start(), d.start() + _MAX_NUMBER + _NEAR).end()
    end = len(text) - d.start()
    m = _TOKEN.match(text, start, end + _NEAR)
    return _read(m, text) if m is not None and m.end() == end else None


# -----------------------------------------------------------------------------
# rewards: each is fn(completion, reference answer) -> float


def correctness_reward(completion, answer):
    """1.0 if the '####' answer of the completion equals the reference answer exactly."""
    ref = reference_answer(answer)
    return float(extract_answer(completion) == ref)


def format_reward(completion, answer=None):
    """1.0 if the completion's last non-empty line is exactly '#### <number>', a number read exactly."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a string, got {type(completion).__name__}")
    stripped = completion.rstrip()
    line = stripped[stripped.rfind("\n") + 1:].strip()
    if not line.startswith("####"):
        return 0.0
    rest = line[4:].lstrip()
    m = _TOKEN.fullmatch(rest) if len(rest) <= _MAX_NUMBER else None
    return float(m is not None and _read(m, rest) is not None)


def lenient_correct(completion, answer):
    """1.0 if the last number in the completion equals the reference answer (any format)."""
    ref = reference_answer(answer)
    return float(extract_last_number(completion) == ref)
