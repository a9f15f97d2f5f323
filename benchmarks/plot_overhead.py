"""Draw issue 32's host-cost measurements: each loader's CPU per source image against its own
plain pipeline, by workload and mixed fraction, with the targets.

    python benchmarks/plot_overhead.py --out benchmarks/results/overhead/host-cost.png

Reads ``benchmarks/results/overhead/{dali,torch,ffcv}-{varied,uniform}.json`` (FFCV: its default
``resize="fast"`` arms).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "overhead")

#: (loader, arm-name suffix, 224 px target, 32 px target), as issue 32 sets them.
LOADERS = (("dali", "", 1.05, 1.3), ("torch", "", 1.05, 1.3), ("ffcv", " fast", 1.05, 1.05))
FRACTIONS = (0, 50, 90)
#: (label, file's shapes, dataset key)
WORKLOADS = (("224 px varied", "varied", "generated_224px"),
             ("224 px uniform", "uniform", "generated_224px"),
             ("32 px (run 1)", "varied", "fashion_mnist_32px"),
             ("32 px (run 2)", "uniform", "fashion_mnist_32px"))


def ratios(loader: str, suffix: str) -> dict:
    out = {}
    for label, shapes, key in WORKLOADS:
        with open(os.path.join(RESULTS, f"{loader}-{shapes}.json")) as handle:
            arms = json.load(handle)["datasets"][key]["arms"]
        out[label] = [arms[f"mix {f}%{suffix}"]["cpu_per_image_vs_plain"] for f in FRACTIONS]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, "host-cost.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOADERS), figsize=(13, 4.2), dpi=120, sharey=True)
    width = 0.26
    for ax, (loader, suffix, big, small) in zip(axes, LOADERS):
        values = ratios(loader, suffix)
        for i, (label, _, _) in enumerate(WORKLOADS):
            for j, fraction in enumerate(FRACTIONS):
                ax.bar(i + (j - 1) * width, values[label][j], width,
                       color=plt.get_cmap("Blues")(0.45 + 0.25 * j),
                       label=f"{fraction} % mixed" if i == 0 else None)
            target = big if label.startswith("224") else small
            ax.hlines(target, i - 1.5 * width, i + 1.5 * width, colors="crimson",
                      label="target" if i == 0 else None)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(WORKLOADS)))
        ax.set_xticklabels([w[0] for w in WORKLOADS], fontsize=8)
        ax.set_title(f"{loader}" + (" (resize='fast', the default)" if suffix else ""),
                     fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("CPU per source image / plain pipeline's")
    axes[0].legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.suptitle("Host cost of mixing against each library's own plain training pipeline "
                 "(lower is better; 1.0 = the plain pipeline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
