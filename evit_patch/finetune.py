"""``python -m evit_patch.finetune``: see :mod:`evit_patch.tools.finetune`."""

from evit_patch.tools.finetune import main

if __name__ == "__main__":
    main()
