"""`python -m stepline.cli` runs the command line, as the `stepline` script does."""

from stepline.cli.main import main

# Guarded: tools that import every module of the package (tests/test_deploy_manifests.py
# reads their sources) must not start the command line.
if __name__ == "__main__":
    main()
