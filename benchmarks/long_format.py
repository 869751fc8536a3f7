"""The long-format CSV (Liger-Kernel style: one row per measurement) and Markdown tables that the sequence and
window benchmarks write; ``rows`` are ``(encoding, provider, mode, x, (p50, p20, p80), config)`` in milliseconds."""
from __future__ import annotations

HEADER = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "config", "gpu", "torch", "triton",
          "commit"]


def write_csv(path: str, rows, env: dict) -> None:
    with open(path, "w") as f:
        f.write(",".join(HEADER) + "\n")
        for enc, prov, mode, x, (p50, p20, p80), config in rows:
            f.write(",".join(str(c) for c in (enc, prov, mode, "time", "ms", x, f"{p50:.4f}", f"{p20:.4f}",
                                              f"{p80:.4f}", f'"{config}"', env.get("gpu", "cpu"), env.get("torch", ""),
                                              env.get("triton", ""), env.get("commit", ""))) + "\n")


def md_table(rows, title: str, baselines=(), digits: int = 3) -> str:
    """A ``## title`` section: one line per x, one column per (encoding, provider), the ``baselines`` providers
    first; medians."""
    xs = sorted({r[3] for r in rows})
    cols = sorted({(r[0], r[1]) for r in rows}, key=lambda c: (c[1] not in baselines, c))
    out = [f"## {title}\n", "| length | " + " | ".join(f"{e} {p}" for e, p in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for x in xs:
        vals = {(r[0], r[1]): r[4][0] for r in rows if r[3] == x}
        out.append(f"| {x} | " + " | ".join(f"{vals[c]:.{digits}f}" if c in vals else "" for c in cols) + " |")
    return "\n".join(out) + "\n\n"
