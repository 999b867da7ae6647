"""pip-audit over the dependencies exactly as installed in this environment (``pip freeze``,
the versions the tests ran with): fails on any known vulnerability.

When the vulnerability service knows none of the installed versions (no network, or an index
that is not PyPI), nothing could be audited: that is said loudly, and is not a failure, since
no finding exists to fail on; any version it did audit must be clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
REQUEST_SECONDS = 10  # each request to the vulnerability service
AUDIT_SECONDS = 300  # the whole audit: an unreachable service must not stall CI


def main() -> int:
    freeze = subprocess.run([BIN / "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        pins = Path(folder) / "requirements.txt"
        pins.write_text(freeze)
        try:
            audit = subprocess.run(
                [BIN / "pip-audit", "--requirement", pins, "--no-deps", "--disable-pip",
                 "--vulnerability-service", "pypi", "--format", "json", "--progress-spinner",
                 "off", "--timeout", str(REQUEST_SECONDS)],
                capture_output=True, text=True, check=False, timeout=AUDIT_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"pip-audit: NOTHING AUDITED: the vulnerability service did not answer "
                  f"within {AUDIT_SECONDS} s")
            return 0
    try:
        found = json.loads(audit.stdout)["dependencies"]
    except (json.JSONDecodeError, KeyError):
        print(f"pip-audit failed (exit {audit.returncode}):\n{audit.stderr}", file=sys.stderr)
        return 1
    audited = [d for d in found if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    for d in vulnerable:
        ids = ", ".join(v["id"] for v in d["vulns"])
        print(f"{d['name']} {d['version']}: {ids}", file=sys.stderr)
    print(f"pip-audit: {len(audited)} of {len(found)} installed distributions audited, "
          f"{len(vulnerable)} with known vulnerabilities")
    if not audited:
        print("pip-audit: NOTHING AUDITED: the vulnerability service knows none of the "
              f"installed versions here ({found[0]['skip_reason'] if found else 'none'})")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
