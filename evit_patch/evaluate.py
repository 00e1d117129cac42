"""``python -m evit_patch.evaluate``: see :mod:`evit_patch.tools.evaluate`."""

from evit_patch.tools.evaluate import main

if __name__ == "__main__":
    main()
