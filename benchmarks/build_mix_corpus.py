"""Build the bundled ``--calib mix`` corpus (``windquant/calib/data/*.txt``) from its sources.

Deterministic: the same inputs give byte-identical files. One file per licence, so each keeps
its own terms (``windquant/calib/data/NOTICE`` says which is which):

* ``wikitext.txt`` (CC BY-SA 3.0): whole articles of WikiText-2's *validation* split (never its
  test split, which is the evaluation text), detokenised (``@-@`` → ``-``, spaces before
  punctuation removed, quotes re-attached) and without the sentences that hold an ``<unk>``
  (WikiText's stand-in for a rare word: a sentence with a hole in it is not English).
* ``books.txt`` (public domain): *Alice's Adventures in Wonderland* (Lewis Carroll, 1865),
  *As You Like It* (Shakespeare) and the proceedings of the Library of Congress *Workshop on
  Electronic Texts* (1992, a U.S. Government work), as the Canterbury compression corpus files
  ``alice29.txt``, ``asyoulik.txt`` and ``lcet10.txt`` that PyPI's ``brotli`` sdist ships in
  ``tests/testdata``. The Project Gutenberg header and footer lines are removed (the texts are
  public domain; PG's terms ask that its name go when its boilerplate does).
* ``windquant.txt`` (this project's own licence): the README (instructions) and a slice of
  windquant's sources (code).

Documents inside a file are separated by a line holding only a form feed (``\\f``); the loader
(:func:`windquant.calib.corpus.mix_text`) interleaves the files' documents so every stretch of
the corpus, and so its evaluation hold-out, mixes the three.

    pip download --no-deps --no-binary :all: brotli==1.2.1 -d /tmp/brotli
    tar xzf /tmp/brotli/brotli-1.2.1.tar.gz -C /tmp/brotli
    python benchmarks/build_mix_corpus.py --wikitext /work/shared/data/wikitext-2/wiki.valid.tokens \\
        --canterbury /tmp/brotli/brotli-1.2.1/tests/testdata
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "windquant" / "calib" / "data"
SEP = "\n\f\n"  # between documents (see windquant.calib.corpus.MIX_SEPARATOR)

WIKI_BYTES = 560_000  # whole articles until this many bytes (the split has ~290 kB without <unk>)
PROCEEDINGS_BYTES = 110_000  # whole sessions of the workshop until this many bytes
CODE_BYTES = 170_000  # windquant sources after the README
CODE_FILE_BYTES = 9_000  # at most this much of one source file: many files, not a few long ones


# -- WikiText ----------------------------------------------------------------------------------
def detokenise(line: str) -> str:
    """WikiText's tokenised line as plain text."""
    s = line.strip()
    s = re.sub(r" @(.)@ ", r"\1", s)  # 1 @,@ 000 -> 1,000; well @-@ known -> well-known
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s)
    s = re.sub(r" ' ", "' ", s)
    # Quotes come as free-standing tokens: pair them left to right and close each pair up.
    parts = f" {s} ".split(' " ')
    if len(parts) % 2 == 1 and len(parts) > 1:
        s = parts[0]
        for i, part in enumerate(parts[1:]):
            s += (' "' if i % 2 == 0 else '" ') + part
    return s.strip().replace("  ", " ")


