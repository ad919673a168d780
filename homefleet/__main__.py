"""`python -m homefleet`: the same as the `homefleet` command."""

from homefleet.cli import main

if __name__ == "__main__":
    main()
