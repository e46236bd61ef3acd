"""`python -m amygdala ...` is the `amygdala` command."""

from amygdala.server.cli import main

if __name__ == "__main__":
    main()
