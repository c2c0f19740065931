"""``python -m scripts.accelerator``: the accelerator benchmark (see the package's docstring)."""

from scripts.accelerator.run import main

if __name__ == "__main__":
    main()
