"""``python -m evit_patch.visualize``: see :mod:`evit_patch.tools.visualize`."""

from evit_patch.tools.visualize import main

if __name__ == "__main__":
    main()
