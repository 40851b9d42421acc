"""Join hard-wrapped lines back into paragraphs, so a model trained on a Gutenberg book writes prose, not 70-column lines.

A line ends a paragraph's line only because the next word did not fit: the line plus a space plus the next line's
first word would pass the wrap width. Where that holds (and neither line is blank, and the next line does not
start with a blank or a dialogue dash) the break is a soft wrap and becomes a space. Everything else is kept:
blank lines between paragraphs, verse and headings (short lines the next word would have fitted after),
indented lines, dialogue. A text whose lines are not wrapped at a common width is returned unchanged.
"""

from __future__ import annotations

DIALOGUE_DASHES = ("—", "―", "–", "-")
MAX_WRAP_WIDTH = 120  # wider than that, lines are paragraphs already
_WIDTH_QUANTILE = (
    0.995  # the wrap width: the length 99.5% of lines stay within (a few over-long lines are outliers)
)
_FULL_SHARE = 0.5  # a wrapped text has at least half its lines longer than 70% of the width
_SLACK = 0.1  # wrappers differ by a few columns (the width is estimated): a line this close to it was full


def wrap_width(lines: list[str]) -> int | None:
    """The width a text was hard-wrapped at, or None when its lines do not look wrapped."""
    lengths = sorted(len(line.rstrip()) for line in lines if line.strip())
    if len(lengths) < 10:
        return None
    width = lengths[min(int(len(lengths) * _WIDTH_QUANTILE), len(lengths) - 1)]
    full = sum(n >= 0.7 * width for n in lengths)
    return width if width <= MAX_WRAP_WIDTH and full >= _FULL_SHARE * len(lengths) else None


def _soft_break(line: str, following: str, width: int) -> bool:
    """Whether the break between ``line`` and ``following`` is a wrap inside a paragraph."""
    if (
        not line.strip()
        or not following.strip()
        or following[0].isspace()
        or following.startswith(DIALOGUE_DASHES)
    ):
        return False
    return len(line.rstrip()) + 1 + len(following.split(maxsplit=1)[0]) > width - round(_SLACK * width)


def unwrap(text: str) -> str:
    """``text`` with its soft line breaks (see the module docstring) turned into spaces."""
    lines = text.split("\n")
    width = wrap_width(lines)
    if width is None:
        return text
    out = [lines[0]]
    for previous, line in zip(lines, lines[1:], strict=False):
        if _soft_break(previous, line, width):
            out[-1] = out[-1].rstrip() + " " + line
        else:
            out.append(line)
    return "\n".join(out)
