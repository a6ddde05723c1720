"""The newest transformers release on the package index inside a version range, e.g. `.ci/newest.py '>=5.23,<5.26'`
(no argument: the newest release of all). Used by .ci/run's newest stage and by `make test-latest` (.ci/latest)."""

import json
import subprocess
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import Version

spec = SpecifierSet(sys.argv[1] if len(sys.argv) > 1 else "")
command = [sys.executable, "-m", "pip", "index", "versions", "transformers", "--json"]
listing = subprocess.run(command, capture_output=True, text=True, check=True)
print(max(v for v in map(Version, json.loads(listing.stdout)["versions"]) if v in spec and not v.is_prerelease))
