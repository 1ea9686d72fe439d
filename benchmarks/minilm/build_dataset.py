"""Build the frozen text data set of the MiniLM benchmark from Debian's package lists.

Each example is one Debian package's description (the short line, then the long text with
its " ." paragraph markers removed), labelled with the package's Section. Packages are read
from ``apt-cache dumpavail`` (Section, Source, Description-md5, the short description); the
long texts come from the apt lists' Translation-en files, matched by Description-md5
(dumpavail carries only the short line when apt keeps the long ones in those files).

* one package per source package (a package without ``Source:`` is its own source): the
  package named like its source if there is one, else the first by name; descriptions
  whose text equals an earlier one's are dropped as well, so that no text is in two splits;
* the section without its component (``contrib/games`` -> ``games``);
* the ``--sections`` largest sections, at most ``--per-section`` examples each (a seeded
  sample), each section split train/val/test 80/10/10 (seeded);
* one gzip-compressed JSON-lines file (fields text, label, split, package), written with a
  fixed gzip timestamp so that the same lists give the same bytes.

Needs the package lists with English translations (as root)::

    apt-get update -o Acquire::Languages=en
    python benchmarks/minilm/build_dataset.py
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "debian-descriptions.jsonl.gz"
LISTS = "/var/lib/apt/lists"
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def records(text: str):
    """The fields of each deb822 record (continuation lines kept, joined by newlines)."""
    for block in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def clean(description: str) -> str:
    """Short line and long text as one paragraph-separated string: the " ." lines that
    mark paragraphs become blank lines, the leading space of every line goes."""
    first, *rest = description.split("\n")
    paragraphs, current = [first.strip()], []
    for line in rest:
        line = line.removeprefix(" ")
        if line.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)


def long_descriptions(lists: str) -> dict[str, str]:
    """Description-md5 -> the English description, from the Translation-en files of the apt lists."""
    files = sorted(glob.glob(os.path.join(lists, "*_i18n_Translation-en*")))
    if not files:
        sys.exit(f"no Translation-en files in {lists}: run `apt-get update -o Acquire::Languages=en` first")
    found = {}
    for f in files:
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", f], check=True, capture_output=True,
                              text=True).stdout
        for r in records(text):
            if "Description-md5" in r and "Description-en" in r:
                found[r["Description-md5"]] = r["Description-en"]
    return found


def packages() -> list[dict]:
    """One entry per package of ``apt-cache dumpavail``: name, source, section, short description, md5."""
    text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    out = {}
    for r in records(text):
        if not all(k in r for k in ("Package", "Section", "Description")):
            continue
        source = r.get("Source", r["Package"]).split(" ")[0]  # "Source: name (version)"
        out.setdefault(r["Package"], {
            "package": r["Package"], "source": source, "section": r["Section"].rpartition("/")[2],
            "short": r["Description"], "md5": r.get("Description-md5"),
        })
    return list(out.values())


def build(per_section: int, sections: int, seed: int, lists: str) -> tuple[list[dict], dict]:
    long = long_descriptions(lists)
    by_source = collections.defaultdict(list)
    for p in packages():
        by_source[p["source"]].append(p)
    chosen, seen_text, missing_long = [], set(), 0
    for source in sorted(by_source):
        group = sorted(by_source[source], key=lambda p: (p["package"] != source, p["package"]))
        p = group[0]
        raw = long.get(p["md5"])
        if raw is None:
            missing_long += 1
            raw = p["short"]
        text = clean(raw)
        if text in seen_text:
            continue
        seen_text.add(text)
        chosen.append({"package": p["package"], "label": p["section"], "text": text})
    counts = collections.Counter(c["label"] for c in chosen)
    top = sorted(counts, key=lambda s: (-counts[s], s))[:sections]
    rng = random.Random(seed)
    rows = []
    for section in sorted(top):
        items = sorted((c for c in chosen if c["label"] == section), key=lambda c: c["package"])
        rng.shuffle(items)
        items = items[:per_section]
        n = len(items)
        bounds = [round(n * SPLITS[0][1]), round(n * (SPLITS[0][1] + SPLITS[1][1]))]
        for i, item in enumerate(items):
            split = "train" if i < bounds[0] else "val" if i < bounds[1] else "test"
            rows.append({"text": item["text"], "label": section, "split": split, "package": item["package"]})
    rows.sort(key=lambda r: (r["split"], r["label"], r["package"]))
    stats = {
        "sources": len(by_source), "descriptions": len(chosen), "without_long_text": missing_long,
        "sections": {s: {"available": counts[s], "kept": sum(r["label"] == s for r in rows)} for s in sorted(top)},
        "splits": dict(collections.Counter(r["split"] for r in rows)),
    }
    return rows, stats


def write(rows: list[dict], path: Path) -> int:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return len(buffer.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-section", type=int, default=1500, help="at most this many per section (default 1500)")
    parser.add_argument("--sections", type=int, default=12, help="the largest sections kept (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and the split (default 0)")
    parser.add_argument("--lists", default=LISTS, help=f"apt's lists directory (default {LISTS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file (default: beside this script)")
    args = parser.parse_args(argv)
    rows, stats = build(args.per_section, args.sections, args.seed, args.lists)
    size = write(rows, args.out)
    stats["bytes"] = size
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
