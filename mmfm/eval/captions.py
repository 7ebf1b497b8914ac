"""Caption metrics: BLEU-1..4, CIDEr-D, ROUGE-L and exact match over several references per item.

Each metric gives the number the COCO caption evaluation (pycocoevalcap) gives on the same input:

- `ptb_tokenize`: the COCO tokenisation, Stanford CoreNLP 3.4.1's PTBTokenizer run with `-preserveLines
  -lowerCase`, then the COCO punctuation tokens dropped (pycocoevalcap's `PTBTokenizer`), in pure Python;
- `bleu`: corpus-level BLEU-1..4 with the closest reference length for the brevity penalty (`Bleu(4)`);
- `cider_d`: CIDEr-D, n-grams up to 4, idf from the references of the evaluated set, clipped candidate counts,
  a Gaussian length penalty (sigma 6), times 10 (`Cider()`);
- `rouge_l`: ROUGE-L F with beta 1.2 from the best LCS precision and recall over an item's references, averaged
  over items (`Rouge()`);
- `exact_match`: the share of predictions equal to one of their references after stripping surrounding spaces
  (what `mmfm eval` always reported; no tokenisation).

`references[i]` is one string or a list of strings. The scorers tokenise their input first unless told it is
already tokenised (`tokenize=False`: tokens joined by single spaces, as `ptb_tokenize` returns them);
`caption_metrics` tokenises once and returns every metric:

    from mmfm.eval.captions import caption_metrics
    caption_metrics(["A dog runs on the grass."], [["a dog running on grass", "A brown dog runs."]])
    # {'bleu_1': ..., 'bleu_2': ..., 'bleu_3': ..., 'bleu_4': ..., 'cider_d': ..., 'rouge_l': ..., 'exact_match': 0.0}

CIDEr-D's idf comes from the evaluated set, so it is a corpus number: scores of subsets do not average to it.

Known tokeniser divergences from the Java PTBTokenizer (rare in captions): a `\\r`, form feed, vertical tab or
Unicode line/paragraph separator inside a text is a space here, while the Java tokenizer starts a new line there
(which misaligns pycocoevalcap's own output); letters outside the Basic Multilingual Plane are dropped as
untokenisable by Java and kept here only if Python calls them letters; marks of non-Latin scripts (Arabic,
Indic) that Java's lexer lists one by one split a word here.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import chain

from mmfm.errors import InputError
from mmfm.eval.checks import check_lengths, reference_lists

MAX_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
# pycocoevalcap's PTBTokenizer drops these tokens after tokenising (before lower-casing, so "-lrb-" stays).
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-"])
PUNCTUATION |= {"--", "...", ";"}
# BLEU's guards against dividing by zero, as the reference scorer has them (they show in scores with no match).
_TINY, _SMALL = 1e-15, 1e-9

# --- PTB tokenisation ---------------------------------------------------------------------------------------
#
# The Java tokenizer is a JFlex lexer: at each position every rule is tried, the longest match wins (trailing
# context `r/t` counts towards the length but is left for the next token), and the earlier rule wins a tie. The
# table below is that lexer's rules as they act on text, written as Python regular expressions; `_Lexer` runs
# them the same way. The lexer is case-insensitive for literal words but not for character classes, hence the
# `(?i:...)` groups around literals only.


def _letter_class() -> str:
    """A character class of the Basic Multilingual Plane's letters (Java's `Character.isLetter`)."""
    ranges, start, prev = [], None, None
    for code in range(0x10000):
        if unicodedata.category(chr(code)).startswith("L"):
            if start is None:
                start = code
            prev = code
        elif start is not None:
            ranges.append((start, prev))
            start = None
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


_LETTERS = _letter_class()
LETTER = f"[{_LETTERS}]"
ALNUM = f"[{_LETTERS}0-9]"  # letters and ASCII digits (only digits that Python's \d shares with Java)
DIGIT = r"\d"
SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
SPACENL = r"[ \t\u00a0\u2000-\u200a\u3000\n]"
APOS = r"(?:['\u0092\u2019]|&apos;)"
APOSX = r"(?:['\u0091\u0092\u2018\u2019\u201b]|&apos;)"  # also the marks that turn up inside words
HYPHEN = r"[\-_\u058a\u2010\u2011]"
SGML = r"<\/?[A-Za-z!][^>]*>"
WORD_CHAR = rf"(?:{LETTER}|[\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f])"
WORD = rf"{WORD_CHAR}(?:{WORD_CHAR}|{DIGIT})*(?:[.!?]{WORD_CHAR}(?:{WORD_CHAR}|{DIGIT})*)*"  # "dog.The" is one
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"  # a word that can take "n't" (it cannot end in n)
SREDAUX = rf"(?i:n){APOSX}(?i:t)"
APOWORD = (
    rf"(?i:{APOS}n{APOS}?|dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|{APOS}cause|{APOS}till?|cont'd\.?|'twas"
    rf"|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|[lLdDjJ]{APOS}|[A-HJ-XZn]{APOSX}{LETTER}{{2,}}"
    rf"|{APOS}[2-9]0(?i:s)|{LETTER}+[aeiouyAEIOUY]{APOSX}[aeiouA-Z]{LETTER}*"
)
FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]"
# "-_" in the lexer's class is a range ('-' to '_': digits, upper case and :;<=>?@[\]^ among it), kept as is.
LIKELYURL = (
    r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},\--_$]+\.)+"
    r"(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?"
)
EMAIL = r"[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+"
HASHTAG = rf"#{LETTER}+"
ATMENTION = r"@[A-Za-z_][A-Za-z0-9_]*"
DATE = rf"{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}}"
NUMBER = rf"[\-+]?(?:{DIGIT}*(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)+|{DIGIT}+)"
SUBSUPNUM = r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"
FRAC = rf"(?:{DIGIT}{{1,4}}[\- \u00a0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}"
FRAC2 = r"[\u00bc\u00bd\u00be\u2153-\u215e]"
ACRO = r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.s\.s\.r|u\.k))|[A-Za-z](?:\.[A-Za-z])+"
ABMONTH = r"(?i:sept|sep|jan|feb|mar|apr|jun|jul|aug|oct|nov|dec)"
ABDAYS = r"(?i:tues|tue|thurs|thu|mon|wed|fri)"
ABSTATE = (
    r"(?i:ala|ariz|calif|colo|conn|dak|del|fla|ga|ind|kans|kan|ky|la|md|mich|minn|mont|mo|neb|nev|okla|pa|penn"
    r"|tenn|tex|va|vt|wisc|wis|wyo)|A(?i:rk)|I(?i:ll)|M(?i:ass|iss)|O(?i:re)|W(?i:ash)"
)
ABCOMP = r"(?i:inc|cos|co|corp|ptys|pty|ptes|pte|pptys|ppty|pptes|ppte|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys)"
ABNUM = r"(?i:ph|tel|est|ext|sq|ft)"
ABPTIT = r"(?i:jr|sr|bros|ed\.d|ph\.d|blvd|rd|esq)"
ABBREV1 = rf"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?i:etc|al|seq))\."
ABTITLE = (
    r"(?i:mrs|mr|ms|drs|dr|profs|prof|sens|sen|reps|rep|attys|atty|lt|col|gen|messrs|govs|gov|adm|rev|maj|sgt"
    r"|cpl|pvt|mt|capt|ste|st|ave|pres|lieut|hon|brig|comdr|cmdr|pfc|spc|supts|supt|det)|M(?i:iss)"
)
ABBREV4 = rf"(?:{ACRO}|{ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|invt|elec|natl)|M[ft](?i:g)|[A-Za-z])"
SENT_STARTERS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
    "Mr\\. Ms\\. Now Once One Other Our She Since So Some Such That The Their Then There These They This We When "
    "While What Yet You"
).split()
# The first letter of each is case-sensitive, the rest is not.
SENT_START = "|".join(f"{w[0]}(?i:{w[1:]})" if len(w) > 1 else w for w in SENT_STARTERS)
PHONE = r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[\- \u00a0.])[0-9]{3}[\- \u00a0.][0-9]{4}"
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|(?:{ACRO})\.))+"
THING_PART = rf"(?:[dDoOlL]{APOSX}{ALNUM})?{ALNUM}+"
THING = rf"{THING_PART}(?:{HYPHEN}{THING_PART})*"
THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
TBSPEC = (
    rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{APOS}n|c{APOS}est)"
)
QUOTES = (
    rf"''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}"
    rf"|{APOS}"
)
MISCSYMBOL = (
    r"[\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u2020-\u2023\u2032-\u2038\u2044"
    r"\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u22ff\u2300-\u23ff\u2600-\u26ff\u3012\u30fb"
    r"\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
)
SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
ASIAN_SMILEY = r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)"
SPACE_LIKE = r"[ \t\u00a0\u2000-\u200b\u200e\u200f\u3000\ufeff\x00]+"


def _latex_quotes(token: str, left: bool) -> str:
    """Quote marks as the PTB writes them: `` and ` open, '' and ' close (straight quotes by position)."""
    token = re.sub(r"&apos;|'", "`" if left else "'", token)
    token = re.sub(r'&quot;|"', "``" if left else "''", token)
    for marks, latex in (("\u0091\u2018\u201b\u2039", "`"), ("\u0092\u2019\u203a", "'")):
        token = re.sub(f"[{marks}]", latex, token)
    for marks, latex in (("\u0093\u201c\u00ab", "``"), ("\u0094\u201d\u00bb", "''")):
        token = re.sub(f"[{marks}]", latex, token)
    return token


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _keep(text: str) -> str:
    return text


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _parentheses(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _ampersand(text: str) -> str:
    return re.sub("(?i:&amp;)", "&", text)


# (main pattern, trailing context or None, the token the match becomes, how many characters of the match the
# token consumes: None for all, k > 0 for the first k, -1 for all but the last, which the lexer reads again).
Rule = tuple[str, "str | None", Callable[[str], str], "int | None"]
RULES: list[Rule] = [
    (r"(?i:cannot|gonna|gotta|lemme|gimme|wanna)", None, lambda t: t[:3], 3),  # "can" "not", "gon" "na", ...
    (r"['\u0092\u2019](?i:tis|twas)", None, lambda t: t[:2], 2),  # "'tis" -> "'t" "is"
    (SGML, None, _keep, None),
    (SMILEY, "[^A-Za-z]", _parentheses, None),
    (ASIAN_SMILEY, None, _parentheses, None),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, lambda t: "--", None),
    (r"&amp;", None, lambda t: "&", None),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep, None),
    (WORD, REDAUX, lambda t: t.replace("\u00ad", ""), None),
    (SWORD, SREDAUX, lambda t: t.replace("\u00ad", ""), None),
    (WORD, None, lambda t: t.replace("\u00ad", ""), None),
    (APOWORD, None, _keep, None),
    (rf"[yY]{APOS}", LETTER, _keep, None),
    (FULLURL, None, _keep, None),
    (LIKELYURL, None, _keep, None),
    (EMAIL, None, _keep, None),
    (HASHTAG, None, _keep, None),
    (ATMENTION, None, _keep, None),
    (REDAUX, r"[^A-Za-z]", lambda t: _latex_quotes(t, False), None),
    (SREDAUX, None, lambda t: _latex_quotes(t, False), None),
    (DATE, None, _keep, None),
    (NUMBER, None, lambda t: t.replace("\u00ad", ""), None),
    (SUBSUPNUM, None, _keep, None),
    (FRAC, None, _nbsp, None),
    (FRAC2, None, lambda t: _FRACTIONS.get(t, t), None),
    (TBSPEC, None, _ampersand, None),
    (THING3, None, _keep, None),
    (r"[A-Z]*\$|#", None, _keep, None),
    (
        r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        None,
        lambda t: _CURRENCY.get(t, t),
        None,
    ),
    # An acronym before a word that usually starts a sentence ends one: its period is also a token.
    (rf"(?:{ACRO})\.", rf"{SPACENL}+(?:{SENT_START}){SPACENL}", _keep, -1),
    (r"[A-Za-z]\.", rf"{SPACENL}+(?:{SENT_START}){SPACENL}", lambda t: t[:-1], 1),  # "a" ".", not "a." "."
    # These abbreviations end a sentence when a capital, a blank line or the end of the text follows.
    (ABBREV1, rf"{SPACENL}(?:{SPACENL}|[A-Z]|{SGML})", _keep, -1),
    (ABBREV1, r"[\s\S][\s\S]", _keep, None),
    (ABBREV1, None, _keep, -1),
    (rf"{ABBREV4}\.", None, _keep, None),
    (r"(?i:ca|figs|fig|prop|nos|no|art|bldg|pp|op)\.", rf"{SPACE}?[0-9]", _keep, None),  # before a number
    (ABBREV4, SPACE, _keep, None),
    (ACRO, SPACENL, _keep, None),
    (rf"{APOS}[0-9][0-9]", SPACENL, _keep, None),
    (rf"{WORD}\.", r"[,;:]", lambda t: t.replace("\u00ad", ""), None),
    (PHONE, None, lambda t: _parentheses(_nbsp(t)), None),
    (r'"|&quot;', r"[A-Za-z0-9$]", lambda t: _latex_quotes(t, True), None),
    (r'"|&quot;', None, lambda t: _latex_quotes(t, False), None),
    (r"[+%&\u2030\u2031~^|\\<>=/]", None, _keep, None),
    (r"[()\[\]{}]", None, lambda t: _BRACKETS[t], None),
    (r"-+", None, lambda t: "--" if 3 <= len(t) <= 4 else t, None),
    (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", None, lambda t: "...", None),
    (r"@+|#+|_+|\*+|(?:\\\*){1,3}", None, _keep, None),
    (r"[,;:]|[?!]+|[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", None, _keep, None),
    (rf"{HTHING}\.", r"[,;:]", lambda t: t.replace("\u00ad", ""), None),
    (HTHING, None, lambda t: t.replace("\u00ad", ""), None),
    (rf"{THING}\.", r"[,;:]", _keep, None),
    (THING, None, _keep, None),
    (rf"{THINGA}\.", r"[,;:]", _ampersand, None),
    (THINGA, None, _ampersand, None),
    ("'", r"[A-Za-z][^ \t\n\r\u00a0]", lambda t: _latex_quotes(t, True), None),
    (REDAUX, None, lambda t: _latex_quotes(t, False), None),
    (QUOTES, None, lambda t: _latex_quotes(t, False), None),
    (MISCSYMBOL, None, _keep, None),
]


