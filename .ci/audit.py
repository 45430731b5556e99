"""make audit: the versions a lock file pins, against OSV's database of known vulnerabilities.

    python .ci/audit.py requirements.lock [VULN-ID ...]   # the IDs are accepted ones, ignored

pip-audit reads the pins and hashes (--disable-pip: no resolution, nothing installed) and asks
the database about each.
Exit 0 when none is known to be vulnerable, and also when the database cannot be reached: CI has
no network, so then one line says that nothing was checked, and the build goes on. Exit 1 when a
pinned version has a known vulnerability (each printed with the versions that fix it: raise the
pin, run make lock) or when pip-audit failed for another reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

SERVICE = "osv"
PROBE = "https://api.osv.dev/v1/query"  # where pip-audit's OSV service posts its queries
# What pip-audit prints when the database is out of reach (requests' and urllib3's words).
OFFLINE_WORDS = (
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Connection refused",
    "Network is unreachable",
)


def offline(reason: str) -> int:
    print(
        f"make audit: NOT CHECKED: the vulnerability database ({SERVICE}) is out of reach "
        f"({reason}); no pinned version was checked"
    )
    return 0


def reachable() -> str | None:
    """None when the database answers at all (any HTTP status), else why not."""
    request = urllib.request.Request(
        PROBE, data=b"{}", headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    lock, ignored = Path(argv[0]), argv[1:]
    why = reachable()
    if why is not None:
        return offline(why)
    pip_audit = os.environ.get("PIP_AUDIT") or str(Path(sys.executable).with_name("pip-audit"))
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "audit.json"
        command = [
            pip_audit,
            "--requirement",
            str(lock),
            "--disable-pip",
            "--vulnerability-service",
            SERVICE,
            "--format",
            "json",
            "--output",
            str(report),
            "--progress-spinner",
            "off",
        ]
        for vuln in ignored:
            command += ["--ignore-vuln", vuln]
        done = subprocess.run(command, capture_output=True, text=True)
        if not report.is_file():
            said = (done.stderr + done.stdout).strip()
            if any(word in said for word in OFFLINE_WORDS):
                return offline(said.splitlines()[-1] if said else "no answer")
            print(
                f"make audit: pip-audit failed (exit {done.returncode}):\n{said}", file=sys.stderr
            )
            return 1
        dependencies = json.loads(report.read_text())["dependencies"]
    skipped = [d for d in dependencies if "skip_reason" in d]
    audited = [d for d in dependencies if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    if dependencies and not audited:  # a proxy that serves the package index only, say
        return offline(f"every one of the {len(skipped)} pins skipped: {skipped[0]['skip_reason']}")
    for dependency in skipped:
        print(f"make audit: not checked: {dependency['name']}: {dependency['skip_reason']}")
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            aliases = ", ".join(vuln.get("aliases") or [])
            print(
                f"make audit: VULNERABLE {dependency['name']}=={dependency['version']}: "
                f"{vuln['id']}{f' ({aliases})' if aliases else ''}; fixed in: {fixes}"
            )
    if vulnerable:
        count = sum(len(d["vulns"]) for d in vulnerable)
        print(
            f"make audit: FAILED: {count} known vulnerabilities in {len(vulnerable)} of the "
            f"{len(audited)} pinned versions of {lock}; raise the pins (make lock LOCK_ARGS="
            f"'--upgrade-package NAME') or accept an ID with make audit AUDIT_IGNORE=ID"
        )
        return 1
    ignoring = f", ignoring {' '.join(ignored)}" if ignored else ""
    print(
        f"make audit: no known vulnerability in the {len(audited)} pinned versions of {lock} "
        f"({SERVICE}{ignoring})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
