"""Entry point: ``python train.py fit|validate|test|predict --config configs/<method>/<experiment>.yaml``.

See README.md; the CLI itself is :mod:`lit_models.cli`. Input and config errors (``ValueError``,
``FileNotFoundError``, ``FileExistsError``, ``NotImplementedError``: they name the file, line or config key) are printed as one ``error:`` line with exit status 2;
set ``LITLAB_TRACEBACK=1`` to see the traceback as well.
"""

import os
import sys

from lit_models.cli import main


def run() -> int:
    """Run the CLI; returns the process exit status."""
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        if os.environ.get("LITLAB_TRACEBACK", "") not in ("", "0"):
            raise
        sys.stderr.write(f"error: {err}\n(LITLAB_TRACEBACK=1 shows the traceback)\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
