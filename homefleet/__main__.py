"""`python -m homefleet`: the same as the `homefleet` command."""

from homefleet.entry import main

if __name__ == "__main__":
    main()
