"""drop-zero-bias: an example pass written against graphopt's canonical form (README, "Writing a pass").

Matches a Conv whose bias is a constant of zeros and drops the bias input. The pass manager hands
it a canonical graph (weights as constants, exporter Identity routing folded, shapes inferred), so
the pass asks `graphs.weight` for the bias and needs no look-up of its own; it declines a
quantized bias, counting why. It is exact: a Conv adds its bias after the sum, and + 0 is exact.

Use it like any pass, from a plugin package's entry point or directly:

    from graphopt import Pipeline
    model, report = Pipeline([DropZeroBias()]).run(model)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import GraphPass, NoOptions, PassStats, Site
from graphopt.graphs import nodes_with_op, weight


class DropZeroBias(GraphPass[NoOptions]):
    name = "drop-zero-bias"
    summary = "EXAMPLE: drop a Conv's all-zero constant bias."

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        sites = []
        for conv in nodes_with_op(graph, "Conv"):
            if (reason := reason_to_keep_bias(conv)) is not None:
                stats.skip(reason)
            else:
                sites.append(Site(conv.name, conv))
        return sites

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        conv: gs.Node = site.payload
        del conv.inputs[2]  # the manager's cleanup drops the initializer nobody reads any more
        stats.counters["biases_dropped"] += 1


def reason_to_keep_bias(conv: gs.Node) -> str | None:
    if len(conv.inputs) < 3 or not conv.inputs[2].name:
        return "no bias"
    bias = weight(conv.inputs[2])
    if bias is None:
        return "bias is not a constant"
    if bias.quantized:
        return "quantized bias"
    return None if not np.any(bias.stored) else "bias is not all zeros"
