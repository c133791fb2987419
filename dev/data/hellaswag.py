"""Build llm.c's HellaSwag eval file from the official validation jsonl.

    python dev/data/hellaswag.py                      # downloads hellaswag_val.jsonl (once), writes the .bin
    python dev/data/hellaswag.py --input FILE.jsonl   # offline: any file of HellaSwag-format lines

Writes dev/data/hellaswag/hellaswag_val.bin (train.py's default --hellaswag-file) in the format of
gpt2cu.eval (llm.c's data_common.write_evalfile). Tokens follow llm.c's dev/data/hellaswag.py: the
context is `ctx` tokenized on its own, each ending is " " + ending (GPT-2's BPE attaches the space to
the following word, as in running text).

The upstream repository publishes no checksum for hellaswag_val.jsonl, so a download is checked by
content instead: it must parse and hold exactly the 10,042 validation examples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

# runnable as a script from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gpt2cu.eval import Example, write_eval_file  # noqa: E402
from gpt2cu.tokenizer import encode  # noqa: E402

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_EXAMPLES = 10042
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


def download(path: str) -> None:
    """Fetch the official val jsonl to `path` (via a temporary file, so a failed download leaves none)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    print(f"downloading {URL} to {path}")
    try:
        with urllib.request.urlopen(URL, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"download of {URL} failed ({e}); fetch it elsewhere and pass --input FILE")


def render(item: dict) -> Example:
    """One jsonl item -> the eval file's example (context tokens, 4 ending tokens, label)."""
    return Example(label=int(item["label"]), context=tuple(encode(item["ctx"])),
                   endings=tuple(tuple(encode(" " + ending)) for ending in item["endings"]))


def read_jsonl(path: str) -> list:
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(render(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{lineno}: not a HellaSwag example ({type(e).__name__}: {e})")
    return examples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="a local hellaswag jsonl (default: download the official val split)")
    p.add_argument("--output", default=os.path.join(DATA_DIR, "hellaswag_val.bin"))
    args = p.parse_args(argv)
    source = args.input
    if source is None:
        source = os.path.join(DATA_DIR, "hellaswag_val.jsonl")
        if not os.path.exists(source):
            download(source)
    examples = read_jsonl(source)
    if args.input is None and len(examples) != VAL_EXAMPLES:
        raise SystemExit(f"{source}: {len(examples)} examples, the official val split has {VAL_EXAMPLES}; "
                         f"delete it to download again")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        write_eval_file(args.output, examples)
    except ValueError as e:
        raise SystemExit(f"{source}: {e}")
    print(f"wrote {len(examples):,} examples to {args.output} ({os.path.getsize(args.output):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
