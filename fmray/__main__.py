"""`python -m fmray <command> ...`: the same as the `fmray` script.

    python -m fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50
    python -m fmray --help

Useful where the script is not on PATH, e.g. `ray job submit -- python -m fmray sft ...`.
"""

from fmray.cli import main

if __name__ == "__main__":
    main()
