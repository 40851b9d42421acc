"""export stage: models/<export.model> → models/onnx (fp32 + int8, tokenizer, config, model card); parity metrics."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import config
from pipeline.atomic import write_json
from pipeline.errors import exit_on_error
from pipeline.export import export_model
from pipeline.provenance import provenance
from pipeline.stage_timing import timed

TOKENIZER = Path("data/tokenizer")
SHARDS = Path("data/shards")
OUT = Path("models/onnx")
METRICS = Path("reports/export/metrics.json")
PARAMS = ("seed", "export")


@exit_on_error
@timed
def main() -> None:
    params = config.load_params(sections=PARAMS)
    p = params.export
    metrics = export_model(Path("models") / p.model, TOKENIZER, SHARDS, OUT, p, params.seed,
                           provenance=provenance(PARAMS))
    write_json(METRICS, metrics)
    parity = metrics["parity"]
    if "same_class" in parity:
        print(f"export: classifier parity max |Δlogit| {parity['max_abs_logit_diff']:.2e}, same class on "
              f"{parity['same_class']}/{parity['texts']} texts → {OUT}/")
        return
    int8 = f", int8 top-1 agreement {metrics['int8']['top1_agreement']:.1%}" if "int8" in metrics else ""
    print(f"export: parity max |Δlogit| {parity['max_abs_logit_diff']:.2e}, greedy {parity['greedy_tokens_matched']} "
          f"tokens equal{int8} → {OUT}/ ({', '.join(f'{k} {v} MB' for k, v in metrics['size_mb'].items())})", file=sys.stderr)


if __name__ == "__main__":
    main()
