"""report stage: whatever reports/<stage>/ this run has → reports/index.html + reports/README.md (one page per run).

The last stage of the DAG. It depends on each stage's report folder (wall times included) and on params.yaml as a
file, since the page shows the params whole; it reads no params section itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common.config import load_params, read_yaml
from pipeline.common.errors import exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.orchestration.report import write_report

PARAMS = ()
HTML = Path("reports/index.html")
MARKDOWN = Path("reports/README.md")
ASSETS = Path("reports/report")


@exit_on_error
@timed
def main() -> None:
    load_params(sections=PARAMS)  # a broken params.yaml is one error line here too
    order = list((read_yaml("dvc.yaml") or {}).get("stages", {}))
    found = write_report(Path("."), order, HTML, MARKDOWN, ASSETS)
    print(f"report: {len(found)} stages ({', '.join(found)}) -> {HTML}, {MARKDOWN}", file=sys.stderr)


if __name__ == "__main__":
    main()
