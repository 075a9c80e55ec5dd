"""CI: the installed (non-editable) fastpool holds every module of the checkout's package.

Run from outside the checkout: ``python .ci/check_installed.py CHECKOUT``. Imports
``fastpool`` (which must then come from site-packages, not the checkout) and compares
its ``.py`` files and ``py.typed`` with ``git ls-files fastpool`` in the checkout.
"""

import os
import subprocess
import sys

checkout = os.path.abspath(sys.argv[1])
import fastpool  # noqa: E402

installed = os.path.dirname(os.path.abspath(fastpool.__file__))
if installed == os.path.join(checkout, "fastpool"):
    sys.exit(f"fastpool was imported from the checkout ({installed}), not the install")
tracked = subprocess.run(["git", "ls-files", "fastpool"], cwd=checkout, check=True,
                         capture_output=True, text=True).stdout.split()
wanted = {os.path.relpath(p, "fastpool") for p in tracked
          if p.endswith(".py") or p.endswith("py.typed")}
missing = sorted(p for p in wanted if not os.path.exists(os.path.join(installed, p)))
if missing:
    sys.exit(f"the installed fastpool ({installed}) lacks {missing}")
print(f"installed fastpool ({installed}) has all {len(wanted)} tracked modules")
