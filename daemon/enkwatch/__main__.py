"""`python -m enkwatch`: the console command."""

from __future__ import annotations

from enkwatch.cli import main

if __name__ == "__main__":
    main()
