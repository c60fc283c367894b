"""``python -m arwgan``: the ``arwgan`` command group (train, autotune, embed, extract, eval)."""

from arwgan.app import main

if __name__ == "__main__":
    main()
