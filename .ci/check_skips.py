"""Check the output of ``pytest -rs`` run with OOD_BENCH_DATA / OOD_BENCH_WEIGHTS pointed at empty folders.

Usage: ``python .ci/check_skips.py PYTEST_OUTPUT DATA_DIR WEIGHTS_DIR``. Fails (exit 1) unless nothing failed or
errored, at least one test was skipped for an absent offline file, and every skip that mentions the offline
folders names the absent file inside them and how to get it (``missing_reason`` in tests/conftest.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    text, data, weights = Path(argv[0]).read_text(), argv[1].rstrip("/"), argv[2].rstrip("/")
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", line)]
    if not summary or re.search(r"\d+ (failed|errors?)\b", summary[-1]):
        print(f"check_skips: the suite did not pass: {summary[-1] if summary else 'no summary line'}")
        return 1
    skips = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    offline = [line for line in skips if "OOD_BENCH_DATA" in line or "OOD_BENCH_WEIGHTS" in line]

    def names_its_files(line: str) -> bool:  # every "needs <path>: absent" inside the empty folders, with a remedy
        paths = re.findall(r"needs (\S+): absent \(looked for in \$OOD_BENCH_\w+=(\S+), [^)]*\); get it: ", line)
        return bool(paths) and all(p.startswith(f + "/") and f in (data, weights) for p, f in paths)

    bad = [line for line in offline if not names_its_files(line)]
    print(f"check_skips: {summary[-1].strip('= ')}; {len(offline)} of {len(skips)} skip lines name an absent file")
    if not offline or bad:
        print("check_skips: skips that do not name the absent file, where it is looked for and how to get it:")
        print("\n".join(bad) if bad else "(no skip for an absent offline file at all)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
