"""docs/config.md: every recipe's config keys, generated from the pydantic schemas.

    python -m fmray.docs_config            # rewrite docs/config.md
    python -m fmray.docs_config --check    # exit 1 if docs/config.md is out of date

The source is the one `fmray <command> --help` prints (fmray.config.describe_config): each key
with its type, the value a run uses when the key is not given, and the field's docstring.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = """# Config reference

Every config key of every recipe, with its type, default and meaning. Generated from the
pydantic schemas by `python -m fmray.docs_config` (a unit test fails when this page is out of
date); `fmray <command> --help` prints the same lines, and `fmray <command> --config FILE
--help` shows the values that file sets. Keys are set in the YAML file or on the command line
as dotted overrides (`train.lr=3e-4`); an unknown key or a bad value fails before Ray starts,
with one line naming the key.

"""
LINE = re.compile(r"^\s+(\S+) \((.*?)\): ?(.*)$")


def markdown_lines(lines: list[str]) -> list[str]:
    """describe_config's `  key (type, default X): meaning` as markdown list items."""
    items = []
    for line in lines:
        match = LINE.match(line)
        if match is None:
            raise ValueError(f"unexpected describe_config line: {line!r}")
        key, what, about = match.groups()
        items.append(f"- `{key}` ({what}){': ' + about if about else ''}")
    return items


def render() -> str:
    from fmray.config import describe_config
    from fmray.recipes import get_recipe, recipe_config_class, recipe_names

    parts = [HEADER, "Recipes: " + ", ".join(f"[{n}](#{n})" for n in recipe_names()) + ".\n"]
    for name in recipe_names():
        recipe = get_recipe(name)
        config_class = recipe_config_class(name)
        parts.append(f"\n## {name}\n\n`fmray {name}`: {recipe.summary} (`{config_class.__name__}`)")
        parts.append("\n\n" + "\n".join(markdown_lines(describe_config(config_class))) + "\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmray.docs_config", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    parser.add_argument("--out", default=str(DOC), help="the page to write or check")
    args = parser.parse_args(argv)
    text, out = render(), Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise SystemExit(f"{out} is out of date: run python -m fmray.docs_config")
        print(f"{out} is up to date")
        return
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
