"""A short digest of a GPU run's RESULTS_gpu.md for the end of gpu_run.sh's output: each section's
title, its tables cut to the columns that matter (contestant, times, speedups, MFU / % of peak,
GB), and its key sentences (peaks, sanity checks, goals).

  python experiments/benchmarks/gpu_summary.py OUT_DIR     # reads OUT_DIR/RESULTS_gpu.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

KEEP_COLUMN = re.compile(r"contestant|^op$|^matmul$|^model$|method|layers|median|jaxalign ms|"
                         r"bitsandbytes ms|speedup|bnb time|MFU|% of|peak|GB|GFLOP/s|time /", re.I)
KEEP_LINE = re.compile(r"^(Measured|Sanity|Goal|NF4 matmul|Bytes identical|First-step|TRL \+ bitsandbytes|"
                       r"TRL QLoRA|- GPU:|Shapes:)")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def digest(text: str) -> list[str]:
    out = []
    for sec in re.findall(r"<!-- BEGIN bench:(\S+) -->\n(.*?)<!-- END bench:\1 -->", text, re.S):
        name, body = sec
        lines = body.splitlines()
        out.append(f"--- {name}: " + next((l[3:] for l in lines if l.startswith("## ")), ""))
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
                head = cells(line)
                keep = [j for j, h in enumerate(head) if j == 0 or KEEP_COLUMN.search(h)]
                out.append("  " + " | ".join(head[j] for j in keep))
                i += 2
                while i < len(lines) and lines[i].startswith("|"):
                    row = cells(lines[i])
                    out.append("  " + " | ".join(row[j] for j in keep if j < len(row)))
                    i += 1
                continue
            if KEEP_LINE.match(line):
                out.append("  " + (line if len(line) <= 400 else line[:400] + " ..."))
            i += 1
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else ".") / "RESULTS_gpu.md"
    if not path.exists():
        print(f"no {path}")
        return 1
    print("\n".join(digest(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