class _Lexer:
    """Longest match over `RULES`, as JFlex runs them; a character no rule takes is dropped, as Java drops it."""

    def __init__(self, rules: list[Rule]):
        self.rules = [
            (re.compile(f"({main})({trail})" if trail else f"({main})()"), action, take)
            for main, trail, action, take in rules
        ]
        self.space = re.compile(SPACE_LIKE)
        self.plain = re.compile(r"[A-Za-z]+(?= |\Z)")  # the common case, decided without trying every rule
        self.assimilated = re.compile(r"(?i:cannot|gonna|gotta|lemme|gimme|wanna)")

    def tokens(self, line: str, after: str) -> list[str]:
        """The tokens of `line`; `after` is what follows it in the stream (trailing context may reach into it)."""
        text, end, pos, out = line + after, len(line), 0, []
        while pos < end:
            space = self.space.match(text, pos, end)
            if space:
                pos = space.end()
                continue
            plain = self.plain.match(line, pos)
            if plain and not self.assimilated.fullmatch(plain.group()):
                out.append(plain.group())
                pos = plain.end()
                continue
            best, best_len = None, 0
            for pattern, action, take in self.rules:
                m = pattern.match(text, pos)
                if m and m.end(1) <= end and m.end() - pos > best_len:
                    best, best_len = (m, action, take), m.end() - pos
            if best is None:
                pos += 1  # untokenisable
                continue
            m, action, take = best
            token = m.group(1)
            out.append(action(token))
            pos += len(token) if take is None else take if take > 0 else len(token) + take
        return out


