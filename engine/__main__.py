"""`python -m stepline` runs the command line, as the `stepline` script does."""

from stepline.cli.main import main

# Guarded: tools that import every module of the package must not start the command line.
if __name__ == "__main__":
    main()