def wiki_articles(path: Path) -> list[str]:
    articles: list[list[str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        heading = re.fullmatch(r"((?:= )+)(.*?)((?: =)+)", line)  # "= Title =", "= = Section = =", ...
        if heading and heading.group(1) == "= ":
            articles.append([detokenise(heading.group(2))] if "<unk>" not in line else [])
        elif heading and "<unk>" in line:
            continue
        elif heading and articles:
            articles[-1].append(detokenise(heading.group(2)))
        elif articles:
            # Sentences end at ". " before a capital; drop the ones with a hole in them.
            sentences = re.split(r"(?<=[.!?]) (?=[A-Z\"(])", detokenise(line))
            kept = " ".join(x for x in sentences if "<unk>" not in x)
            if kept:
                articles[-1].append(kept)
    # A heading left without text under it (all its sentences had a hole) goes too.
    out = []
    for lines in articles:
        body = [x for i, x in enumerate(lines) if not _is_heading(x) or (i + 1 < len(lines) and not _is_heading(lines[i + 1]))]
        out.append("\n\n".join(body))
    return out


def _is_heading(x: str) -> bool:
    return len(x) < 80 and not x.endswith((".", "!", "?", '"', ")"))


# -- public-domain books ---------------------------------------------------------------------
def unwrap(text: str) -> str:
    """Hard-wrapped paragraphs (one line per ~70 characters) as one line each."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p.strip()) for p in paras if p.strip())


def alice(path: Path) -> list[str]:
    text = path.read_text(encoding="ascii").replace("\r", "")
    chapters = re.split(r"\n\s*CHAPTER [IVXL]+\n", text)[1:]
    # `quoted' in the 1990s ASCII style -> 'quoted'
    return [unwrap(c).replace("`", "'").replace("THE END", "").strip() for c in chapters]


def play(path: Path) -> list[str]:
    text = path.read_text(encoding="ascii").replace("\r", "")
    scenes = re.split(r"\n(?=SCENE [IVX]+\t)", text)[1:]
    out = []
    for scene in scenes:
        lines = []
        for line in scene.splitlines():
            line = re.sub(r"^([A-Z][A-Z ]+)\t", r"\1: ", line)  # speaker<TAB>speech -> speaker: speech
            line = line.replace("\t", " ").strip()
            if line and not re.fullmatch(r"ACT [IVX]+|AS YOU LIKE IT", line):
                lines.append(line)
        out.append("\n".join(lines))
    return out


def proceedings(path: Path) -> list[str]:
    lines = path.read_text(encoding="ascii").replace("\r", "").splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip() == "INTRODUCTION")
    end = next(i for i, x in enumerate(lines) if i > start and x.strip() == "WORKSHOP")  # agenda and participants follow
    body = "\n".join(x for x in lines[start:end] if "Project Gutenberg" not in x)
    out, size = [], 0
    for part in re.split(r"\n(?=SESSION [IVX]+\.)", body):
        if size >= PROCEEDINGS_BYTES:
            break
        out.append(unwrap(part).replace("******", "").strip())
        size += len(out[-1])
    return out


# -- windquant's own text ----------------------------------------------------------------------
def own_text() -> list[str]:
    docs = [(ROOT / "README.md").read_text(encoding="utf-8")]
    used = 0
    for path in sorted((ROOT / "windquant").rglob("*.py")):
        if used >= CODE_BYTES:
            break
        code = path.read_text(encoding="utf-8")[:CODE_FILE_BYTES]
        code = code[: code.rfind("\n") + 1]  # whole lines
        if len(code) < 500:
            continue  # __init__ files and the like say little
        docs.append(f"# {path.relative_to(ROOT).as_posix()}\n{code}")
        used += len(code)
    return docs


def write(name: str, docs: list[str]) -> None:
    text = SEP.join(d.strip("\n") for d in docs if d.strip()) + "\n"
    (OUT / name).write_text(text, encoding="utf-8")
    print(f"{name}: {len(docs)} documents, {len(text.encode()):,} bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wikitext", type=Path, required=True, help="WikiText-2 wiki.valid.tokens")
    p.add_argument("--canterbury", type=Path, required=True, help="folder with alice29.txt, asyoulik.txt, lcet10.txt")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    articles, size = [], 0
    for article in wiki_articles(args.wikitext):
        if size >= WIKI_BYTES:
            break
        articles.append(article)
        size += len(article.encode())
    write("wikitext.txt", articles)
    c = args.canterbury
    write("books.txt", alice(c / "alice29.txt") + play(c / "asyoulik.txt") + proceedings(c / "lcet10.txt"))
    write("windquant.txt", own_text())


if __name__ == "__main__":
    main()
