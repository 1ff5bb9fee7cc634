"""Write an other-domain evaluation text: the Jargon File 4.4.7 or *The Devil's Dictionary* as plain English prose.

A text no calibration choice draws from (not WikiText, not the Python docs of ``builtin``, not
the books or code of ``mix``, not what a model writes for ``self``), for judging a calibration
set out of its domain: the hackers' lexicon, a dictionary of computing slang and folklore
written as essays and definitions. Public domain ("This document (the Jargon File) is in the
public domain, to be freely used, shared, and modified"; cite it as "Jargon File 4.4.7"). It
comes from Debian's package ``dict-jargon`` (4.4.7-3.1), the dictd database
``/usr/share/dictd/jargon.dict.dz`` and its ``jargon.index``:

    apt-get download dict-jargon && dpkg-deb -x dict-jargon_*.deb /tmp/jargon
    python benchmarks/other_domain.py /tmp/jargon/usr/share/dictd /work/other_domain.txt
    windquant eval CKPT --corpus /work/other_domain.txt      # the last 20 % is the evaluation span

Each entry becomes ``headword`` + a blank line + its paragraphs, each unwrapped onto one line,
cross-reference braces removed (``{bit bucket}`` -> ``bit bucket``); entries in the index's
(alphabetical) order, so the evaluation span (the last fifth) is entries from late in the
alphabet. Deterministic: the same package gives the same bytes. Not shipped with windquant.

A second text of another kind (``--dict devil``): Ambrose Bierce's *The Devil's Dictionary*
(1881-1906; public domain, "Copyright 1911 ... A Public Domain Text, Copyright Expired"), from
Debian's ``dict-devil`` (1.0-13.1): satirical definitions and verse in literary American English
of a century ago, far from computing, Wikipedia and Python alike. Its entries carry their
headword in their first line (``ABASEMENT, n.  A decent ...``), so they are kept whole:

    apt-get download dict-devil && dpkg-deb -x dict-devil_*.deb /tmp/devil
    python benchmarks/other_domain.py --dict devil /tmp/devil/usr/share/dictd /work/devil.txt
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's number digits


def dict_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


# Per dictionary: how many lines of each entry come before its text (the Jargon File's headword
# and pronunciation lines; the Devil's Dictionary starts with the text) and whether the headword
# is written above it.
HEADER_LINES = {"jargon": 2, "devil": 0}


def entries(folder: Path, name: str = "jargon") -> list[tuple[str, str]]:
    data = gzip.decompress((folder / f"{name}.dict.dz").read_bytes())  # dictzip is gzip with an index
    out = []
    for line in (folder / f"{name}.index").read_text(encoding="utf-8").splitlines():
        head, offset, size = line.split("\t")
        if head.startswith(("00-database", "00database")):
            continue  # dictd's own header entries (format, source URL, the licence note)
        start = dict_number(offset)
        out.append((head, data[start : start + dict_number(size)].decode("utf-8")))
    return out


def prose(head: str, raw: str, header_lines: int = 2) -> str:
    lines = raw.splitlines()[header_lines:]
    paras = [re.sub(r"\s*\n\s*", " ", p.strip()) for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    body = "\n\n".join(re.sub(r" {2,}", " ", re.sub(r"\{([^{}]*)\}", r"\1", p)) for p in paras)
    return f"{head}\n\n{body}" if header_lines else body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dictd", type=Path, help="folder with NAME.dict.dz and NAME.index (Debian's dict-jargon or dict-devil)")
    p.add_argument("--dict", default="jargon", choices=sorted(HEADER_LINES), help="which dictionary (default jargon)")
    p.add_argument("out", type=Path, help="text file to write")
    args = p.parse_args()
    skip = HEADER_LINES[args.dict]
    text = "\n\n\n".join(prose(h, raw, skip) for h, raw in entries(args.dictd, args.dict) if raw.strip()) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {text.count(chr(10) * 3) + 1} entries, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