_LEXER: _Lexer | None = None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The COCO caption evaluation's tokenisation of each text: lower-cased PTB tokens joined by single spaces.

    Matches pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1's PTBTokenizer with `-preserveLines
    -lowerCase`, then its punctuation tokens dropped). Like it, the texts are read as one stream, one text a
    line (a newline inside a text is a space), so an abbreviation that ends a text can end a sentence when the
    next text starts with a capital ("etc." + "." tokens).

    Raises:
        InputError: a text is not a string.
    """
    global _LEXER
    if _LEXER is None:
        _LEXER = _Lexer(RULES)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] is {type(text).__name__} {text!r}: captions are strings")
    lines = [re.sub(r"[\n\r\u2028\u2029\u000b\u000c]", " ", t) for t in texts]
    out = []
    for i, line in enumerate(lines):
        after = "\n" + lines[i + 1] if i + 1 < len(lines) else ""
        tokens = _LEXER.tokens(line, after)
        lowered = (t.lower() for t in tokens)
        # Java lower-cases before the punctuation is dropped, so "-lrb-" is no longer "-LRB-" and stays.
        out.append(" ".join(t for t in lowered if t not in PUNCTUATION))
    return out


# --- scorers ------------------------------------------------------------------------------------------------


def _prepare(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: bool
) -> tuple[list[str], list[list[str]]]:
    """Checked predictions and reference lists, PTB-tokenised when asked (each side as one stream, as COCO does)."""
    check_lengths(predictions, references)
    refs = reference_lists(references)
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise InputError(f"predictions[{i}] is {type(p).__name__} {p!r}: predictions are strings")
    predictions = list(predictions)
    if tokenize:
        predictions = ptb_tokenize(predictions)
        flat = iter(ptb_tokenize([r for item in refs for r in item]))
        refs = [[next(flat) for _ in item] for item in refs]
    return predictions, refs


def _ngrams(words: list[str], max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram of the words, n = 1..max_n (an n-gram's length tells its n)."""
    return Counter(chain.from_iterable(zip(*(words[k:] for k in range(n))) for n in range(1, max_n + 1)))


def bleu(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = MAX_N, tokenize: bool = True
) -> list[float]:
    """Corpus-level BLEU-1..max_n, as pycocoevalcap's `Bleu(4)` computes it.

    Clipped n-gram counts and candidate lengths are summed over the corpus; the brevity penalty compares the
    total candidate length with the total of each item's reference length closest to its candidate (the shorter
    on a tie).

    Returns:
        [BLEU-1, ..., BLEU-max_n].
    """
    predictions, refs = _prepare(predictions, references, tokenize)
    correct, guess = [0] * max_n, [0] * max_n
    test_total = ref_total = 0
    for prediction, item_refs in zip(predictions, refs):
        words = prediction.split()
        ref_words = [r.split() for r in item_refs]
        test_total += len(words)
        ref_total += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        most = Counter()
        for r in ref_words:
            most |= _ngrams(r, max_n)  # the highest count of each n-gram in any one reference
        for gram, count in _ngrams(words, max_n).items():
            if gram in most:
                correct[len(gram) - 1] += min(count, most[gram])
        for n in range(max_n):
            guess[n] += max(0, len(words) - n)
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        scores.append(product ** (1 / (n + 1)))
    ratio = (test_total + _TINY) / (ref_total + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def _tf_idf(counts: Counter, idf: dict[tuple, float], unseen: float) -> tuple[dict[tuple, float], list[float]]:
    """An n-gram tf-idf vector (n-grams of every length in one dict) and its norm per n-gram length."""
    vector, squares = {}, [0.0] * MAX_N
    for gram, tf in counts.items():
        weight = vector[gram] = tf * idf.get(gram, unseen)
        squares[len(gram) - 1] += weight * weight
    return vector, [math.sqrt(x) for x in squares]


def cider_d(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: bool = True) -> float:
    """CIDEr-D over the corpus, as pycocoevalcap's `Cider()` computes it.

    For each n = 1..4, candidate and references become tf-idf vectors (idf: log of the item count over the
    number of items whose references hold the n-gram, that number at least 1); their cosine, with the
    candidate's weights clipped at the reference's, is damped by exp(-d^2 / (2 * 6^2)) where d is the difference
    in bigram counts. An item scores 10x the mean over n of the mean over its references; the corpus, the mean
    over items.
    """
    predictions, refs = _prepare(predictions, references, tokenize)
    ref_counts = [[_ngrams(r.split()) for r in item] for item in refs]
    doc_freq = Counter()
    for item in ref_counts:
        doc_freq.update(set().union(*item))
    log_items = math.log(len(refs))
    idf = {gram: log_items - math.log(df) for gram, df in doc_freq.items()}
    total = 0.0
    for prediction, item in zip(predictions, ref_counts):
        words = prediction.split()
        hyp, hyp_norms = _tf_idf(_ngrams(words), idf, log_items)
        hyp_length = max(len(words) - 1, 0)  # CIDEr's length is the bigram count
        item_score = 0.0
        for counts in item:
            ref, ref_norms = _tf_idf(counts, idf, log_items)
            dots = [0.0] * MAX_N
            for gram, weight in hyp.items():
                ref_weight = ref.get(gram)
                if ref_weight:
                    dots[len(gram) - 1] += min(weight, ref_weight) * ref_weight
            ref_length = sum(c for g, c in counts.items() if len(g) == 2)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * CIDER_SIGMA**2))
            for dot, hn, rn in zip(dots, hyp_norms, ref_norms):
                item_score += (dot / (hn * rn) if hn and rn else dot) * penalty
        total += item_score / MAX_N / len(item) * 10.0
    return total / len(refs)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over `a` (Hyyro 2004): one pass over `b`."""
    masks: dict[str, int] = {}
    for i, word in enumerate(a):
        masks[word] = masks.get(word, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for word in b:
        u = v & masks.get(word, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: bool = True) -> float:
    """ROUGE-L F (beta 1.2) averaged over items, as pycocoevalcap's `Rouge()` computes it.

    An item's precision and recall are the best LCS precision and the best LCS recall over its references
    (possibly from different references). Texts split on single spaces, as the reference does, so an empty
    text is one empty word.
    """
    predictions, refs = _prepare(predictions, references, tokenize)
    total = 0.0
    for prediction, item_refs in zip(predictions, refs):
        words = prediction.split(" ")
        precision = recall = 0.0
        for r in item_refs:
            ref_words = r.split(" ")
            common = _lcs_length(ref_words, words)
            precision = max(precision, common / len(words))
            recall = max(recall, common / len(ref_words))
        if precision and recall:
            beta2 = ROUGE_BETA**2
            total += (1 + beta2) * precision * recall / (recall + beta2 * precision)
    return total / len(refs)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """The share of predictions equal to one of their references, both stripped of surrounding spaces."""
    predictions, refs = _prepare(predictions, references, tokenize=False)
    hits = sum(p.strip() in {r.strip() for r in item} for p, item in zip(predictions, refs))
    return hits / len(refs)


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Every caption metric, the text tokenised once.

    Returns:
        {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l", "exact_match"}; `exact_match` compares the
        raw texts, the others the PTB tokens (equal to pycocoevalcap's tokeniser and scorers on the same texts).

    Raises:
        InputError: predictions and references differ in length or are empty, an item has no references, or a
            prediction or reference is not a string.
    """
    tokens, token_refs = _prepare(predictions, references, tokenize=True)
    scores = {f"bleu_{n}": s for n, s in enumerate(bleu(tokens, token_refs, tokenize=False), start=1)}
    scores["cider_d"] = cider_d(tokens, token_refs, tokenize=False)
    scores["rouge_l"] = rouge_l(tokens, token_refs, tokenize=False)
    scores["exact_match"] = exact_match(predictions, references)
    return scores
