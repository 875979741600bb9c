"""The table of bench/probes.py for docs/benchmarks.md (registered in bench/_tables.py's RENDERERS)."""

from __future__ import annotations


def render_probes(f: dict) -> list[str]:
    """bench/probes.py: one row per probe, quality beside the sparsity of its slices."""
    from _tables import NONE, num, pct, table  # here, not at the top: _tables imports this module

    def g(name: str, key: str) -> float | None:
        return f.get(f"{name}_{key}")

    rows = []
    for name in f.get("probes", []):
        dense = name == "dense"
        shares = NONE if dense else " / ".join(pct(g(name, f"slices_top{n}_share"), 0) for n in (1, 4, 8))
        rows.append(
            [
                f"`{name}`: {g(name, 'label')}",
                num(g(name, "train_ce"), 3),
                num(g(name, "val_loss"), 3),
                NONE if dense else num(g(name, "val_loss_ratio"), 3),
                shares,
                NONE if dense else num(g(name, "slices_effective_k_median")),
                NONE if dense else num(g(name, "distinct_prototypes_per_window_median")),
                num(g(name, "tokens_per_s")),
                NONE if dense else num(g(name, "throughput_ratio"), 2),
            ]
        )
    header = [
        "probe",
        f"train CE (last {f.get('tail_steps')} steps)",
        "val loss",
        "ratio to dense",
        "top-1 / 4 / 8 share",
        "effective k",
        "distinct / 64 tokens",
        "tokens/s",
        "tokens/s ratio",
    ]
    lines = table(header, rows)
    lines += [
        "",
        f"Every probe: the demo preset's model and schedule shape, {f.get('steps')} steps, seed 0, the demo "
        "bundle's tokenizer; sparsity on the first 16 validation sequences. tokens/s is the wall clock of "
        "the niced training on shared cores (it follows the machine's load more than the model); the tokens/s "
        "ratio is timed against a dense model of the same size on the same batches, alternating, right after "
        "training.",
    ]
    return lines
