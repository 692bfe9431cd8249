"""Entry point: ``python train.py fit|validate|test|predict --config configs/<method>/<experiment>.yaml``.

See README.md; the CLI itself is :mod:`lit_models.cli`.
"""

from lit_models.cli import main

if __name__ == "__main__":
    main()
