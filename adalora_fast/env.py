"""``python -m adalora_fast.env``: versions, devices, and the backend each op runs on here, with the reason.

The same facts as :func:`adalora_fast.env_report` (a dict), printed one per line.
"""

from __future__ import annotations

import sys

from .dispatch import env_report


def format_report(report: dict) -> str:
    """The report as aligned ``key: value`` lines (the call counts flattened to ``calls.op: ...``)."""
    rows = []
    for key, value in report.items():
        if key == "calls":
            for op, counts in value.items():
                cells = ", ".join(f"{backend} {n}" for backend, n in sorted(counts.items())) or "none yet"
                rows.append((f"calls.{op}", cells))
        else:
            rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main() -> int:
    print(format_report(env_report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
